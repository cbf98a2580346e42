"""`hafs merge MODEL_DIR --out DIR`: fold the LoRA adapter into the base weights, as a plain model.

The result is an ordinary Hugging Face model folder (config.json, *.safetensors, tokenizer,
generation_config.json) that `AutoModelForCausalLM.from_pretrained(DIR)` loads with no peft and no
hafs; it is what llama.cpp's converter and most serving tools expect.

The merge is computed in fp32 on the CPU, whatever the base is stored in: W + (alpha/r)·B·A added
in bf16 would round the small update away in places. The merged weights are then stored in the
base model's own dtype (a bf16 base stays bf16-sized), unless `dtype` says otherwise.
Like model folders, the output appears complete or not at all: it is written to a hidden staging
folder beside `--out` and renamed into place; an existing `--out` is never touched.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

from .errors import ConfigError, Problem

STAGING = ".staging-merge-"
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def stored_dtype(base_model: str, model_dir: Path) -> str:
    """The dtype the base model is stored in (its own config.json), else what the model folder's config says.

    The folder's config.json was saved from the loaded base, so it names the training precision,
    not necessarily the dtype the base model ships in.
    """
    from .model_loading import resolve_base_model

    value = None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_base_model(base_model))
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    except (OSError, ValueError):
        pass
    if value is None:
        try:
            config = json.loads((Path(model_dir) / "config.json").read_text())
            value = config.get("dtype") or config.get("torch_dtype")
        except (OSError, ValueError):
            value = None
    return DTYPES.get(str(value).replace("torch.", ""), "float32")


def merge_adapter(model_dir: Path, out_dir: Path, *, dtype: str | None = None, log=print) -> Path:
    """Write base + adapter of `model_dir` as one full model to `out_dir` (which must not exist)."""
    import torch

    from .generate import load_trained_model
    from .model_loading import ordinary_file_modes
    from .outputs import disk_error

    model_dir, out_dir = Path(model_dir), Path(out_dir).expanduser()
    if out_dir.exists() or out_dir.is_symlink():
        raise ConfigError([Problem(f"{out_dir} already exists; merge never overwrites", key="--out",
                                   hint="choose a new folder, or remove the old one first")])
    if dtype not in (None, "auto") and dtype not in DTYPES:
        raise ConfigError([Problem(f"unknown dtype '{dtype}'", key="--dtype",
                                   hint=f"one of: auto, {', '.join(sorted(DTYPES))}")])
    model, tokenizer, plan, meta, _ = load_trained_model(model_dir, device="cpu", precision="fp32", packing=False,
                                                         log=log)
    target = DTYPES[dtype] if dtype not in (None, "auto") else stored_dtype(plan.expert.base_model, model_dir)
    merged = model.merge_and_unload()
    merged = merged.to(getattr(torch, target))
    # Loading for training turned the KV cache off; a merged model is for inference.
    merged.config.use_cache = True

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = out_dir.parent / f"{STAGING}{out_dir.name}-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    try:
        merged.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        ordinary_file_modes(staged)
        info = {"merged_from": str(model_dir.resolve()), "base_model": plan.expert.base_model,
                "lora": {"r": plan.lora.r, "lora_alpha": plan.lora.lora_alpha,
                         "target_modules": list(plan.lora.target_modules)},
                "dtype": target, "merged": dt.datetime.now().isoformat(timespec="seconds"),
                "expert": meta.get("expert"), "training": meta.get("training"),
                "evaluation": meta.get("evaluation")}
        # Not metadata.json: this folder is a plain model, not a hafs adapter folder for `hafs models`.
        (staged / "hafs_merge.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        if out_dir.exists():  # appeared while we were merging: still never overwrite
            raise ConfigError([Problem(f"{out_dir} appeared while merging; nothing was overwritten", key="--out")])
        os.rename(staged, out_dir)
    except OSError as exc:
        raise disk_error(exc, out_dir) from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    log(f"Merged model saved to: {out_dir}")
    return out_dir


def cmd_merge(args) -> int:
    """`hafs merge MODEL_DIR --out DIR`."""
    out = merge_adapter(Path(args.model_dir), Path(args.out), dtype=getattr(args, "dtype", None))
    if getattr(args, "json", False):
        print(json.dumps({"merged": str(out)}))
    return 0
