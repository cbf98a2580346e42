"""Base model, tokenizer and LoRA adapter: loading, wrapping and saving them.

Loading follows the run settings (`precision.run_settings`): frozen weights in the compute dtype,
the attention kernel chosen for the device, safetensors only, remote code only when the expert
opts in. Also here: per-example attention for packed rows (`varlen_attention_forward`) and the
CPU dropout that LoRA uses (`FastDropout`).
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError, Problem
from .precision import DTYPES, VARLEN_ATTENTION, RunSettings, choose_attention

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
    key = f"experts.{plan.expert_name}.base_model"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn,
                                                     trust_remote_code=trust, use_safetensors=True)
    except OSError as exc:
        raise ConfigError([Problem(f"cannot load '{plan.expert.base_model}': {_first_line(exc)}", key=key,
                                   hint="a local model directory with config.json and *.safetensors weights, "
                                        "or a hub id (needs network on first use)")]) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ConfigError([Problem(f"'{plan.expert.base_model}' needs code from its repository",
                                       key=f"experts.{plan.expert_name}.trust_remote_code",
                                       hint="set trust_remote_code = true only if you trust that repository")]) from None
        raise
    note = ensure_pad_token(tokenizer, model)
    if note:
        log(note)
    model.config.use_cache = False  # training: packed examples must not share a KV cache
    model.to(device)
    return model, tokenizer


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # trainable weights (and their AdamW state) in fp32
    if settings is not None:
        prepare_for_training(peft_model, settings)
    return peft_model


def prepare_for_training(model, settings: RunSettings) -> None:
    """Apply the run settings to a peft model: dropout kernel, input casting, checkpointing."""
    for module in model.modules():
        if hasattr(module, "lora_dropout") and hasattr(module, "cast_input_dtype_enabled"):
            # Under autocast the adapter's matmuls run in the compute dtype anyway; peft's cast of
            # the input to fp32 would only add a full-size copy (and autocast would cast it back).
            module.cast_input_dtype_enabled = settings.autocast_dtype is None
        if settings.fast_dropout and hasattr(module, "lora_dropout"):
            import torch

            for name, drop in list(module.lora_dropout.items()):
                if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                    module.lora_dropout[name] = FastDropout(drop.p)
    if settings.gradient_checkpointing:
        # Non-reentrant: works with frozen embeddings (no enable_input_require_grads hack) and
        # with keyword arguments; reentrant checkpointing is deprecated in torch.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.liger:
        apply_liger(model)


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
    return out_dir


# --------------------------------------------------------------------------- CPU dropout

def _fast_dropout_class():
    import torch

    class FastDropout(torch.nn.Module):
        """Dropout with the keep mask drawn 4 lanes per 64-bit random number (16-bit thresholds).

        torch's CPU dropout draws one mt19937 number per element, which at LoRA's input widths
        costs as much as the layer's matmuls. Here one `random_()` int64 gives four 16-bit lanes;
        an element is dropped when its lane is below round(p * 65536), so the drop probability is p
        to within 1/65536. Uses torch's default generator (checkpoints restore it).
        """

        def __init__(self, p: float):
            super().__init__()
            self.p = float(p)
            self.threshold = round(self.p * 65536) - 32768

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            n = x.numel()
            # random_() alone would give 63-bit numbers (a lane that is never negative): full range.
            words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
            keep = words.view(torch.int16)[:n].view(x.shape) >= self.threshold
            return x * keep * (1.0 / (1.0 - self.p))

        def extra_repr(self) -> str:
            return f"p={self.p}"

    return FastDropout


def FastDropout(p: float):
    """A FastDropout module (class built lazily so importing this file stays torch-free)."""
    global _FAST_DROPOUT
    if _FAST_DROPOUT is None:
        _FAST_DROPOUT = _fast_dropout_class()
    return _FAST_DROPOUT(p)


_FAST_DROPOUT = None


# --------------------------------------------------------------------------- packed-row attention

_registered = False
_segments_cache: list = [None, None]  # [position_ids tensor, its segments]: layers share one batch


def register_varlen_attention() -> None:
    """Register VARLEN_ATTENTION with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    _registered = True


