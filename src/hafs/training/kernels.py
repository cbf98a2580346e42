"""Leaner replacements for a few training-time pieces of transformers + peft, chosen by RunSettings.

Each one computes the same function as the code it replaces (tests compare them) with fewer
passes over memory and fewer saved activations, which is what bounds a small model on a CPU:
- `keep_mask` / `FastDropout`: dropout masks from 16-bit lanes of 64-bit random numbers (numpy's
  SFC64). torch's CPU dropout draws one mt19937 number per element, as slow as the layer's matmuls
  at LoRA widths.
- `lora_forward`: peft's LoRA Linear as one function with its frozen matmul, without the fp32
  input copy, the dropout rescale pass and the `* scaling` pass (both folded into the r-wide side),
  and without keeping a dropped copy of the input per adapter: q, k and v share one saved input and
  keep only their masks.
- `swiglu_mlp_forward`: Qwen2/Llama's MLP keeping gate and up for backward, not also silu(gate).
- `rms_norm_forward`: Llama/Qwen RMSNorm without the fp32 copies of its input.
- `apply_rotary_pos_emb`: Llama/Qwen rotary embedding of q and k as one node with two passes each.
Attention has its own module (attention.py).
"""

from __future__ import annotations

import functools

from .packed_linear import linear, linear_input_grad, packs_for

# --------------------------------------------------------------------------- dropout

def keep_mask(x, p: float):
    """Bool mask of x's shape, True with probability 1 - p (p to within 1/65536), from torch's generator."""
    import torch

    if x.device.type != "cpu":
        return torch.rand(x.shape, device=x.device) >= p  # GPU generators are fast; no trick needed
    import numpy as np

    n = x.numel()
    # 64-bit words from numpy's SFC64, seeded by one draw from torch's generator (so torch.manual_seed
    # and a restored RNG state give the same masks), each split into four 16-bit lanes, compared in
    # numpy: 190 us for a 650 x 512 mask on this CPU, against 530 us with torch's mt19937 random_()
    # and its int16 comparison, and ~1.7 ms for torch.rand / bernoulli_.
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    words = np.random.SFC64(seed).random_raw((n + 3) // 4)
    return torch.from_numpy(words.view(np.int16)[:n] >= round(p * 65536) - 32768).view(x.shape)


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
            return x * keep_mask(x, self.p).view(torch.uint8) * (1.0 / (1.0 - self.p))

        def extra_repr(self) -> str:
            return f"p={self.p}"

    return _FastDropout


# --------------------------------------------------------------------------- LoRA

@functools.cache
def _lora_function():
    import torch

    class LoraLinear(torch.autograd.Function):
        """x Wᵀ + bias + ((x ⊙ keep) Aᵀ)(s·B)ᵀ for a frozen W, saving x (shared by sibling adapters),
        the byte mask and the r-wide h.

        The frozen matmul is inside: its output takes the adapter's term in place (addmm_) and its
        input gradient takes the adapter's (addcmul_), where a separate base Linear costs an output
        copy, a gradient tensor per branch and autograd's adds of them; the mask is converted to the
        compute dtype once per pass, as bf16 x uint8 products convert it on every call (0.8 ms of
        2.1 ms for a 650 x 512 adapter's fwd + bwd here, against 0.1 ms in a bf16 product)."""

        @staticmethod
        def forward(ctx, x, weight, bias, a, b, keep, scale, packs):
            x2 = x.reshape(-1, x.shape[-1])
            out = linear(x2, packs, bias) if packs else torch.nn.functional.linear(x2, weight, bias)
            h = add_adapter(out, x2, a, b, keep, scale)
            ctx.save_for_backward(x, weight, a, b, keep, h)
            ctx.scale, ctx.packs = scale, packs
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            x, weight, a, b, keep, h = ctx.saved_tensors
            x2 = x.reshape(-1, x.shape[-1])
            g2 = grad.reshape(-1, grad.shape[-1]).to(x.dtype)
            dx = None
            if ctx.needs_input_grad[0]:
                # weight is already in the compute dtype (lora_forward)
                dx = linear_input_grad(g2, ctx.packs) if ctx.packs else g2 @ weight
            da, db = adapter_grads(g2, x2, a, b, keep, h, ctx.scale, dx)
            return None if dx is None else dx.view(x.shape), None, None, da, db, None, None, None

    return LoraLinear


def add_adapter(out, x2, a, b, keep, scale: float):
    """out += ((x2 ⊙ keep) Aᵀ)(s·B)ᵀ in place (x2 [M, in], out [M, out], keep bytes or None); returns
    the r-wide h for backward. Shared by LoraLinear and fused_qkv's node."""
    dtype = x2.dtype
    xm = x2 * keep.view(x2.shape).to(dtype) if keep is not None else x2
    h = xm @ a.to(dtype).t()
    out.addmm_(h, (b * scale).to(dtype).t())
    return h


def adapter_grads(g2, x2, a, b, keep, h, scale: float, dx):
    """(dA, dB) of add_adapter's term for its output gradient g2; adds its input gradient into dx
    (the frozen matmul's, in place) unless dx is None. The byte mask is converted once for both uses."""
    dtype = x2.dtype
    dh = g2 @ (b * scale).to(dtype)  # [M, r]
    # (hᵀ g)ᵀ rather than gᵀ h: oneDNN runs the [r, M] x [M, out] product 1.6-1.75x faster on this CPU
    # (54 against 86 µs at 650 tokens, 149 against 260 at 2,800; bench/README.md, "Morning of 2026-11-27").
    db = (h.t() @ g2).t().float().mul_(scale).to(b.dtype)
    keep = keep.view(x2.shape).to(dtype) if keep is not None else None
    da = (dh.t() @ (x2 * keep if keep is not None else x2)).to(a.dtype)
    if dx is not None:
        if keep is None:
            dx.addmm_(dh, a.to(dtype))
        else:
            dx.addcmul_(dh @ a.to(dtype), keep)
    return da, db


def plain_adapter(layer) -> str | None:
    """The one active adapter of a peft lora.Linear that lora_forward computes itself (a plain LoRA over a
    frozen nn.Linear, not merged or disabled); None when peft's own forward must run."""
    import torch

    active = [a for a in layer.active_adapters if a in layer.lora_A]
    base = layer.base_layer
    if (layer.disable_adapters or layer.merged or len(active) != 1 or active[0] in layer.lora_variant
            or getattr(layer, "fan_in_fan_out", False) or layer.lora_bias.get(active[0], False)
            or type(base) is not torch.nn.Linear or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)):
        return None
    return active[0]


