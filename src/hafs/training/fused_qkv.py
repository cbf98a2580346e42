"""The q, k and v projections and their LoRA adapters as one autograd node (CPU training, packed weights).

transformers' attention calls q_proj, k_proj and v_proj one after the other on the same hidden
states. While packed_linear.packed_weights() holds the packed frozen weights, the three weights of an
attention layer whose q, k and v all carry plain adapters are also packed as one [q; k; v] matrix,
and q_proj's call computes all three: one GEMM forward and one for the input gradient instead of
three each (k and v are narrow: 128 columns on the benchmark, where a GEMM runs below the matmul
rate), no autograd sum of three input gradients, one node instead of three. k_proj's and v_proj's
calls then return their parts, matched by the identity of the input tensor; any other call takes
the per-layer path. Dropout masks are drawn in the same order (q, k, v) from the same generator,
so the values equal the per-layer path's up to the rounding of the input gradient's sum.
"""

from __future__ import annotations

import functools

from .packed_linear import linear, linear_input_grad, packable, stamp

_groups: dict[int, Group] = {}
# id(lora layer) -> its group, filled only inside packed_linear.packed_weights().


class Group:
    """One attention layer's q, k, v LoRA layers with their stacked packed weight."""

    def __init__(self, layers, packs, bias):
        self.layers = layers
        """(q_proj, k_proj, v_proj): peft lora.Linear layers, in transformers' call order."""
        self.stamps = [stamp(layer.base_layer.weight) for layer in layers]
        """The base weights as packed (packed_linear.stamp): a changed weight sends calls to the per-layer path."""
        self.sizes = tuple(layer.base_layer.out_features for layer in layers)
        """Output columns of each in the stacked weight."""
        self.packs = packs
        """(forward, transposed) packs of the stacked frozen weight (packed_linear)."""
        self.bias = bias
        """The stacked bf16 bias, or None."""
        self.stash: list | None = None
        """[input, k output, v output, grad mode] after q_proj's call, until k_proj and v_proj take theirs."""

    def unchanged(self) -> bool:
        return all(stamp(layer.base_layer.weight) == s for layer, s in zip(self.layers, self.stamps))


def build(model, reorder, hint: int) -> list[Group]:
    """Groups for every attention module whose q/k/v are plain LoRA layers over frozen bf16 Linears."""
    import torch

    from .kernels import lora_forward

    groups = []
    for module in model.modules():
        layers = tuple(getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj"))
        if not all(getattr(getattr(layer, "forward", None), "__func__", None) is lora_forward for layer in layers) \
                or any(id(layer) in _groups for layer in layers):  # already grouped by an enclosing block
            continue
        # OLMo's clip_qkv clamps the projections' outputs in place; this node's outputs are views of one tensor
        if getattr(getattr(module, "config", None), "clip_qkv", None) is not None:
            continue
        bases = [layer.base_layer for layer in layers]
        if not all(type(b) is torch.nn.Linear and packable(b.weight) for b in bases) \
                or len({b.in_features for b in bases}) != 1 or len({b.bias is None for b in bases}) != 1 \
                or any(b.bias is not None and (b.bias.requires_grad or b.bias.dtype != torch.bfloat16) for b in bases):
            continue
        stacked = torch.cat([b.weight.detach() for b in bases])
        packs = (reorder(stacked, hint), reorder(stacked.t().contiguous(), hint))
        bias = None if bases[0].bias is None else torch.cat([b.bias.detach() for b in bases])
        groups.append(Group(layers, packs, bias))
    # Registered only once all are built: a failure above (out of memory) leaves nothing behind.
    for group in groups:
        for layer in group.layers:
            _groups[id(layer)] = group
    return groups


def release(groups) -> None:
    """Forget `groups` (their packs and any stashed outputs)."""
    for group in groups:
        group.stash = None
        for layer in group.layers:
            if _groups.get(id(layer)) is group:
                del _groups[id(layer)]


def grouped_forward(layer, x):
    """`layer`'s output through its group's node, or None when the per-layer path must run."""
    group = _groups.get(id(layer))
    if group is None:
        return None
    import torch

    from .kernels import adapter_inputs, plain_adapter

    position = group.layers.index(layer)
    if position:  # k_proj or v_proj: their part of the node q_proj ran on this very input
        stash = group.stash
        if stash is None or stash[0] is not x or stash[position] is None or stash[3] != torch.is_grad_enabled():
            return None
        out, stash[position] = stash[position], None
        if stash[1] is None and stash[2] is None:
            group.stash = None
        return out
    group.stash = None
    names = [plain_adapter(member) for member in group.layers]
    autocast = torch.is_autocast_enabled(x.device.type)
    if None in names or x.device.type != "cpu" or (x.dtype if not autocast else
                                                   torch.get_autocast_dtype("cpu")) != torch.bfloat16 \
            or not group.unchanged():
        return None
    given, x = x, x.to(torch.bfloat16)
    adapters = []
    for member, name in zip(group.layers, names):
        keep, scale = adapter_inputs(member, name, x)  # q's, k's, v's masks in that order, as per layer
        adapters += [member.lora_A[name].weight, member.lora_B[name].weight, keep, scale]
    q, k, v = _qkv_function().apply(x, group.bias, group.sizes, group.packs, *adapters)
    # k_proj and v_proj take their parts only when called on this very tensor in the same grad mode
    group.stash = [given, k, v, torch.is_grad_enabled()]
    return q


@functools.cache
def _qkv_function():
    import torch

    from .kernels import adapter_grads, add_adapter

    class QKVLora(torch.autograd.Function):
        """[q, k, v] = x [Wq; Wk; Wv]ᵀ + b + per adapter ((x ⊙ keep) Aᵀ)(s·B)ᵀ, as kernels.LoraLinear does
        for one layer; saves x once, the byte masks and the r-wide h of each adapter."""

        @staticmethod
        def forward(ctx, x, bias, sizes, packs, *adapters):
            x2 = x.reshape(-1, x.shape[-1])
            out = linear(x2, packs, bias)
            parts = out.split(sizes, dim=1)
            saved = []
            for part, (a, b, keep, scale) in zip(parts, zip(*[iter(adapters)] * 4)):
                saved += [a, b, keep, add_adapter(part, x2, a, b, keep, scale)]
            ctx.save_for_backward(x, *saved)
            ctx.packs, ctx.sizes, ctx.scales = packs, sizes, adapters[3::4]
            return tuple(part.view(*x.shape[:-1], part.shape[1]) for part in parts)

        @staticmethod
        def backward(ctx, *grads):
            x, *saved = ctx.saved_tensors
            x2 = x.reshape(-1, x.shape[-1])
            rows = x2.shape[0]
            g = torch.cat([gr.reshape(rows, n).to(x.dtype) if gr is not None else x2.new_zeros(rows, n)
                           for gr, n in zip(grads, ctx.sizes)], dim=1)
            dx = linear_input_grad(g, ctx.packs) if ctx.needs_input_grad[0] else None
            out = []
            for gi, (a, b, keep, h), scale in zip(g.split(ctx.sizes, dim=1), zip(*[iter(saved)] * 4), ctx.scales):
                out += [*adapter_grads(gi, x2, a, b, keep, h, scale, dx), None, None]
            return (None if dx is None else dx.view(x.shape), None, None, None, *out)

    return QKVLora