def _varlen_mask(*args, **kwargs):
    """No mask for plain causal/packed training batches (position_ids carry the boundaries); else sdpa's."""
    from transformers.masking_utils import sdpa_mask

    q_offset, q_len, kv_len = kwargs.get("q_offset", 0), kwargs.get("q_length"), kwargs.get("kv_length")
    if (not args and kwargs.get("attention_mask") is None and isinstance(q_offset, int) and q_offset == 0
            and q_len == kv_len and not kwargs.get("local_size") and not kwargs.get("use_vmap")):
        return None
    return sdpa_mask(*args, **kwargs)


def row_segments(position_ids) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each example: a new one starts wherever the position does not step by 1.

    Trailing padding continues the last example's positions (batching.collate), so it stays in that
    segment, after its real tokens, where causal attention keeps it from affecting them.
    """
    import torch

    pos = position_ids
    step = torch.ones_like(pos, dtype=torch.bool)
    step[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    width = pos.shape[1]
    out = []
    for row in step.cpu().tolist():
        starts = [t for t, s in enumerate(row) if s]
        out.append(list(zip(starts, starts[1:] + [width])))
    return out


def _segments(position_ids, batch: int):
    if _segments_cache[0] is not position_ids:
        pos = position_ids if position_ids.shape[0] == batch else position_ids.expand(batch, -1)
        _segments_cache[0], _segments_cache[1] = position_ids, row_segments(pos)
    return _segments_cache[1]


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """Causal attention within each example of packed rows; transformers' sdpa for anything else.

    query [B, H, T, D], key/value [B, Hkv, T, D] → ([B, T, H, D], None), as sdpa_attention_forward.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    batch, heads, width, dim = query.shape
    plain = (attention_mask is not None or position_ids is None or key.shape[2] != width or width == 1
             or dropout or kwargs.get("sliding_window") or not getattr(module, "is_causal", True)
             or kwargs.get("softcap") is not None)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    segments = _segments(position_ids, batch)
    gqa = key.shape[1] != heads
    if query.device.type == "cuda":
        if all(len(row) == 1 for row in segments):
            return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, is_causal=True, **kwargs)
        return _cuda_varlen(query, key, value, segments, scaling, gqa), None
    if all(len(row) == 1 for row in segments):
        out = _cpu_causal(query, key, value, scaling, gqa)
    else:
        rows = []
        for b, row in enumerate(segments):
            parts = [_cpu_causal(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], scaling, gqa)
                     for s, e in row]
            rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
        out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


CPU_BF16_ATTENTION_FROM = 384
"""Sequence length from which the CPU flash kernel runs faster in bf16 than in fp32 (bench: 2.8x
slower in bf16 at 76 tokens, 1.1x at 287, 0.8x at 1024)."""


def _cpu_causal(query, key, value, scaling, gqa):
    """Causal SDPA on CPU; short sequences in fp32, where its backward is faster than in bf16."""
    import torch

    dtype = query.dtype
    if dtype == torch.bfloat16 and query.shape[2] < CPU_BF16_ATTENTION_FROM:
        out = torch.nn.functional.scaled_dot_product_attention(
            query.float(), key.float(), value.float(), is_causal=True, scale=scaling, enable_gqa=gqa)
        return out.to(dtype)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                            enable_gqa=gqa)


def _cuda_varlen(query, key, value, segments, scaling, gqa):
    """torch's FlashAttention varlen kernel over the flattened tokens (one launch for all examples)."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, width, dim = query.shape
    bounds = [b * width + s for b, row in enumerate(segments) for s, _ in row] + [batch * width]
    cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
    longest = max(e - s for row in segments for s, e in row)
    flat = lambda t: t.transpose(1, 2).reshape(batch * width, t.shape[1], dim)  # noqa: E731
    out = varlen_attn(flat(query), flat(key), flat(value), cu, cu, longest, longest,
                      scale=scaling, window_size=(-1, 0), enable_gqa=gqa)
    return out.view(batch, width, heads, dim)
