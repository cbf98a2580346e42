"""`hafs detect` / `train.py --detect`: the machine described, a profile block for it, the presets ranked."""

from __future__ import annotations

import json
import math
import re

from .errors import ConfigError
from .hardware import Capabilities, build_phrase, detect, install_hint
from .preflight import rank_presets


def profile_block(caps: Capabilities, name: str = "") -> str:
    """A `[hardware.NAME]` table describing this machine, ready to paste into training.toml."""
    device = caps.best_device()
    gpus = caps.usable_gpus()
    if device == "cuda":
        memory = math.floor(gpus[0].total_memory_gb * 0.95 * 2) / 2
        label, bf16, fp16 = f"{gpus[0].name} {gpus[0].total_memory_gb:.0f}GB", all(g.bf16 for g in gpus), True
    elif device == "mps":
        memory = math.floor(caps.device_memory_gb("mps"))
        label, bf16, fp16 = f"Mac ({caps.cpu.model_name or 'Apple silicon'}) with MPS", caps.mps.bf16, True
    else:
        memory = max(1, math.floor(caps.cpu.ram_gb * 0.75))
        label, bf16, fp16 = f"CPU {caps.cpu.model_name or caps.cpu.arch}".strip(), caps.cpu.bf16_fast, \
            caps.cpu.fp16_fast
    seq, batch = next((s, b) for limit, s, b in ((12, 1024, 1), (20, 2048, 2), (32, 4096, 4),
                                                 (math.inf, 8192, 8)) if memory < limit)
    key = name or "local-" + (re.sub(r"[^a-z0-9]+", "-", re.sub(r"(?i)nvidia|geforce", "", gpus[0].name).lower())
                              .strip("-") if device == "cuda" else device)
    values = {"name": label, "device": device, "available_memory_gb": memory, "max_batch_size": batch,
                  "max_sequence_length": seq, "supports_fp16": fp16, "supports_bf16": bf16,
                  "supports_gradient_checkpointing": device != "mps",  # the user's note: breaks LoRA on MPS
                  "max_lora_rank": 16 if memory < 12 else 32 if memory < 24 else 64,
                  "recommended_gradient_accumulation": max(1, 8 // batch)}
    if device == "cuda" and len(gpus) > 1:
        values["num_gpus"] = len(gpus)
    unsupported = [g for g in caps.gpus if not g.supported_by_build]
    if unsupported and not gpus:
        g = unsupported[0]
        values["reason"] = f"CUDA capability {g.sm} ({g.name}) not supported by PyTorch {caps.torch_version}"
    values["notes"] = f"detected by hafs: {caps.describe(device)}; torch {caps.torch_version or 'missing'}"
    lines = [f"[hardware.{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = {'"': '\\"', "\\": "\\\\"}
    return '"' + "".join(escaped.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 32 or ord(c) == 127 else c)
                         for c in str(value)) + '"'


def detect_report(caps: Capabilities, cfg=None, *, memory: bool = True, config_loader=None) -> str:
    """The `--detect` text: the machine, a profile block for it, and the config's presets ranked."""
    lines = [f"Machine: {caps.os} {caps.os_version} ({caps.cpu.arch}), Python {caps.python_version}",
             f"  {build_phrase(caps) if caps.torch_version else 'PyTorch: not installed'}"
             + (f", kernels for {' '.join(caps.cuda_arch_list)}" if caps.cuda_arch_list
                else "" if caps.torch_cuda_version else ", CPU-only build"),
             f"  Devices: {', '.join(caps.device_kinds())} (auto picks {caps.best_device()})",
             f"  CPU: {caps.describe('cpu')[5:]}; bf16: "
             + ("yes (" + ", ".join(n for n, f in (("AVX512-BF16", caps.cpu.avx512_bf16),
                                                    ("AMX-BF16", caps.cpu.amx_bf16)) if f) + ")"
                if caps.cpu.avx512_bf16 or caps.cpu.amx_bf16 else "yes" if caps.cpu.bf16_fast
                else "no (training in fp32)")]
    for g in caps.gpus:
        support = "supported" if g.supported_by_build else f"NOT supported by this build: {install_hint(g.capability)}"
        lines.append(f"  GPU {g.index}: {g.name}, {g.total_memory_gb:.1f} GiB, {g.sm}, "
                     f"bf16 {'yes' if g.bf16 else 'no'}, fp16 yes: {support}")
    if caps.os == "Darwin":
        m = caps.mps
        lines.append(f"  MPS: {'available' if m.available else 'not available'}, macOS {m.macos_version}, "
                     f"{m.unified_memory_gb:.0f} GiB unified ({caps.device_memory_gb('mps'):.0f} GiB usable), "
                     f"bf16 {'yes' if m.bf16 else 'no'}")
    lines += [f"  note: {n}" for n in caps.notes]
    lines += ["", "Hardware profile for this machine (paste into config/training.toml):", "",
              profile_block(caps).rstrip()]
    if cfg is not None:
        lines += ["", f"Presets in {cfg.path or 'the config'}, runnable here first:"]
        for name, ok, reason in rank_presets(cfg, caps, memory=memory, config_loader=config_loader):
            lines.append(f"  {'ok' if ok else '--'}  {name:<24} {reason}")
    return "\n".join(lines)


def cmd_detect(args) -> int:
    """`hafs detect` / `train.py --detect`: the machine, a profile block, the presets ranked (`--json` too)."""
    from .loader import load_config

    caps, cfg, problem = detect(), None, ""
    try:
        cfg = load_config(getattr(args, "config", None))
    except ConfigError as exc:  # detection is still useful without a (valid) config
        problem = exc.render()
    if getattr(args, "json", False):
        ranked = rank_presets(cfg, caps) if cfg is not None else []
        print(json.dumps({"capabilities": caps.to_dict(), "profile_block": profile_block(caps),
                          "presets": [{"preset": n, "runs_here": ok, "reason": r} for n, ok, r in ranked],
                          "config_problem": problem or None}, indent=2))
        return 0
    print(detect_report(caps, cfg))
    if problem:
        print(f"\n(presets not ranked: the config did not load)\n{problem}")
    return 0
