"""The offline demo's base model: a small random-init Qwen2 model that hafs builds itself.

`build_tiny_model` writes a Hugging Face model directory (config, safetensors weights, tokenizer,
generation config) that plain `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(dir)` load
with no network. Same arguments, byte-identical files. Tests use it at its default (tiny) shape;
`build_demo_model` builds a slightly larger one once into the cache for `make demo`, and
`resolve_demo_model` maps the config's `base_model = "hafs-demo/..."` names onto it.

The tokenizer is a byte-level BPE trained with `tokenizers`, built exactly like Qwen2's (NFC,
Qwen2's split regex, ByteLevel, no unknown token), for a reason in transformers 5: for
`model_type = "qwen2"` AutoTokenizer always instantiates Qwen2Tokenizer, which keeps only the
vocabulary and merges of tokenizer.json and rebuilds Qwen2's pipeline around them. Any other kind
of tokenizer -- a sentencepiece-style one, say, which llama.cpp's converter would accept through
`tokenizer.model` with no hash check -- would silently be tokenized wrongly by transformers.
The price is on the llama.cpp side: `convert_hf_to_gguf.py` recognises BPE pre-tokenizers by the
hash of a probe string's token ids, which a new vocabulary never matches. The pre-tokenizer is
nonetheless Qwen2's, character for character, so an exporter may name it "qwen2" for llama.cpp;
`llama_cpp_pre_tokenizer(model_dir)` says when that is true.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError, Problem, did_you_mean

DEMO_PREFIX = "hafs-demo/"
DEMO_VERSION = "v1"
"""Bump when the recipe changes so cached demo models are rebuilt."""
DEMO_DATA_DIR = Path(__file__).resolve().parents[3] / "data" / "demo"
"""The demo dataset shipped in the repository (`[datasets.demo]`)."""
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
"""Ids 0 and 1. Padding differs from EOS so a collator can mask padding without also masking the
EOS the model must learn to emit."""
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
"""Qwen2's pre-tokenizer regex (transformers' PRETOKENIZE_REGEX; llama.cpp's "qwen2" pre-type)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
STAMP = "hafs-demo.json"


@dataclass(frozen=True)
class TinyShape:
    """Architecture of a built model (Qwen2: grouped-query attention, SwiGLU MLP, tied embeddings)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 2
    """Decoder blocks."""
    num_heads: int = 4
    """Query heads; hidden_size must divide by it."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); num_heads must divide by it."""
    intermediate_size: int = 128
    """Width of the MLP."""
    vocab_size: int = 1024
    """Tokenizer vocabulary to train (an upper bound: a small corpus supports fewer merges)."""
    max_position_embeddings: int = 2048
    """Longest sequence the config declares."""
    initializer_range: float = 0.02
    """Standard deviation of the random weights (transformers' default)."""
    embedding_std: float | None = None
    """Standard deviation of the (tied) embeddings; None: initializer_range."""


DEMO_MODELS = {
    # The preset's LoRA (r=8 on attention, lr 1e-3, 3 epochs) takes this from ~8.0 to ~6.4 training
    # loss in about 40 s on one CPU core. Larger-than-default embeddings are what let a random
    # model's frozen, tied output layer express a sharp distribution at all: with 0.02 the best
    # reachable logit margin is ~2.6 and the loss barely moves (7.6 -> 7.2).
    "tiny-qwen2": TinyShape(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                            vocab_size=2048, max_position_embeddings=2048, initializer_range=0.05,
                            embedding_std=0.1),
}

