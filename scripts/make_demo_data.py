#!/usr/bin/env python3
"""Generate the offline demo dataset, data/demo/{train,val,test}.jsonl, deterministically.

    python scripts/make_demo_data.py            write the files and print the counts
    python scripts/make_demo_data.py --check    exit 1 if the files on disk differ from what it generates

Rows are in the user's exporter format (Alpaca rows and a few chat rows, each with `text` and
`_metadata`). Answers are computed, not invented, where the question allows it: flag bits of
REP/SEP, opcode bytes, LoROM address maths, DMA register values. A fixed share of rows is there
only for the filters to drop: other domains ("lore") and quality scores below 0.5.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

SEED = 65816
OUT = Path(__file__).resolve().parents[1] / "data" / "demo"
# Rows per split, and how many of them are there for the filters and formats to show:
# lore (a domain [datasets.demo] drops), low (quality below 0.5, dropped), half (exactly 0.5,
# kept: the filter drops *below* the threshold), long (multi-transfer DMA routines: the long
# tail), chat (messages rows), nometa (no _metadata at all: passes both filters).
SPLITS = {
    "train": dict(rows=300, lore=16, low=24, half=10, long=6, chat=12, nometa=2),
    "val": dict(rows=40, lore=3, low=3, half=2, long=1, chat=2, nometa=0),
    "test": dict(rows=40, lore=3, low=3, half=2, long=1, chat=2, nometa=0),
}
SYSTEM = "You are an expert in 65816 assembly and ALTTP ROM hacking."

FLAGS = [(7, "N", "negative"), (6, "V", "overflow"), (5, "M", "accumulator/memory width (1 = 8-bit)"),
         (4, "X", "index register width (1 = 8-bit)"), (3, "D", "decimal mode"),
         (2, "I", "IRQ disable"), (1, "Z", "zero"), (0, "C", "carry")]

# (mnemonic, opcode, mode). imm_m / imm_x take 1 or 2 bytes depending on the M / X flag.
OPCODES = [
    ("LDA", 0xA9, "imm_m"), ("LDA", 0xAD, "abs"), ("LDA", 0xAF, "long"), ("LDA", 0xBF, "long_x"),
    ("LDA", 0xA5, "dp"), ("STA", 0x8D, "abs"), ("STA", 0x8F, "long"), ("STA", 0x9F, "long_x"),
    ("STA", 0x85, "dp"), ("STZ", 0x9C, "abs"), ("STZ", 0x64, "dp"), ("LDX", 0xA2, "imm_x"),
    ("LDY", 0xA0, "imm_x"), ("CPX", 0xE0, "imm_x"), ("CMP", 0xC9, "imm_m"), ("ADC", 0x69, "imm_m"),
    ("SBC", 0xE9, "imm_m"), ("AND", 0x29, "imm_m"), ("ORA", 0x09, "imm_m"), ("INX", 0xE8, "imp"),
    ("INY", 0xC8, "imp"), ("DEX", 0xCA, "imp"), ("DEY", 0x88, "imp"), ("TAX", 0xAA, "imp"),
    ("TAY", 0xA8, "imp"), ("TXA", 0x8A, "imp"), ("CLC", 0x18, "imp"), ("SEC", 0x38, "imp"),
    ("PHA", 0x48, "imp"), ("PLA", 0x68, "imp"), ("PHB", 0x8B, "imp"), ("PLB", 0xAB, "imp"),
    ("PHK", 0x4B, "imp"), ("PHP", 0x08, "imp"), ("PLP", 0x28, "imp"), ("XBA", 0xEB, "imp"),
    ("REP", 0xC2, "imm8"), ("SEP", 0xE2, "imm8"), ("JSL", 0x22, "long"), ("JSR", 0x20, "abs"),
    ("RTL", 0x6B, "imp"), ("RTS", 0x60, "imp"), ("NOP", 0xEA, "imp"), ("BNE", 0xD0, "rel"),
    ("BEQ", 0xF0, "rel"), ("BRA", 0x80, "rel"), ("BCC", 0x90, "rel"),
]

# Well-known ALTTP WRAM addresses (the SRAM mirror lives at $7EF000).
ITEMS = {"rupees": (0x7EF360, 2, 999), "bombs": (0x7EF343, 1, 50), "arrows": (0x7EF377, 1, 70),
         "magic": (0x7EF36E, 1, 0x80), "health": (0x7EF36D, 1, 0xA0)}
RAM = {"$7E0010": "the main module index", "$7E0011": "the submodule index",
       "$7E001A": "the frame counter", "$7E0020": "Link's Y coordinate (16-bit)",
       "$7E0022": "Link's X coordinate (16-bit)", "$7E002F": "Link's facing direction",
       "$7E005D": "Link's state (normal, swimming, falling, ...)", "$7E008A": "the overworld area number",
       "$7E00A0": "the current dungeon room (16-bit)", "$7EF36C": "Link's maximum health (8 per heart)",
       "$7EF359": "the sword level", "$7EF35A": "the shield level", "$7EF35B": "the armor level"}
NAMES = ["Sprite_CheckDamage", "Link_GiveRupees", "Ancilla_SpawnSparkle", "Dungeon_OpenDoor",
         "Overworld_SetPalette", "HUD_RefreshHearts", "Player_HandleDash", "Menu_DrawItem",
         "Oracle_CheckSecret", "Custom_BossPhase", "Tile_ReplaceWithPit", "Music_FadeOut",
         "Npc_TalkHook", "Item_UseHookshot", "Room_InitTorches", "Link_ApplyDamage"]
# Instructions a 4-byte JSL may overwrite, with their sizes: the hook pads the rest with NOPs.
OVERWRITTEN = [("LDA $7EF36D", 4), ("STA $7EF360", 4), ("LDA $0DD0,X : CMP #$09", 5),
               ("JSL $0DBA71", 4), ("LDA $F0 : AND #$80 : STA $F2", 6), ("LDA $7E0022", 4),
               ("LDA $1A : AND #$0F : TAX", 5), ("LDY #$0C : LDA $0E20,X", 5)]


def h(value: int, digits: int) -> str:
    return f"${value:0{digits}X}"


def flag_names(value: int) -> list[str]:
    return [f"{letter} (bit {bit}, {what})" for bit, letter, what in FLAGS if value >> bit & 1]


# ---------------------------------------------------------------- asm
def rep_sep(rng):
    op = rng.choice(["REP", "SEP"])
    value = rng.choice([0x30, 0x20, 0x10, 0x30, 0x20, 0x01, 0x02, 0x08, 0x04, 0xC3, 0x31, 0x38, 0x24])
    verb = "clears" if op == "REP" else "sets"
    ask = rng.choice([f"Explain what {op} #{h(value, 2)} does.", f"What does `{op} #{h(value, 2)}` do to the flags?",
                      f"Which processor flags does {op} #{h(value, 2)} change?"])
    lines = [f"`{op} #{h(value, 2)}` {verb} every processor-status bit that is 1 in {h(value, 2)} "
             f"(%{value:08b}) and leaves the others alone:"]
    lines += [f"- {name}" for name in flag_names(value)]
    if value & 0x20:
        lines.append(f"The accumulator and memory accesses become {'16' if op == 'REP' else '8'}-bit, so immediate "
                     f"operands such as `LDA #...` take {'two' if op == 'REP' else 'one'} byte(s).")
    if value & 0x10:
        lines.append(f"X and Y become {'16' if op == 'REP' else '8'}-bit"
                     + ("; their high bytes are zeroed." if op == "SEP" else "."))
    if value & 0x30:
        lines.append("Tell the assembler too (asar tracks it from the REP/SEP it sees, or use `.b`/`.w`).")
    return ask, "", "\n".join(lines)


def operand(rng, mode, m16, x16):
    if mode == "imp":
        return "", []
    if mode == "imm8":
        v = rng.choice([0x30, 0x20, 0x10])
        return f"#{h(v, 2)}", [v]
    if mode in ("imm_m", "imm_x"):
        wide = m16 if mode == "imm_m" else x16
        v = rng.randrange(0x10000 if wide else 0x100)
        return f"#{h(v, 4 if wide else 2)}", ([v & 0xFF, v >> 8] if wide else [v])
    if mode == "dp":
        v = rng.randrange(0x100)
        return h(v, 2), [v]
    if mode == "abs":
        v = rng.randrange(0x0100, 0x2000) if rng.random() < 0.5 else rng.randrange(0x8000, 0x10000)
        return h(v, 4), [v & 0xFF, v >> 8]
    if mode == "rel":
        v = rng.randrange(-16, 16)
        return f"{'+' if v >= 0 else '-'}{abs(v)}", [v & 0xFF]
    v = rng.choice([0x7E0000, 0x7EF000, 0x7F0000, 0x0D0000, 0x1B8000]) + rng.randrange(0x800)
    text = h(v, 6) + (",X" if mode == "long_x" else "")
    return text, [v & 0xFF, v >> 8 & 0xFF, v >> 16]


def assemble(rng, count):
    """A random instruction run, tracking M/X so immediates get the right size."""
    m16, x16 = rng.random() < 0.5, rng.random() < 0.5
    state = f"M={'16' if m16 else '8'}-bit, X={'16' if x16 else '8'}-bit"
    out = []
    for _ in range(count):
        name, code, mode = rng.choice(OPCODES)
        text, data = operand(rng, mode, m16, x16)
        out.append((f"{name} {text}".strip(), [code] + data))
        if name in ("REP", "SEP"):
            m16 = (name == "REP") if data[0] & 0x20 else m16
            x16 = (name == "REP") if data[0] & 0x10 else x16
    return state, out


def disassemble(rng):
    state, prog = assemble(rng, rng.randrange(3, 8))
    hexes = " ".join(f"{b:02X}" for _, code in prog for b in code)
    ask = rng.choice(["Disassemble these 65816 bytes.", "Convert this hex to 65816 instructions.",
                      "What instructions do these bytes encode?"])
    rows = [f"{' '.join(f'{b:02X}' for b in code):<12} {text}" for text, code in prog]
    notes = "Immediate sizes follow the M/X state, updated by every REP/SEP on the way."
    return ask, f"{hexes}\n({state} at the start)", "```\n" + "\n".join(rows) + "\n```\n" + notes


def assemble_task(rng):
    state, prog = assemble(rng, rng.randrange(3, 7))
    src = "\n".join(text for text, _ in prog)
    hexes = " ".join(f"{b:02X}" for _, code in prog for b in code)
    total = sum(len(code) for _, code in prog)
    return (rng.choice(["Assemble this code to bytes.", "Give the machine code for these instructions."]),
            f"{src}\n({state})", f"{hexes}\n\n{total} bytes. Branch offsets are relative to the next instruction.")


def clear_wram(rng):
    bank = rng.choice([0x7E, 0x7E, 0x7F])
    size = rng.choice([0x100, 0x200, 0x400, 0x800, 0x1000, 0x2000])
    start = rng.randrange(0, (0x10000 - size) // 0x200 + 1) * 0x200
    end = start + size - 1
    ask = f"Write a routine that clears WRAM {h(bank << 16 | start, 6)}-{h(bank << 16 | end, 6)}."
    if size < 0x1000 or rng.random() < 0.5:
        code = ["ClearWRAM:", "    PHP", "    REP #$30              ; 16-bit A, X, Y", "    LDA #$0000",
                "    LDX #$0000", ".loop", f"    STA {h(bank << 16 | start, 6)},X", "    INX", "    INX",
                f"    CPX #{h(size, 4)}             ; {size} bytes, two per store", "    BNE .loop",
                "    PLP", "    RTL"]
        why = "A 16-bit store clears two bytes per pass, so X steps by 2 up to the size."
    else:
        code = ["ClearWRAM:", "    PHP", "    SEP #$20", "    REP #$10", f"    LDX #{h(start, 4)}",
                "    STX $2181             ; WMADD low/high", f"    LDA #{h(bank & 1, 2)}",
                "    STA $2183             ; WMADD bank bit", "    LDA #$08              ; fixed source, A->B",
                "    STA $4300", "    LDA #$80              ; B-bus $2180 = WMDATA", "    STA $4301",
                "    LDX.w #ZeroByte", "    STX $4302", "    LDA.b #ZeroByte>>16", "    STA $4304",
                f"    LDX #{h(size, 4)}", "    STX $4305", "    LDA #$01", "    STA $420B             ; start channel 0",
                "    PLP", "    RTL", "", "ZeroByte: db $00"]
        why = "For larger ranges a fixed-source DMA into WMDATA ($2180) is much faster than a CPU loop."
    return ask, "", "```asm\n" + "\n".join(code) + "\n```\n" + why


def dma_block(rng, channel, lines):
    src = rng.choice([0x7E2000, 0x7F0000, 0x1B8000, 0x0E8000, 0x7EC000]) + rng.randrange(0, 0x40) * 0x40
    size = rng.choice([0x0200, 0x0400, 0x0800, 0x1000])
    vram = rng.randrange(0, 0x80) * 0x100
    base = 0x4300 + channel * 0x10
    lines += [f"    ; {size} bytes {h(src, 6)} -> VRAM word {h(vram, 4)} on channel {channel}",
              "    LDA #$1801            ; DMAP=$01 (write $2118/$2119), BBAD=$18", f"    STA {h(base, 4)}",
              f"    LDA.w #{h(src & 0xFFFF, 4)}", f"    STA {h(base + 2, 4)}", f"    LDX.b #{h(src >> 16, 2)}",
              f"    STX {h(base + 4, 4)}", f"    LDA #{h(size, 4)}", f"    STA {h(base + 5, 4)}",
              f"    LDA #{h(vram, 4)}", "    STA $2116"]
    return src, size, vram


def dma(rng):
    channel = rng.randrange(8)
    lines = ["    PHP", "    REP #$20", "    SEP #$10", "    LDX #$80", "    STX $2115             ; +1 word after $2119"]
    src, size, vram = dma_block(rng, channel, lines)
    lines += [f"    LDX #{h(1 << channel, 2)}", "    STX $420B             ; MDMAEN: start", "    PLP", "    RTL"]
    ask = rng.choice([f"Set up a DMA of {h(size, 4)} bytes from {h(src, 6)} to VRAM {h(vram, 4)} using channel {channel}.",
                      f"Write the DMA setup to copy {size} bytes from {h(src, 6)} into VRAM at {h(vram, 4)} (channel {channel})."])
    return ask, "", ("```asm\n" + "\n".join(lines) + "\n```\nRun it during NMI or forced blank; "
                     "VRAM is only writable then.")


def dma_batch(rng):
    """The long tail: several transfers in one NMI routine."""
    n = rng.randrange(4, 8)
    name = rng.choice(["NmiUpload", "UploadLinkGfx", "UploadHudTiles", "UploadSpriteSheets", "UploadBg3Text",
                       "RefreshTilemaps"])
    lines = [f"{name}:", "    PHP", "    REP #$20", "    SEP #$10", "    LDX #$80", "    STX $2115"]
    mask = 0
    for channel in range(n):
        dma_block(rng, channel, lines)
        mask |= 1 << channel
    lines += [f"    LDX #{h(mask, 2)}", "    STX $420B             ; all channels at once", "    PLP", "    RTL"]
    return (f"Write an NMI routine {name} that uploads {n} graphics buffers to VRAM, one DMA channel each.", "",
            "```asm\n" + "\n".join(lines) + "\n```\nAll channels start with one write to $420B and run in order.")


def jsl_hook(rng):
    name = rng.choice(NAMES)
    addr = rng.choice([0x00, 0x02, 0x05, 0x06, 0x07, 0x09, 0x0D]) << 16 | rng.randrange(0x8000, 0x10000)
    free = rng.choice([0x20, 0x21, 0x2F, 0x30, 0x3F]) << 16 | 0x8000
    orig, size = rng.choice(OVERWRITTEN)
    pad = ["    NOP"] * (size - 4)
    ask = f"Write an asar hook at {h(addr, 6)} that calls a new routine {name} in freespace at {h(free, 6)}."
    code = [f"org {h(addr, 6)}              ; overwrites: {orig} ({size} bytes)", f"    JSL {name}", *pad, "",
            f"org {h(free, 6)}", f"{name}:", "    PHB : PHK : PLB       ; DB = our bank, for tables below",
            "    ; ... new code ...", "    PLB", f"    {orig}              ; replay what the JSL replaced", "    RTL"]
    note = (f"JSL takes 4 bytes; the replaced code was {size}, so {size - 4} NOP(s) keep the next instruction aligned. "
            "Return with RTL, never RTS: JSL pushed a 3-byte address.") if size > 4 else (
            "JSL takes exactly the 4 bytes replaced. Return with RTL, never RTS: JSL pushed a 3-byte address.")
    return ask, "", "```asm\n" + "\n".join(code) + "\n```\n" + note


def lorom(rng):
    bank, addr = rng.randrange(0x00, 0x20), rng.randrange(0x8000, 0x10000)
    pc = bank * 0x8000 + (addr & 0x7FFF)
    if rng.random() < 0.5:
        return (f"Convert the LoROM address {h(bank, 2)}:{addr:04X} to a PC file offset.", "",
                f"PC = (bank & $7F) * $8000 + (address - $8000) = {h(bank, 2)} * $8000 + {h(addr - 0x8000, 4)} "
                f"= {h(pc, 6)}. Add $200 if the ROM has a copier header.")
    return (f"Which LoROM address is at PC offset {h(pc, 6)}?", "",
            f"bank = {h(pc, 6)} / $8000 = {h(bank, 2)}, address = {h(pc, 6)} % $8000 + $8000 = {h(addr, 4)}, "
            f"so {h(bank, 2)}:{addr:04X} (or {h(bank | 0x80, 2)}:{addr:04X} in the FastROM mirror).")


def alttp_item(rng):
    item = rng.choice(sorted(ITEMS))
    where, width, cap = ITEMS[item]
    amount = rng.randrange(1, 60 if width == 1 else 300)
    ask = rng.choice([f"Write a routine that gives Link {amount} {item}.", f"Add {amount} to Link's {item}, capped."])
    if width == 2:
        code = ["    PHP", "    REP #$20", f"    LDA {h(where, 6)}", "    CLC", f"    ADC #{h(amount, 4)}",
                f"    CMP #{h(cap + 1, 4)}", "    BCC +", f"    LDA #{h(cap, 4)}", f"+   STA {h(where, 6)}", "    PLP", "    RTL"]
    else:
        code = ["    PHP", "    SEP #$20", f"    LDA {h(where, 6)}", "    CLC", f"    ADC #{h(amount, 2)}",
                "    BCS .cap              ; wrapped past $FF", f"    CMP #{h(cap + 1, 2)}", "    BCC +",
                f".cap  LDA #{h(cap, 2)}", f"+   STA {h(where, 6)}", "    PLP", "    RTL"]
    return ask, "", f"Link's {item} count is stored at {h(where, 6)} ({width * 8}-bit).\n```asm\n" + "\n".join(code) + "\n```"


def ram_question(rng):
    where = rng.choice(sorted(RAM))
    return (rng.choice([f"What is stored at {where} in ALTTP?", f"What does ALTTP keep in {where}?"]), "",
            f"{where} holds {RAM[where]}. Read it with a long address (`LDA {where}`) or, with DB=$7E, "
            f"`LDA ${where[-4:]}`.")


def bank_byte(rng):
    dp = rng.choice([0x00, 0x04, 0x08, 0x0C])
    label = rng.choice(["ItemTable", "PaletteData", "TextPointers", "SpriteProps", "DoorTiles"])
    return (f"How do I read {label} in another bank through a 24-bit pointer in direct page ${dp:02X}?", "",
            "```asm\n" + "\n".join(["    REP #$30", f"    LDA.w #{label}", f"    STA ${dp:02X}", f"    LDA.w #{label}>>16",
                                    f"    STA ${dp + 2:02X}            ; bank byte", "    LDY #$0000",
                                    f"    LDA [${dp:02X}],Y          ; long indirect: bank from ${dp + 2:02X}"])
            + "\n```\n`[dp],Y` reads the bank byte from the pointer, so DB does not matter.")


# ---------------------------------------------------------------- debugging
def crash(rng):
    name, addr = rng.choice(NAMES), rng.randrange(0x8000, 0x10000)
    bank = rng.choice([0x20, 0x21, 0x2F, 0x30])
    kind = rng.randrange(4)
    if kind == 0:
        return (f"The game crashes right after {name} returns. It is called with JSL and ends with RTS.",
                f"Trace: {bank:02X}:{addr:04X} RTS  S:01F0 -> 00:{(addr + 3) & 0xFFFF:04X} BRK",
                "JSL pushes a 3-byte return address, RTS pops only 2, so execution continues at a wrong "
                "address in the wrong bank and hits BRK. End the routine with RTL (or call it with JSR).")
    if kind == 1:
        return (f"After my hook in {name} the game runs garbage instructions.",
                f"Code at {bank:02X}:{addr:04X}: SEP #$20 / LDA #$0010 / STA $10",
                "After SEP #$20 the accumulator is 8-bit, so the CPU reads `LDA #$10` and then runs the $00 "
                "byte as BRK. Write `LDA.b #$10`, or REP #$20 first if you meant a 16-bit store.")
    if kind == 2:
        return (f"{name} reads the wrong values from its table with LDA Table,X.",
                f"The routine is in bank {h(bank, 2)} and is called with JSL from bank $00.",
                "Absolute addressing uses the data bank register, still $00 from the caller. "
                "Wrap the routine in PHB : PHK : PLB ... PLB, or use a long address (`LDA.l Table,X`).")
    return (f"The game freezes in {name} after my patch. The stack pointer keeps shrinking.",
            f"Trace: {bank:02X}:{addr:04X} PHA / PHX ... RTL with S falling by 3 each call",
            "Every push needs a matching pull before RTL. PHA and PHX are never pulled, so RTL returns to a "
            "pushed value. Add PLX and PLA (in reverse order) before RTL.")


def trace_flags(rng):
    p = rng.randrange(0x100)
    m, x = p >> 5 & 1, p >> 4 & 1
    a, xx = rng.randrange(0x10000), rng.randrange(0x10000)
    line = f"00:{rng.randrange(0x8000, 0x10000):04X} LDA $10   A:{a:04X} X:{xx:04X} Y:0000 S:01F3 D:0000 DB:7E P:{p:02X}"
    ask = rng.choice(["In this trace line, how wide are A and X?", "Read the P register in this trace line."])
    set_flags = ", ".join(letter for bit, letter, _ in FLAGS if p >> bit & 1) or "none"
    return ask, line, (f"P={h(p, 2)} (%{p:08b}): flags set: {set_flags}. M={m} so A is {'8' if m else '16'}-bit; "
                       f"X={x} so X and Y are {'8' if x else '16'}-bit.")


# ---------------------------------------------------------------- yaze
def yaze(rng):
    kind = rng.randrange(3)
    pc = rng.randrange(0x8000, 0x100000)
    if kind == 0:
        width = rng.choice(["Byte", "Word"])
        ctype = "uint8_t" if width == "Byte" else "uint16_t"
        return (f"How do I read a {width.lower()} at PC offset {h(pc, 6)} with the yaze ROM API?", "",
                "```cpp\nyaze::Rom rom;\nRETURN_IF_ERROR(rom.LoadFromFile(\"zelda3.sfc\"));\n"
                f"ASSIGN_OR_RETURN({ctype} value, rom.Read{width}(0x{pc:06X}));\n```\n"
                f"Read{width} returns absl::StatusOr<{ctype}>: an out-of-range offset is an error, not a crash.")
    if kind == 1:
        bank, addr = pc // 0x8000, pc % 0x8000 + 0x8000
        return (f"Convert SNES address ${bank:02X}{addr:04X} to a PC offset in yaze code.", "",
                f"```cpp\nuint32_t pc = yaze::SnesToPc(0x{bank:02X}{addr:04X});  // 0x{pc:06X}\n```\n"
                "SnesToPc applies the LoROM mapping; PcToSnes goes the other way.")
    value = rng.randrange(0x100)
    return (f"Write {h(value, 2)} to PC offset {h(pc, 6)} with yaze and save the ROM.", "",
            f"```cpp\nRETURN_IF_ERROR(rom.WriteByte(0x{pc:06X}, 0x{value:02X}));\n"
            "RETURN_IF_ERROR(rom.SaveToFile(yaze::Rom::SaveSettings{.backup = true}));\n```\n"
            "Keep the backup on: a bad write is then one file copy away from undone.")


# ---------------------------------------------------------------- lore (dropped by the domain filter)
LORE = [("Where is the Master Sword found?", "In the Lost Woods, on its pedestal; Link needs the three pendants."),
        ("Who is Agahnim?", "The wizard who took over Hyrule Castle and sends the maidens to the Dark World."),
        ("What are the three pendants?", "The Pendants of Courage, Power and Wisdom, from the first three dungeons."),
        ("Who is Sahasrahla?", "The elder of Kakariko, a descendant of the Sages, who guides Link to the pendants."),
        ("What is the Dark World?", "The Golden Land, twisted by Ganon's wish on the Triforce."),
        ("Why does Link enter Hyrule Castle at night?", "Princess Zelda calls to him telepathically for help."),
        ("What happens to the seven maidens?", "Agahnim seals them in crystals in the Dark World's dungeons."),
        ("What is the Triforce?", "The golden relic of the three goddesses; Ganon's wish on it made the Dark World."),
        ("Who is Link's uncle?", "The knight who heads to the castle first and leaves Link his sword and shield.")]


def lore(rng):
    question, answer = rng.choice(LORE)
    prefix = rng.choice(["", "In ALTTP, ", "Lore question: "])
    return prefix + (question[0].lower() + question[1:] if prefix else question), "", answer


GENERATORS = [  # (generator, domain, weight)
    (rep_sep, "asm", 30), (disassemble, "asm", 40), (assemble_task, "asm", 20), (clear_wram, "asm", 25),
    (dma, "asm", 20), (jsl_hook, "asm", 30), (lorom, "asm", 20),
    (alttp_item, "asm", 20), (ram_question, "asm", 10), (bank_byte, "asm", 8), (crash, "debugging", 40),
    (trace_flags, "debugging", 25), (yaze, "yaze", 40),
]


def text_of(instruction: str, input_: str, output: str) -> str:
    section = f"\n\n### Input:\n{input_}" if input_ else ""
    return f"### Instruction:\n{instruction}{section}\n\n### Response:\n{output}"


def make_split(rng: random.Random, quota: dict, seen: set, first_id: int) -> list[dict]:
    """One split's rows; `seen` keeps instructions unique across splits (no train/test leaks)."""
    n = quota["rows"]
    kinds = ["lore"] * quota["lore"] + ["long"] * quota["long"] + ["plain"] * (n - quota["lore"] - quota["long"])
    rng.shuffle(kinds)
    made = []
    for kind in kinds:
        while True:
            if kind == "lore":
                gen, domain = lore, "lore"
            elif kind == "long":
                gen, domain = dma_batch, "asm"
            else:
                gen, domain, _ = rng.choices(GENERATORS, weights=[w for *_, w in GENERATORS])[0]
            instruction, input_, output = gen(rng)
            if (instruction, input_) not in seen:
                seen.add((instruction, input_))
                made.append((instruction, input_, output, domain, f"template:{gen.__name__}"))
                break
    # Disjoint roles among the plain rows, so each filter's count is exact.
    plain = [i for i, kind in enumerate(kinds) if kind == "plain"]
    rng.shuffle(plain)
    role, at = {}, 0
    for name in ("low", "chat", "nometa", "half"):
        role.update({i: name for i in plain[at:at + quota[name]]})
        at += quota[name]
    rows = []
    for i, (instruction, input_, output, domain, source) in enumerate(made):
        quality = (0.5 if role.get(i) == "half" else round(rng.uniform(0.2, 0.45), 2) if role.get(i) == "low"
                   else round(rng.uniform(0.55, 0.98), 2))
        if role.get(i) == "low":
            output = output.split("\n")[0][:60]  # a poor row: the answer cut short
        meta = {"sample_id": f"demo-{first_id + i:04d}", "domain": domain, "source": source, "quality_score": quality}
        if role.get(i) == "chat":  # as the exporter writes multi-turn sources
            user = instruction + (f"\n\n{input_}" if input_ else "")
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                        {"role": "assistant", "content": output}]
            rows.append({"messages": messages, "text": f"System: {SYSTEM}\nUser: {user}\nAssistant: {output}",
                         "_metadata": meta})
            continue
        row = {"instruction": instruction, "input": input_, "output": output,
               "text": text_of(instruction, input_, output), "_metadata": meta}
        if not input_ and rng.random() < 0.5:
            del row["input"]  # the exporter omits an empty input about half the time
        if role.get(i) == "nometa":
            del row["_metadata"]
        rows.append(row)
    return rows