def adapter_inputs(layer, name: str, x):
    """(byte keep mask or None, scale) of adapter `name` for input x: dropout drawn here, 1/(1-p) folded
    into the r-wide side with the LoRA scaling."""
    import torch

    p = getattr(layer.lora_dropout[name], "p", 0.0) if layer.training else 0.0
    # Kept as 0/1 bytes (half of a bf16 mask's memory); the nodes convert it once per pass.
    keep = keep_mask(x, p).view(torch.uint8) if p > 0 else None
    return keep, float(layer.scaling[name]) / (1.0 - p)


def lora_forward(self, x, *args, **kwargs):
    """Replacement forward for a peft lora.Linear over a frozen nn.Linear with one plain adapter; peft's
    own forward otherwise."""
    import torch

    from .fused_qkv import grouped_forward

    name = None if args or kwargs else plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    fused = grouped_forward(self, x)  # q, k and v as one node (fused_qkv), when this layer is in such a group
    if fused is not None:
        return fused
    base = self.base_layer
    keep, scale = adapter_inputs(self, name, x)
    dtype = base.weight.dtype if not torch.is_autocast_enabled(x.device.type) else \
        torch.get_autocast_dtype(x.device.type)
    # Pre-packed weights (packed_linear) only where they hold exactly what the matmul would use.
    packs = packs_for(base.weight) if dtype == base.weight.dtype == torch.bfloat16 and x.device.type == "cpu" else None
    return _lora_function().apply(x.to(dtype) if x.dtype != dtype else x, base.weight.to(dtype),
                                  None if base.bias is None else base.bias.to(dtype),
                                  self.lora_A[name].weight, self.lora_B[name].weight, keep, scale, packs)


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


# --------------------------------------------------------------------------- RMSNorm

RMS_NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Qwen2MoeRMSNorm"})
"""transformers classes computing weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype), as rms_norm_forward."""


@functools.cache
def _rms_norm_function():
    import torch

    class RMSNorm(torch.autograd.Function):
        """w * (x * rstd) with rstd from fp32 sums, every full-size pass in x's dtype.

        transformers' RMSNorm makes an fp32 copy of x, squares, averages, scales and casts back,
        and autograd repeats those passes in fp32: 6.5 ms fwd + bwd for 2,800 x 512 bf16 on 2
        cores. Here only the row statistics are fp32 (accumulated straight from x); the per-row
        factors are cast to x's dtype before they touch a full-size tensor, because a bf16 x fp32
        product makes a temporary fp32 copy of its bf16 operand on the CPU (then casts the result
        back): 0.52 against 1.07 ms fwd + bwd for 720 x 512 bf16. The price is one more bf16
        rounding: relative error to an fp64 reference 0.0029 (output) and 0.0033 (input gradient)
        against transformers' 0.0023 and 0.0023. fp32 and fp64 inputs compute in their own dtype."""

        @staticmethod
        def forward(ctx, x, weight, eps):
            acc = torch.promote_types(x.dtype, torch.float32)  # fp32 (fp64 for fp64 inputs)
            rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
            rstd = rstd.square_().div_(x.shape[-1]).add_(eps).rsqrt_().to(x.dtype)
            ctx.save_for_backward(x, weight, rstd)
            normed = x * rstd
            # an fp32 weight over bf16 activations promotes the output, as transformers' module does
            return normed.mul_(weight) if weight.dtype == x.dtype else normed * weight

        @staticmethod
        def backward(ctx, grad):
            x, weight, rstd = ctx.saved_tensors
            d_normed = (grad * weight).to(x.dtype)
            # d/dx of x * rstd(x): rstd * (g - x * rstd² * mean(g * x)); the row sum accumulates in fp32
            acc = torch.promote_types(x.dtype, torch.float32)
            k = (d_normed * x).sum(-1, keepdim=True, dtype=acc).mul_(rstd.to(acc).square()).div_(-x.shape[-1])
            dx = torch.addcmul(d_normed, x, k.to(x.dtype)).mul_(rstd)
            dw = None
            if ctx.needs_input_grad[1]:
                dw = (grad * (x * rstd)).reshape(-1, x.shape[-1]).sum(0, dtype=acc).to(weight.dtype)
            return dx, dw, None

    return RMSNorm


