"""Leaner replacements for a few training-time pieces of transformers + peft, chosen by RunSettings.

Each one computes the same function as the code it replaces (tests compare them) with fewer
passes over memory and fewer saved activations, which is what bounds a small model on a CPU:
- `keep_mask` / `FastDropout`: dropout masks from 16-bit lanes of 64-bit random numbers. torch's
  CPU dropout draws one mt19937 number per element, as slow as the layer's matmuls at LoRA widths.
- `lora_forward`: peft's LoRA Linear without the fp32 input copy, the dropout rescale pass and the
  `* scaling` pass (both folded into the r-wide side), and without keeping a dropped copy of the
  input per adapter: q, k and v share one saved input and keep only their masks.
- `swiglu_mlp_forward`: Qwen2/Llama's MLP keeping gate and up for backward, not also silu(gate).
- `varlen_attention_forward`: causal attention within each example of packed rows (position_ids
  restart at 0), with no T×T mask; torch's FlashAttention varlen kernel on CUDA.
- `block_causal_attention`: CPU bf16 attention in query blocks, keeping the probabilities for
  backward: torch's CPU flash kernel recomputes them and runs at 10-15% of the bf16 matmul rate
  here; this is 1.2-2.3x faster fwd + bwd at 64-768 tokens, for memory the estimate counts.
"""

from __future__ import annotations

import functools

VARLEN_ATTENTION = "hafs_varlen_sdpa"
"""Name under which `register_varlen_attention` registers per-example attention with transformers."""
ATTENTION_BLOCK = 128
"""Query rows per block of `block_causal_attention`."""
CPU_BLOCK_ATTENTION_BYTES = 32 << 20
"""Saved probabilities (bf16) per attention call up to which CPU attention uses block_causal_attention;
longer sequences take torch's flash kernel, which keeps none. On the CPU benchmark's shape (4 x 8
heads): up to 768 tokens."""


# --------------------------------------------------------------------------- dropout

def keep_mask(x, p: float):
    """Bool mask of x's shape, True with probability 1 - p (p to within 1/65536), from torch's generator."""
    import torch

    if x.device.type != "cpu":
        return torch.rand(x.shape, device=x.device) >= p  # GPU generators are fast; no trick needed
    n = x.numel()
    # One int64 gives four 16-bit lanes; the full range (random_() alone gives 63 bits: a lane that
    # would never be negative).
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
    return words.view(torch.int16)[:n].view(x.shape) >= round(p * 65536) - 32768


def FastDropout(p: float):
    """nn.Dropout(p) with `keep_mask`."""
    return _fast_dropout_class()(p)


# The torch classes below are built on first use (functools.cache) so importing this file stays torch-free.
@functools.cache
def _fast_dropout_class():
    import torch

    class _FastDropout(torch.nn.Module):
        """Dropout whose mask comes from `keep_mask`."""

        def __init__(self, p: float):
            super().__init__()
            self.p = float(p)

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            return x * keep_mask(x, self.p) * (1.0 / (1.0 - self.p))

        def extra_repr(self) -> str:
            return f"p={self.p}"

    return _FastDropout


# --------------------------------------------------------------------------- LoRA

@functools.cache
def _lora_function():
    import torch

    class LoraBranch(torch.autograd.Function):
        """base + ((x ⊙ keep) Aᵀ)(s·B)ᵀ, saving x (shared by sibling adapters), the mask and the r-wide h."""

        @staticmethod
        def forward(ctx, base, x, a, b, keep, scale):
            dtype = x.dtype
            xm = x * keep if keep is not None else x
            h = xm @ a.to(dtype).t()
            bs = (b * scale).to(dtype)
            out = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), bs.t())
            ctx.save_for_backward(x, a, b, keep, h)
            ctx.scale = scale
            return out.view(base.shape)

        @staticmethod
        def backward(ctx, grad):
            x, a, b, keep, h = ctx.saved_tensors
            dtype = x.dtype
            g2 = grad.reshape(-1, grad.shape[-1]).to(dtype)
            h2 = h.reshape(-1, h.shape[-1])
            bs = (b * ctx.scale).to(dtype)
            dh = g2 @ bs  # [M, r]
            db = (g2.t() @ h2).float().mul_(ctx.scale).to(b.dtype)
            xm = (x * keep if keep is not None else x).reshape(-1, x.shape[-1])
            da = (dh.t() @ xm).to(a.dtype)
            dx = None
            if ctx.needs_input_grad[1]:
                dx = (dh @ a.to(dtype)).view(x.shape)
                if keep is not None:
                    dx = dx * keep
            return grad, dx, da, db, None, None

    return LoraBranch