# Tokenizer training text besides the demo dataset: every 65816 mnemonic gets a chance at a
# token of its own even if the dataset never uses it.
BUILTIN_TEXT = """\
The 65816 is the 16-bit CPU of the SNES. A Link to the Past (ALTTP) runs on it from a LoROM cartridge.
ADC add with carry. AND and with accumulator. ASL arithmetic shift left. BCC branch if carry clear.
BCS branch if carry set. BEQ branch if equal. BIT test bits. BMI branch if minus. BNE branch if not equal.
BPL branch if plus. BRA branch always. BRK software break. BRL branch long. BVC branch if overflow clear.
BVS branch if overflow set. CLC clear carry. CLD clear decimal. CLI clear interrupt disable. CLV clear overflow.
CMP compare accumulator. COP coprocessor. CPX compare X. CPY compare Y. DEC decrement. DEX decrement X.
DEY decrement Y. EOR exclusive or. INC increment. INX increment X. INY increment Y. JML jump long.
JMP jump. JSL jump to subroutine long. JSR jump to subroutine. LDA load accumulator. LDX load X. LDY load Y.
LSR logical shift right. MVN block move negative. MVP block move positive. NOP no operation. ORA or with accumulator.
PEA push effective address. PEI push effective indirect address. PER push effective relative address.
PHA push A. PHB push data bank. PHD push direct page. PHK push program bank. PHP push processor status.
PHX push X. PHY push Y. PLA pull A. PLB pull data bank. PLD pull direct page. PLP pull processor status.
PLX pull X. PLY pull Y. REP reset status bits. ROL rotate left. ROR rotate right. RTI return from interrupt.
RTL return long. RTS return. SBC subtract with carry. SEC set carry. SED set decimal. SEI set interrupt disable.
SEP set status bits. STA store accumulator. STP stop the clock. STX store X. STY store Y. STZ store zero.
TAX transfer A to X. TAY transfer A to Y. TCD transfer to direct page. TCS transfer to stack pointer.
TDC transfer from direct page. TRB test and reset bits. TSB test and set bits. TSC transfer from stack pointer.
TSX transfer stack pointer to X. TXA transfer X to A. TXS transfer X to stack pointer. TXY transfer X to Y.
TYA transfer Y to A. TYX transfer Y to X. WAI wait for interrupt. WDM reserved. XBA exchange B and A.
XCE exchange carry and emulation flags.
"""


def tokenizer_corpus(data_dir: Path = DEMO_DATA_DIR) -> list[str]:
    """Texts the tokenizer is trained on: the built-in text, then the demo dataset's `text` fields."""
    texts = [BUILTIN_TEXT]
    for split in ("train", "val", "test"):
        path = data_dir / f"{split}.jsonl"
        if path.is_file():
            texts += [json.loads(raw).get("text", "") for raw in path.read_text(encoding="utf-8").splitlines()
                      if raw.strip()]
    return texts


def _qwen2_style_tokenizer():
    """An untrained tokenizer with Qwen2's normaliser, pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _train_tokenizer(vocab_size: int, corpus: list[str]) -> str:
    """tokenizer.json text; the BPE trainer is deterministic for a given corpus (tests check it)."""
    from tokenizers import pre_tokenizers, trainers

    tok = _qwen2_style_tokenizer()
    # min_frequency 1: the demo corpus is small, and a merge seen once still shortens sequences.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str(pretty=True)


def _write_tokenizer(out_dir: Path, vocab_size: int, max_length: int) -> None:
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes and 2 special tokens), got {vocab_size}")
    (out_dir / "tokenizer.json").write_text(_train_tokenizer(vocab_size, tokenizer_corpus()), encoding="utf-8")
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": None, "bos_token": None,
        # Written out for llama.cpp's converter, which copies them into the GGUF.
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": max_length,
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False}
                                 for i, t in enumerate((EOS_TOKEN, PAD_TOKEN))},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _tokenizer_size(tokenizer_dir: Path) -> int:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1


def build_tiny_model(out_dir: Path, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 128, vocab_size: int | None = None,
                     max_position_embeddings: int = 2048, seed: int = 0, tokenizer_dir: Path | None = None,
                     initializer_range: float = 0.02, embedding_std: float | None = None) -> Path:
    """Write a random-init Qwen2ForCausalLM with tied embeddings and its tokenizer to `out_dir`.

    `vocab_size`: the tokenizer to train on `tokenizer_corpus()` (default 1024; the corpus may
    support fewer merges, ~1980 tokens at most), or with `tokenizer_dir` (a directory holding
    tokenizer.json and tokenizer_config.json, e.g. another built model) the embedding rows, at
    least that tokenizer's size. The model's vocabulary is rounded up to a multiple of 64.
    `initializer_range` / `embedding_std`: standard deviations of the random weights and of the
    tied embeddings. Deterministic: the same arguments give byte-identical files. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
        have = _tokenizer_size(out_dir)
        if vocab_size is not None and vocab_size < have:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {have} tokens")
        rows = vocab_size or have
    else:
        _write_tokenizer(out_dir, vocab_size or TinyShape.vocab_size, max_position_embeddings)
        rows = _tokenizer_size(out_dir)
    rows = -(-rows // 64) * 64

    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    # Like Qwen2.5 base models: no BOS is added, and the config's bos id is the EOS token.
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)
    config = Qwen2Config(vocab_size=rows, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
                         initializer_range=initializer_range, tie_word_embeddings=True,
                         use_sliding_window=False, **ids)
    # Fork the RNG so building a model does not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
        if embedding_std is not None:
            with torch.no_grad():
                model.get_input_embeddings().weight.normal_(0.0, embedding_std)
    model.generation_config = GenerationConfig(**ids)
    from transformers.utils import logging as hf_logging

    # A one-file model needs no "Writing model shards" bar (it lands in --detect and --dry-run output).
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return out_dir


