"""Base model, tokenizer and LoRA adapter: loading, wrapping and saving them.

Loading follows the run settings (`precision.run_settings`): frozen weights in the compute dtype,
the attention kernel chosen for the device, safetensors only, remote code only when the expert
opts in. `prepare_for_training` installs the leaner pieces from `kernels` that the settings ask for.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path

from .attention import VARLEN_ATTENTION, register_varlen_attention
from .errors import ConfigError, Problem
from .kernels import FastDropout
from .model_config import local_model_problem
from .precision import DTYPES, RunSettings, choose_attention

# Unused special tokens that make a safe pad token when a tokenizer has none (no new embedding row).
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|fim_pad|>", "<|finetune_right_pad_id|>",
                  "<|reserved_special_token_0|>", "<|vision_pad|>")


def resolve_base_model(base_model: str) -> str:
    """Local directory or hub id to load; `hafs-demo/NAME` is built locally (and cached) first."""
    if base_model.startswith("hafs-demo/"):
        from .demo import resolve_demo_model

        return str(resolve_demo_model(base_model))
    expanded = Path(base_model).expanduser()
    return str(expanded) if expanded.exists() else base_model


def load_model_and_tokenizer(plan, device: str, precision: str, settings: RunSettings | None = None, log=print):
    """(model, tokenizer) for `plan.expert.base_model` on `device`, frozen weights in `precision`'s dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_base_model(plan.expert.base_model)
    trust = bool(plan.expert.trust_remote_code)
    if trust:
        log(f"warning: trust_remote_code is on for {plan.expert_name}: running code from {source}")
    attn = settings.attn_implementation if settings else choose_attention(device, precision, plan.packing)
    if attn == VARLEN_ATTENTION:
        register_varlen_attention()
    dtype = getattr(torch, settings.weight_dtype if settings else DTYPES[precision])
    started = time.perf_counter()
    loading = "tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
        loading = "model"
        with quiet_weight_loading():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn,
                                                         trust_remote_code=trust, use_safetensors=True)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ConfigError([Problem(f"'{plan.expert.base_model}' needs code from its repository",
                                       key=f"experts.{plan.expert_name}.trust_remote_code",
                                       file=plan.config_file(),
                                       line=plan.line_of(["experts", plan.expert_name, "trust_remote_code"]),
                                       hint="set trust_remote_code = true only if you trust "
                                            "that repository")]) from None
        # transformers says "Couldn't instantiate the backend tokenizer" (and the like) for a folder that
        # is not a model: the user's base_model, not a bug of hafs. A ValueError of the model load on a
        # sound folder may be ours (attention, dtype), so it stays a traceback.
        if loading == "tokenizer" or local_model_problem(plan.expert.base_model, "") is not None:
            raise _load_error(plan, exc) from None
        raise
    except OSError as exc:
        raise _load_error(plan, exc) from None
    seconds, weights = time.perf_counter() - started, str(dtype).removeprefix("torch.")
    log(f"Model: {plan.expert.base_model} loaded in {seconds:.1f} s ({weights} weights)")
    note = ensure_pad_token(tokenizer, model)
    if note:
        log(note)
    model.config.use_cache = False  # training: packed examples must not share a KV cache
    model.to(device)
    return model, tokenizer


@contextmanager
def quiet_weight_loading():
    """No "Loading weights" bar from transformers while the block runs; download bars stay.

    transformers 5 draws that bar on every load, even of a 2 MB model, and in a log it is a line of
    carriage returns; hafs prints one "Model: ... loaded in N s" line instead. Only transformers' own
    bars are hidden (its tqdm hook): huggingface_hub's download bars, which a first hub load needs,
    are untouched (`disable_progress_bar()` would hide those too). Older transformers have no hook.
    """
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:
        yield
        return

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            return hf_logging.EmptyTqdm(*args, **kwargs)
        return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

    previous = set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)


def _load_error(plan, exc: Exception) -> ConfigError:
    key = f"experts.{plan.expert_name}.base_model"
    # What the folder lacks says more than transformers' message about its first symptom.
    problem = local_model_problem(plan.expert.base_model, key) or Problem(
        f"cannot load '{plan.expert.base_model}': {_first_line(exc)}", key=key,
        hint="a local model directory with config.json, tokenizer files and *.safetensors weights, "
             "or a hub id (needs network on first use)")
    return ConfigError([dataclasses.replace(problem, file=plan.config_file(),
                                            line=plan.line_of(["experts", plan.expert_name, "base_model"]))])


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def ensure_pad_token(tokenizer, model=None) -> str | None:
    """Give the tokenizer a pad token if it has none; returns a note saying what was done, or None.

    Padding positions are masked by position (labels -100, causal attention), never by token id, so
    a pad that equals EOS would be harmless here; we still prefer a distinct token so that tools
    which mask by id (HF collators) do not drop the EOS the model must learn to emit.
    """
    if tokenizer.pad_token_id is not None:
        return None
    vocab = tokenizer.get_vocab()
    for token in PAD_CANDIDATES:
        if token in vocab and vocab[token] != tokenizer.eos_token_id:
            tokenizer.pad_token = token
            _set_model_pad(model, tokenizer)
            return f"tokenizer has no pad token: using the unused token {token!r} (id {vocab[token]})"
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _set_model_pad(model, tokenizer)
    return f"tokenizer has no pad token: added '<|pad|>' (id {tokenizer.pad_token_id})"


