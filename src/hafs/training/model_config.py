"""A base model's config.json without loading the model: local folders, the demo, shipped shapes, the hub.

The memory estimate and the dry run need only the model's shape, and must get it offline where they
can (a dry run on a plane, CI without the hub): local paths first, then the hub cache, then folders
the user names in $HAFS_MODEL_CONFIGS, then the shapes shipped with hafs, and the hub last, failing
in a second when it cannot be reached.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import HardwareError, Problem


def load_model_config(base_model: str, trust_remote_code: bool = False) -> dict:
    """config.json of a local model directory (or .json file), the offline demo model, or a hub repository.

    Hub ids are looked up first in the folders of $HAFS_MODEL_CONFIGS (os.pathsep-separated; files named
    `ORG--NAME.json` or `name-config.json`, e.g. tests/fixtures), then in the hub cache or the hub itself.
    Only JSON is read, so `trust_remote_code` never runs anything here. Raises HardwareError saying what
    to do when no config can be had.
    """
    del trust_remote_code
    path = Path(base_model).expanduser()
    if path.is_dir():
        return _read_json(path / "config.json")
    if path.suffix == ".json" and path.is_file():
        return _read_json(path)
    if base_model.startswith("hafs-demo/"):
        from . import demo  # lazy: the demo builder imports transformers

        getter = getattr(demo, "demo_model_config", None)
        if getter is not None:
            return dict(getter(base_model))
        return _read_json(Path(demo.resolve_demo_model(base_model)) / "config.json")
    name = base_model.rstrip("/").split("/")[-1]
    # The hub cache first (it is what will be trained), then folders the user names, then the shapes
    # shipped with hafs (the seed's base model), so an offline dry run still gets a verdict.
    cached = _hub_cached_config(base_model)
    if cached is not None:
        return _read_json(cached)
    folders = os.environ.get("HAFS_MODEL_CONFIGS", "").split(os.pathsep) + [str(BUNDLED_CONFIGS)]
    for folder in filter(None, folders):
        for candidate in (base_model.replace("/", "--") + ".json", f"{name.lower()}-config.json"):
            if (Path(folder).expanduser() / candidate).is_file():
                return _read_json(Path(folder).expanduser() / candidate)
    try:
        from huggingface_hub import hf_hub_download

        if not _hub_reachable():  # fail in a second, not after the hub client's 25 s of retries
            raise ConnectionError("huggingface.co cannot be reached (offline?)")
        local = hf_hub_download(base_model, "config.json")  # honours HF_HUB_OFFLINE
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all mean "no config to read"
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise HardwareError([Problem(
            f"cannot read config.json of '{base_model}' for the memory estimate ({type(exc).__name__}"
            + (f": {first})" if first else ")"), key="expert.base_model",
            hint="connect once so the hub cache has it, point base_model at a local model directory, set "
                 "HAFS_MODEL_CONFIGS to a folder holding its config.json, "
                 "or pass --force to skip the check")]) from None
    return _read_json(Path(local))


BUNDLED_CONFIGS = Path(__file__).resolve().parent / "model_configs"


def _hub_cached_config(base_model: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base_model, "config.json")
    except Exception:  # noqa: BLE001 - not a repo id, or no cache: nothing cached
        return None
    return Path(found) if isinstance(found, str) else None


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HardwareError([Problem("model directory has no config.json", file=str(path.parent),
                                     hint="base_model must be a Hugging Face model directory or hub id")]) from None
    except (OSError, ValueError) as exc:
        raise HardwareError([Problem(f"cannot read model config: {exc}", file=str(path))]) from None
    if not isinstance(data, dict):
        raise HardwareError([Problem("model config is not a JSON object", file=str(path))])
    return data


LLAMA_LIKE = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2"})
"""model_types whose linear layers are named like Llama's (attention q/k/v/o_proj, MLP gate/up/down_proj)."""
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def target_problems(plan, config: dict) -> list[Problem]:
    """LoRA target_modules that the base model does not have, found from its config.json alone.

    Why here: peft's check (model_loading.apply_lora) only runs once the weights are loaded, minutes
    into a run on a large model. Only architectures whose layer names are known are checked."""
    from .errors import did_you_mean

    if str(config.get("model_type", "")) not in LLAMA_LIKE:
        return []
    unknown = [t for t in plan.lora.target_modules if t not in LLAMA_LINEARS]
    return [Problem(f"target module '{t}' is not a layer of {plan.expert.base_model} "
                    f"({config.get('model_type')}){did_you_mean(t, LLAMA_LINEARS)}",
                    key=f"lora.{plan.lora_name}.target_modules", file=getattr(plan, "config_path", ""),
                    hint=f"its linear layers are: {', '.join(LLAMA_LINEARS)}") for t in unknown]


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
"""Any one of these is a tokenizer transformers can load (fast, sentencepiece, BPE vocab, WordPiece)."""