def rms_norm_forward(self, hidden_states):
    """Forward for the RMS_NORMS classes with the leaner RMSNorm function."""
    return _rms_norm_function().apply(hidden_states, self.weight, self.variance_epsilon)


# --------------------------------------------------------------------------- rotary embedding

ROTARY_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral", "qwen2_moe", "qwen3_moe", "mixtral"})
"""Families whose modeling module's apply_rotary_pos_emb is q·cos + rotate_half(q)·sin over the whole head."""


@functools.cache
def _rotary_function():
    import torch

    def rotate(x, cos, sin, transpose: bool):
        """x·cos + rotate_half(x)·sin, or its transpose (for the gradient), written half by half."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
        out = torch.empty_like(x)
        o1, o2 = out[..., :half], out[..., half:]
        if not transpose:  # [x1 c1 - x2 s1, x2 c2 + x1 s2]
            torch.mul(x1, c1, out=o1).addcmul_(x2, s1, value=-1)
            torch.mul(x2, c2, out=o2).addcmul_(x1, s2)
        else:  # [g1 c1 + g2 s2, g2 c2 - g1 s1]
            torch.mul(x1, c1, out=o1).addcmul_(x2, s2)
            torch.mul(x2, c2, out=o2).addcmul_(x1, s1, value=-1)
        return out

    class Rotary(torch.autograd.Function):
        """Rotary embedding of q and k in one node: two passes over each instead of transformers'
        rotate_half copy, two products and a sum (and, in backward, their transposes plus the
        zero-filled slice gradients)."""

        @staticmethod
        def forward(ctx, q, k, cos, sin):
            ctx.save_for_backward(cos, sin)
            return rotate(q, cos, sin, False), rotate(k, cos, sin, False)

        @staticmethod
        def backward(ctx, dq, dk):
            cos, sin = ctx.saved_tensors
            return (None if dq is None else rotate(dq, cos, sin, True),
                    None if dk is None else rotate(dk, cos, sin, True), None, None)

    return Rotary


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *, _original=None):
    """transformers' apply_rotary_pos_emb (ROTARY_MODEL_TYPES) with the leaner Rotary node; the original
    for anything it does not cover (mixed dtypes, partial rotary, gradients into cos/sin)."""
    if (q.dtype != k.dtype or cos.dtype != q.dtype or sin.dtype != q.dtype or cos.requires_grad
            or sin.requires_grad or cos.shape[-1] != q.shape[-1] or q.shape[-1] % 2 or k.shape[-1] != q.shape[-1]):
        return _original(q, k, cos, sin, unsqueeze_dim)
    return _rotary_function().apply(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))


def rotary_modules(model) -> list:
    """The modeling modules whose apply_rotary_pos_emb `model`'s attention layers call (ROTARY_MODEL_TYPES)."""
    import sys

    if getattr(getattr(model, "config", None), "model_type", None) not in ROTARY_MODEL_TYPES:
        return []
    names = {type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")}
    return [sys.modules[n] for n in sorted(names) if hasattr(sys.modules.get(n), "apply_rotary_pos_emb")]


def patch_rotary(model) -> bool:
    """Point the model's modeling module at apply_rotary_pos_emb above (process-wide, same values); True if done."""
    modules = rotary_modules(model)
    for module in modules:
        current = module.apply_rotary_pos_emb
        if not isinstance(current, functools.partial):  # not patched yet
            module.apply_rotary_pos_emb = functools.partial(apply_rotary_pos_emb, _original=current)
    return bool(modules)


def patch_model(model, *, lora: bool = True, swiglu: bool = True, rms_norm: bool = True) -> dict:
    """Install the leaner forwards on a peft model's LoRA layers, SiLU MLPs and RMSNorms; returns counts."""
    import types

    counts = {"lora": 0, "mlp": 0, "rms_norm": 0}
    for module in model.modules():
        if lora and hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "lora_variant"):
            module.forward = types.MethodType(lora_forward, module)
            counts["lora"] += 1
        elif rms_norm and type(module).__name__ in RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(rms_norm_forward, module)
            counts["rms_norm"] += 1
        elif swiglu and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) \
                and getattr(module, "config", None) is not None and getattr(module.config, "hidden_act", "") == "silu":
            module.forward = types.MethodType(swiglu_mlp_forward, module)
            counts["mlp"] += 1
    return counts