def _set_model_pad(model, tokenizer) -> None:
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def linear_module_names(model) -> list[str]:
    """Distinct last names of the model's Linear layers (what `target_modules` can name)."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def apply_lora(model, plan, settings: RunSettings | None = None):
    """Wrap `model` in a peft LoRA adapter from `plan.lora`; adapter weights fp32, seeded by plan.seed."""
    import torch
    from peft import LoraConfig, get_peft_model

    lora = plan.lora
    available = linear_module_names(model)
    unknown = [t for t in lora.target_modules if t not in available]
    if unknown:
        raise ConfigError([Problem(
            f"target module{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} not in "
            f"{plan.expert.base_model}", key=f"lora.{plan.lora_name}.target_modules",
            hint=f"the model's linear layers are: {', '.join(available)}")])
    config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=list(lora.target_modules), bias=lora.bias, task_type="CAUSAL_LM")
    # The adapter's random init must not depend on what ran before (same seed, same adapter).
    import warnings

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(plan.seed)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # trainable weights (and their AdamW state) in fp32
    if settings is not None:
        prepare_for_training(peft_model, settings)
    return peft_model


def prepare_for_training(model, settings: RunSettings) -> None:
    """Apply the run settings to a peft model: LoRA and MLP forwards, dropout, checkpointing, Liger."""
    import torch

    from . import kernels

    if settings.liger:
        apply_liger(model)  # first: its MLP kernel replaces ours (patch_model skips patched MLPs)
    for module in model.modules():
        if hasattr(module, "lora_dropout") and hasattr(module, "cast_input_dtype_enabled"):
            # Under autocast the adapter's matmuls run in the compute dtype anyway; peft's cast of
            # the input to fp32 would only add a full-size copy (and autocast would cast it back).
            module.cast_input_dtype_enabled = settings.autocast_dtype is None
            if settings.fast_dropout:
                for name, drop in list(module.lora_dropout.items()):
                    if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                        module.lora_dropout[name] = FastDropout(drop.p)
    if settings.lean_kernels:
        kernels.patch_model(model, lora=True, swiglu=not settings.liger, rms_norm=settings.lean_rms_norm)
    if settings.lean_rotary:
        kernels.patch_rotary(model)
    if settings.gradient_checkpointing:
        enable_checkpointing(model, getattr(settings, "checkpointed_layers", None))


def enable_checkpointing(model, layers: int | None = None) -> int | None:
    """Non-reentrant activation checkpointing of the first `layers` decoder layers (None: all); returns how
    many are checkpointed (None: all, by a transformers without per-layer flags). Decoder-only models:
    their GradientCheckpointingLayers, in module order, are the decoder layers.

    Non-reentrant: works with frozen embeddings (no enable_input_require_grads hack) and with keyword
    arguments; reentrant checkpointing is deprecated in torch. transformers v5 names it
    activation_checkpointing_enable (gradient_checkpointing_enable warns); v4 has only the old name.
    A layer count is set on transformers' per-layer flag (GradientCheckpointingLayer, 4.52+); a model
    without those layers checkpoints all of them, which only costs time.
    """
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52: one flag for the whole stack
        return None
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = layers is None or i < layers
    return sum(bool(b.gradient_checkpointing) for b in blocks)


def apply_liger(model) -> bool:
    """Liger's RMSNorm/SwiGLU/RoPE kernels on a Qwen2/Llama/Mistral base model (not its loss)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Our chunked loss replaces the LM head's forward, so Liger's fused cross-entropy is not used.
    _apply_liger_kernel_to_instance(model=base, cross_entropy=False, fused_linear_cross_entropy=False)
    return True


def save_adapter(model, tokenizer, out_dir: Path) -> Path:
    """Write adapter_config.json, adapter_model.safetensors, the base config.json and the tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    ordinary_file_modes(out_dir)
    return out_dir


def ordinary_file_modes(folder: Path) -> None:
    """Give *.safetensors in `folder` the mode of any new file (0644 under the usual umask).

    Why: safetensors writes through a private temporary file (0600) that it renames, so the weights
    alone came out unreadable to the group that can read the rest of the model folder (llama.cpp
    servers, other users of a shared machine)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).glob("*.safetensors"):
        os.chmod(path, 0o666 & ~umask)