def lora_forward(self, x, *args, **kwargs):
    """Replacement forward for a peft lora.Linear with one plain adapter; peft's own forward otherwise."""
    active = [a for a in self.active_adapters if a in self.lora_A]
    if (self.disable_adapters or self.merged or args or kwargs or len(active) != 1 or active[0] in self.lora_variant
            or getattr(self, "fan_in_fan_out", False) or self.lora_bias.get(active[0], False)):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    drop = self.lora_dropout[name]
    p = getattr(drop, "p", 0.0) if self.training else 0.0
    base = self.base_layer(x)
    keep = keep_mask(x, p) if p > 0 else None
    # (x ⊙ keep / (1-p)) A: the 1/(1-p) is applied on the r-wide side, with the LoRA scaling.
    scale = float(self.scaling[name]) / (1.0 - p)
    return _lora_function().apply(base, x.to(base.dtype) if x.dtype != base.dtype else x,
                                  self.lora_A[name].weight, self.lora_B[name].weight, keep, scale)


# --------------------------------------------------------------------------- SwiGLU MLP

@functools.cache
def _swiglu_function():
    import torch

    class SwiGLU(torch.autograd.Function):
        """silu(gate) * up, keeping gate and up for backward (silu(gate) is recomputed)."""

        @staticmethod
        def forward(ctx, gate, up):
            ctx.save_for_backward(gate, up)
            return torch.nn.functional.silu(gate) * up

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            d_up = grad * torch.nn.functional.silu(gate)
            d_gate = torch.ops.aten.silu_backward(grad * up, gate)
            return d_gate, d_up

    return SwiGLU


def swiglu_mlp_forward(self, x):
    """Qwen2MLP / LlamaMLP forward: down(silu(gate(x)) * up(x)) with the leaner SwiGLU."""
    return self.down_proj(_swiglu_function().apply(self.gate_proj(x), self.up_proj(x)))


def patch_model(model, *, lora: bool = True, swiglu: bool = True) -> dict:
    """Install the leaner forwards on a peft model's LoRA layers and SiLU MLPs; returns counts."""
    import types

    counts = {"lora": 0, "mlp": 0}
    for module in model.modules():
        if lora and hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "lora_variant"):
            module.forward = types.MethodType(lora_forward, module)
            counts["lora"] += 1
        elif swiglu and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) \
                and getattr(module, "config", None) is not None and getattr(module.config, "hidden_act", "") == "silu":
            module.forward = types.MethodType(swiglu_mlp_forward, module)
            counts["mlp"] += 1
    return counts


# --------------------------------------------------------------------------- packed-row attention

_registered = False
_segments_cache: list = [None, None]  # [position_ids tensor, its segments]: all layers see one batch


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
    """No mask for causal/packed training batches (position_ids carry the boundaries); else sdpa's."""
    from transformers.masking_utils import sdpa_mask

    q_offset, q_len, kv_len = kwargs.get("q_offset", 0), kwargs.get("q_length"), kwargs.get("kv_length")
    if (not args and kwargs.get("attention_mask") is None and isinstance(q_offset, int) and q_offset == 0
            and q_len == kv_len and not kwargs.get("local_size") and not kwargs.get("use_vmap")):
        return None
    return sdpa_mask(*args, **kwargs)