def demo_cache_dir(cache_dir: Path | None = None) -> Path:
    """Where built demo models live: `cache_dir`, else $HAFS_CACHE_DIR, else ~/.cache/hafs (created; a clear
    error when it cannot be: unlike tokenized data, the demo model must be stored to be loaded)."""
    if cache_dir:
        return Path(cache_dir).expanduser() / "demo"
    from .datacache import require_dir

    return require_dir("demo")


def _stamp(name: str, shape: TinyShape) -> dict:
    """What a built model was built from; a cached model whose stamp differs is rebuilt."""
    corpus = "\n".join(tokenizer_corpus()).encode("utf-8")
    return {"name": DEMO_PREFIX + name, "version": DEMO_VERSION, "shape": asdict(shape),
            "tokenizer": "qwen2-byte-level-bpe", "corpus_sha256": hashlib.sha256(corpus).hexdigest()}


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads((path / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_demo_model(cache_dir: Path | None = None, name: str = "tiny-qwen2") -> Path:
    """The demo base model, built on first use into `<cache>/demo/<name>-<version>` and reused.

    The build happens in a temporary sibling directory that is renamed into place with its stamp
    already written, so an interrupted build never leaves a half model behind.
    """
    shape = DEMO_MODELS[name]
    target = demo_cache_dir(cache_dir) / f"{name}-{DEMO_VERSION}"
    stamp = _stamp(name, shape)
    if _read_stamp(target) == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary shared folder
    try:
        build_tiny_model(tmp, **asdict(shape))
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # stale (older recipe or changed dataset): move it aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, old / "model")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same build first; use its copy if it is complete.
            if _read_stamp(target) != stamp:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def llama_cpp_pre_tokenizer(model_dir: Path) -> str | None:
    """"qwen2" when `model_dir`'s tokenizer.json normalises and pre-tokenizes exactly as Qwen2's does.

    llama.cpp's converter cannot recognise a new vocabulary's pre-tokenizer by its hash; for a
    tokenizer built by this module (or any with Qwen2's pipeline) the right answer is "qwen2",
    and an exporter can pass it on. None for anything else, where guessing would be wrong.
    """
    try:
        data = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    reference = json.loads(_qwen2_style_tokenizer().to_str())
    model = data.get("model") or {}
    same = all(data.get(k) == reference[k] for k in ("normalizer", "pre_tokenizer"))
    return "qwen2" if same and model.get("type") == "BPE" and not model.get("byte_fallback") else None


def is_demo_model(base_model: str) -> bool:
    """True for `hafs-demo/...` names, which hafs builds itself instead of loading from the hub."""
    return base_model.startswith(DEMO_PREFIX)


def unknown_demo_model(base_model: str) -> tuple[str, str] | None:
    """(what is wrong, which demo models there are) for a `hafs-demo/NAME` that names none; None otherwise.

    Config validation and resolve_demo_model both ask it, so the file is refused as the run would be."""
    name = base_model.removeprefix(DEMO_PREFIX)
    if not is_demo_model(base_model) or name in DEMO_MODELS:
        return None
    return (f"unknown demo model '{base_model}'{did_you_mean(name, DEMO_MODELS)}",
            "demo models: " + ", ".join(DEMO_PREFIX + n for n in DEMO_MODELS))


def resolve_demo_model(base_model: str, cache_dir: Path | None = None) -> Path | None:
    """The built directory for a `hafs-demo/NAME` base model (building it if needed); None otherwise."""
    if not is_demo_model(base_model):
        return None
    unknown = unknown_demo_model(base_model)
    if unknown:
        raise ConfigError([Problem(unknown[0], key="base_model", hint=unknown[1])])
    return build_demo_model(cache_dir, base_model[len(DEMO_PREFIX):])