def base_model_problem(base_model: str, key: str) -> Problem | None:
    """Why `base_model` cannot be loaded, found before any model load: a local folder that is not a
    model, or a hub model that cannot be downloaded. None when nothing is known to be wrong."""
    return local_model_problem(base_model, key) or hub_download_problem(base_model, key)


def local_model_problem(base_model: str, key: str) -> Problem | None:
    """A local base_model path that is missing or lacks config.json, a tokenizer or *.safetensors weights.

    Why before the run: transformers reports a folder without a tokenizer as a ValueError about
    "instantiating the backend tokenizer", after the data was read and the plan printed."""
    if base_model.startswith("hafs-demo/"):
        return None
    path = Path(base_model).expanduser()
    hint = ("point base_model at a Hugging Face model folder (config.json, tokenizer files and *.safetensors "
            "weights, e.g. one written by `hafs merge` or `huggingface-cli download`), or use a hub id")
    if not path.exists():
        looks_local = base_model.startswith(("/", "./", "../", "~", ".\\", "..\\")) or path.is_absolute()
        return Problem(f"'{base_model}' does not exist", key=key, hint=hint) if looks_local else None
    if not path.is_dir():
        if path.suffix == ".json":
            return None  # a config.json alone: enough for a dry run's memory estimate, the load says the rest
        return Problem(f"'{base_model}' is a file, not a model folder", key=key, hint=hint)
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer files (" + " or ".join(TOKENIZER_FILES[:2]) + ")")
    weights = [p.name for p in path.glob("*.safetensors")]
    if not weights:
        missing.append("*.safetensors weights")
    elif set(weights) == {"adapter_model.safetensors"}:
        return Problem(f"'{base_model}' holds a LoRA adapter, not a base model", key=key,
                       hint="merge it into its base model first (`hafs merge`) and point base_model at the result")
    if not missing:
        return None
    return Problem(f"'{base_model}' is not a model folder: it has no {', no '.join(missing)}", key=key, hint=hint)


def hub_download_problem(base_model: str, key: str) -> Problem | None:
    """A hub base model whose weights are not in the local hub cache while huggingface.co cannot be reached.

    Why before the run: transformers' download retries for about a minute before it gives up, after the
    data was read and the plan printed; a second's probe says the same thing up front."""
    if base_model.startswith("hafs-demo/") or Path(base_model).expanduser().exists() or base_model.count("/") != 1:
        return None  # the demo model, a local folder, or not a hub id (transformers says what is wrong)
    try:
        from huggingface_hub import try_to_load_from_cache

        if any(isinstance(try_to_load_from_cache(base_model, name), str) for name in WEIGHT_FILES):
            return None
    except Exception:  # noqa: BLE001 - no cache or an odd id: let the loader report it
        return None
    if _hub_reachable():
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    return Problem(f"'{base_model}' is not in the local Hugging Face cache and "
                   + ("HF_HUB_OFFLINE is set" if offline else "huggingface.co cannot be reached (offline?)"),
                   key=key, hint="download it once with network (`huggingface-cli download "
                                 f"{base_model}`), or point base_model at a local model directory")