def split_rows() -> dict[str, list[dict]]:
    rng, seen, out, first = random.Random(SEED), set(), {}, 0
    for name, quota in SPLITS.items():
        out[name] = make_split(rng, quota, seen, first)
        first += quota["rows"]
    return out


def kept(row: dict, threshold: float = 0.5, domains=("asm", "debugging", "yaze")) -> bool:
    """What `[datasets.demo]` keeps: quality >= threshold and domain listed; missing fields pass."""
    meta = row.get("_metadata", {})
    quality, domain = meta.get("quality_score"), meta.get("domain")
    return (quality is None or quality >= threshold) and (domain is None or domain in domains)


def summary(splits: dict[str, list[dict]]) -> str:
    lines = []
    for name, rows in splits.items():
        domains = Counter(r.get("_metadata", {}).get("domain", "(none)") for r in rows)
        low = sum(1 for r in rows if r.get("_metadata", {}).get("quality_score", 1) < 0.5)
        chat = sum(1 for r in rows if "messages" in r)
        k = sum(map(kept, rows))
        lines.append(f"{name}: {len(rows)} rows ({chat} chat), domains {dict(sorted(domains.items()))}, "
                     f"quality<0.5: {low}, kept by [datasets.demo]: {k}, dropped: {len(rows) - k}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = parser.parse_args(argv)
    splits = split_rows()
    rendered = {n: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) for n, rows in splits.items()}
    if args.check:
        stale = [n for n, t in rendered.items() if not (OUT / f"{n}.jsonl").is_file()
                 or (OUT / f"{n}.jsonl").read_text(encoding="utf-8") != t]
        print("up to date" if not stale else f"stale: {', '.join(stale)}")
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (OUT / f"{name}.jsonl").write_text(text, encoding="utf-8")
    print(summary(splits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