def row_segments(position_ids) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each example: one starts wherever the position does not step by 1.

    Trailing padding continues the last example's positions (batching.collate), so it stays in that
    segment, after its real tokens, where causal attention keeps it from affecting them.
    """
    import torch

    step = torch.ones_like(position_ids, dtype=torch.bool)
    step[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1]) != 1
    width = position_ids.shape[1]
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
    batch, heads, width, _ = query.shape
    plain = (attention_mask is not None or position_ids is None or key.shape[2] != width or width == 1
             or dropout or kwargs.get("sliding_window") or not getattr(module, "is_causal", True)
             or kwargs.get("softcap") is not None)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    segments = _segments(position_ids, batch)
    gqa = key.shape[1] != heads
    single = all(len(row) == 1 for row in segments)
    if query.device.type == "cuda":
        if single:
            return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, is_causal=True, **kwargs)
        return _cuda_varlen(query, key, value, segments, scaling, gqa), None
    if single:
        out = _causal(query, key, value, scaling, gqa)
    else:
        rows = []
        for b, row in enumerate(segments):
            parts = [_causal(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], scaling, gqa)
                     for s, e in row]
            rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
        out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _causal(query, key, value, scaling, gqa):
    """Causal attention of [B, H, T, D] tensors: block_causal_attention for CPU bf16 within its byte budget."""
    import torch

    batch, heads, width, dim = query.shape
    if (query.dtype == torch.bfloat16 and query.device.type == "cpu"
            and batch * heads * saved_probabilities(width) * 2 <= CPU_BLOCK_ATTENTION_BYTES):
        return block_causal_attention(query, key, value, scaling if scaling is not None else dim ** -0.5)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)


def saved_probabilities(width: int, block: int = ATTENTION_BLOCK) -> int:
    """Probabilities block_causal_attention keeps per head for one sequence of `width` tokens."""
    return sum(min(block, width - s) * min(width, s + block) for s in range(0, width, block))


def block_causal_attention(query, key, value, scale: float):
    """Causal softmax(q k^T * scale) v with grouped-query heads, q [B, H, T, D], k/v [B, Hkv, T, D]."""
    return _block_causal_function().apply(query, key, value, scale)


@functools.cache
def _block_causal_function():
    import torch

    def blocks(width):
        for s in range(0, width, ATTENTION_BLOCK):
            e = min(width, s + ATTENTION_BLOCK)
            yield s, e, torch.ones(e - s, e - s, dtype=torch.bool).triu_(1)

    class BlockCausal(torch.autograd.Function):
        """Query block [s, e) against keys [0, e): the heads sharing a kv head are stacked as rows (one
        matmul per kv head, no repeated k/v); matmuls in bf16, softmax in fp32, probabilities kept.

        The scores come out of the bf16 matmul rounded to bf16 before the fp32 softmax, as in
        transformers' eager attention (CPU matmuls have no fp32 output for bf16 inputs); torch's
        flash kernel keeps them in fp32. On the benchmark the val loss is the same to 1e-4."""

        @staticmethod
        def forward(ctx, q, k, v, scale):
            b, h, t, d = q.shape
            hk = k.shape[1]
            g = h // hk
            acc = torch.promote_types(q.dtype, torch.float32)  # softmax dtype: fp32 (fp64 for fp64 inputs)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            q5 = q.view(b, hk, g, t, d)
            out = torch.empty(b, hk, g, t, d, dtype=q.dtype, device=q.device)
            probs = []
            for s, e, mask in blocks(t):
                scores = torch.matmul(q5[:, :, :, s:e].reshape(b, hk, g * (e - s), d), k[:, :, :e].transpose(-1, -2))
                scores = scores.to(acc).mul_(scale)
                scores.view(b, hk, g, e - s, e)[..., s:e].masked_fill_(mask, float("-inf"))
                p = torch.softmax(scores, dim=-1).to(q.dtype)
                out[:, :, :, s:e] = torch.matmul(p, v[:, :, :e]).view(b, hk, g, e - s, d)
                probs.append(p)
            out = out.view(b, h, t, d)
            ctx.save_for_backward(q, k, v, out, *probs)
            ctx.scale = scale
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, *probs = ctx.saved_tensors
            b, h, t, d = q.shape
            hk = k.shape[1]
            g = h // hk
            acc = torch.promote_types(q.dtype, torch.float32)
            grad_out = grad_out.to(q.dtype).contiguous()
            # softmax backward: dS = P * (dP - rowsum(dO * O))
            delta = (grad_out.to(acc) * out.to(acc)).sum(-1).view(b, hk, g, t)
            q5, do5 = q.view(b, hk, g, t, d), grad_out.view(b, hk, g, t, d)
            dq = torch.empty(b, hk, g, t, d, dtype=q.dtype, device=q.device)
            dk = torch.zeros(b, hk, t, d, dtype=acc, device=q.device)
            dv = torch.zeros(b, hk, t, d, dtype=acc, device=q.device)
            for (s, e, _), p in zip(blocks(t), probs):
                n = e - s
                qb = q5[:, :, :, s:e].reshape(b, hk, g * n, d)
                dob = do5[:, :, :, s:e].reshape(b, hk, g * n, d)
                dv[:, :, :e] += torch.matmul(p.transpose(-1, -2), dob)
                dp = torch.matmul(dob, v[:, :, :e].transpose(-1, -2)).to(acc)
                dp.sub_(delta[:, :, :, s:e].reshape(b, hk, g * n, 1))
                ds = dp.mul_(p).mul_(ctx.scale).to(q.dtype)
                dq[:, :, :, s:e] = torch.matmul(ds, k[:, :, :e]).view(b, hk, g, n, d)
                dk[:, :, :e] += torch.matmul(ds.transpose(-1, -2), qb)
            return dq.view(b, h, t, d), dk.to(k.dtype), dv.to(v.dtype), None

    return BlockCausal


def _cuda_varlen(query, key, value, segments, scaling, gqa):
    """torch's FlashAttention varlen kernel over the flattened tokens (one launch for all examples)."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, width, dim = query.shape
    bounds = [b * width + s for b, row in enumerate(segments) for s, _ in row] + [batch * width]
    cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
    longest = max(e - s for row in segments for s, e in row)

    def flat(t):
        return t.transpose(1, 2).reshape(batch * width, t.shape[1], dim)

    out = varlen_attn(flat(query), flat(key), flat(value), cu, cu, longest, longest,
                      scale=scaling, window_size=(-1, 0), enable_gqa=gqa)
    return out.view(batch, width, heads, dim)
