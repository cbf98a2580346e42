"""Frozen bf16 Linear weights pre-packed for oneDNN while training on a CPU (RunSettings.packed_weights).

A bf16 `F.linear` on the CPU hands oneDNN a plain row-major weight, which it reorders into its
blocked layout on every call, forward and backward (the input gradient `g @ W` reorders W again).
The base model is frozen, so `packed_weights(model)` reorders each frozen Linear's weight once, in
both orientations, for the length of a training run; forward and input-gradient matmuls then read
the packed copies (torch.ops.mkldnn._linear_pointwise, the kernel inductor uses after freezing).
Bit-identical results; on this CPU 1-14% faster per matmul at 100-2,000 tokens, 3-5% per training
step (bench/bench_levers.py, lever "packed"). The price is two more copies of those weights while
the run lasts (memory.estimate_memory counts them; memory_check drops packing before a plan would
not fit). They are freed when the run ends, so nothing after training (merging the adapter into
the weights, export) can meet a stale copy. Inside the block the weights must not change: a weight
given new memory or changed in place under no_grad takes the plain matmul, but an in-place edit
through `.data` (peft's merge) cannot be seen, which is why the packs live no longer than the loop.

The packed matmuls run in row pieces of a few fixed sizes (row_pieces), so that oneDNN's primitives,
made per shape, are reused from step to step instead of made again for every new token count.
"""

from __future__ import annotations

import contextlib
import functools

PACK_ROWS_HINT = 512
"""Rows per matmul oneDNN is told to expect when packing (512-2,048 measured alike)."""
_packs: dict[int, tuple] = {}
# id(weight) -> (weight, stamp, forward pack, transposed pack); filled only inside packed_weights().


PIECE_ROWS = 512
"""Most rows per frozen matmul call (a power of two): longer inputs run in pieces (row_pieces)."""
ROW_GRANULE = 32
"""The rows past the whole pieces are rounded up to a multiple of this (a power of two)."""
PIECE_SHAPES = 8 * (PIECE_ROWS // ROW_GRANULE).bit_length()
"""Cache entries the row pieces keep warm: ~8 frozen weight shapes (forward and transposed) x the row_pieces sizes."""
CACHE_ENTRY_BYTES = 1 << 20
"""Resident memory per cached matmul shape (ideep + oneDNN entries: JIT code, scratchpad), measured on this
CPU by bench/memory_accuracy.py: 0.6-1.2 MiB whatever the model's size."""


def primitive_cache_capacity(sequence_length: int) -> int:
    """Cache entries one training step reuses: ~64 for the adapters and loss, PIECE_SHAPES for the frozen
    matmuls' row pieces, and 6 per attention block of the longest example (attention.ATTENTION_BLOCK), 8
    for margin."""
    from .attention import ATTENTION_BLOCK

    return 64 + PIECE_SHAPES + 8 * -(-max(1, int(sequence_length)) // ATTENTION_BLOCK)


def limit_primitive_cache(capacity: int) -> dict:
    """Cap the two caches of matmul primitives, torch's ideep (LRU_CACHE_CAPACITY) and oneDNN's own
    (ONEDNN_PRIMITIVE_CACHE_CAPACITY), at `capacity` entries each, unless the user set them; returns the
    values in effect. Both are read when the first primitive is made, so this must run before the
    process's first CPU matmul (later calls change nothing). See precision.run_settings for the why."""
    import os

    names = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    if capacity > 0:
        for name in names:
            os.environ.setdefault(name, str(int(capacity)))
    return {name: os.environ.get(name) for name in names}


def packable(weight) -> bool:
    """A frozen, plain (not sharded or subclassed), contiguous bf16 CPU matrix."""
    import torch

    return (type(weight) is torch.nn.Parameter or type(weight) is torch.Tensor) and weight.dtype == torch.bfloat16 \
        and weight.device.type == "cpu" and weight.dim() == 2 and not weight.requires_grad and weight.is_contiguous()


def stamp(weight) -> tuple[int, int]:
    """What packing saw of a weight: its memory and its in-place version counter."""
    return weight.data_ptr(), weight._version


def packs_for(weight):
    """(forward pack, transposed pack) of `weight` inside packed_weights(), if the weight is unchanged."""
    entry = _packs.get(id(weight))
    if entry is None or entry[0] is not weight or entry[1] != stamp(weight):
        return None
    return entry[2], entry[3]


def available() -> bool:
    """This torch has oneDNN with bf16 (bf16 on a CPU is chosen from the CPU's flags, not from torch's build)."""
    import torch

    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def packed_weights(model, enabled: bool = True):
    """Pack the frozen bf16 Linear weights of `model` for the duration of the block (see the module doc)."""
    if not enabled or not available():
        yield 0
        return
    import types

    import torch

    from . import fused_qkv

    reorder = torch.ops.mkldnn._reorder_linear_weight
    patched, created, groups = [], [], []
    try:
        # q, k, v with adapters: one stacked pack per attention layer instead of one per projection
        groups = fused_qkv.build(model, reorder, PACK_ROWS_HINT)
        grouped = {id(layer.base_layer.weight) for group in groups for layer in group.layers}
        # LoRA layers' base layers keep their own forward: kernels.lora_forward reads their packs itself
        bases = {id(m.base_layer) for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if type(module) is not torch.nn.Linear or not packable(weight) or id(weight) in _packs \
                    or id(weight) in grouped:
                continue
            detached = weight.detach()
            _packs[id(weight)] = (weight, stamp(weight), reorder(detached, PACK_ROWS_HINT),
                                  reorder(detached.t().contiguous(), PACK_ROWS_HINT))
            created.append(id(weight))
            if "forward" not in module.__dict__ and id(module) not in bases:  # a Linear called directly
                module.forward = types.MethodType(frozen_linear_forward, module)
                patched.append(module)
        yield len(patched)
    finally:
        fused_qkv.release(groups)
        for module in patched:
            if module.__dict__.get("forward") is not None:
                del module.forward
        for key in created:
            _packs.pop(key, None)


def frozen_linear_forward(self, x):
    """nn.Linear.forward through the packed weights when they apply; the plain forward otherwise."""
    import torch

    packs = packs_for(self.weight)
    if packs is None or x.dtype != torch.bfloat16 or x.device.type != "cpu" or self.weight.requires_grad \
            or (self.bias is not None and (self.bias.requires_grad or self.bias.dtype != x.dtype)):
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return _frozen_linear_function().apply(x, self.bias, packs)


def linear(x, packs, bias=None):
    """x Wᵀ + bias through W's forward pack (no autograd)."""
    return _bucketed(x, packs[0], bias)


def linear_input_grad(grad, packs):
    """grad W (the input gradient of x Wᵀ) through W's transposed pack (no autograd)."""
    return _bucketed(grad, packs[1], None)


def row_pieces(rows: int, piece: int = PIECE_ROWS, granule: int = ROW_GRANULE) -> list[int]:
    """Row counts `rows` is computed in: rounded up to `granule`, then whole pieces and the rest split
    into powers of two, so a run meets at most log2(piece / granule) + 1 shapes per weight, each of
    them in most steps. E.g. 1,100 -> [512, 512, 64, 32] (20 rows of padding)."""
    whole, rest = divmod(-(-rows // granule) * granule, piece)
    # rest is a multiple of granule below piece (both powers of two): its set bits are the sizes
    return [piece] * whole + [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]


def _bucketed(x, pack, bias):
    """x @ pack (+ bias) in row_pieces, so that every batch reuses the same few matmul shapes.

    Why: oneDNN makes a primitive per row count (and torch caches it by shape), and a batch's token
    count is new nearly every step: each frozen matmul shape then pays the primitive's creation, on
    this CPU (AMX) 5-22 ms against 0.5-2.8 ms for a 600-row matmul itself. In pieces of a few fixed
    sizes the primitives are made in the first steps and then found in the cache; the price is up to
    ROW_GRANULE - 1 rows of zeros in the last piece and a copy of the outputs of a multi-piece call
    (bench/README.md). Only the last piece is copied to pad it: the others are views of x."""
    import torch

    shape, k = x.shape, x.shape[-1]
    x = x.reshape(-1, k)
    if not x.is_contiguous():
        x = x.contiguous()
    rows = x.shape[0]
    outs, start = [], 0
    for n in row_pieces(rows):
        piece = x[start:start + n]
        real = len(piece)
        if real < n:  # the last piece: padded with rows of zeros (fewer than ROW_GRANULE), their outputs dropped
            piece = torch.cat([piece, piece.new_zeros(n - real, k)])
        outs.append(_matmul(piece, pack, bias)[:real])
        start += n
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(*shape[:-1], out.shape[-1])


def _matmul(x, pack, bias):
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, pack, bias, "none", [], "")


@functools.cache
def _frozen_linear_function():
    import torch

    class FrozenLinear(torch.autograd.Function):
        """x Wᵀ + b for a frozen W and b: only the input gradient, from the transposed pack."""

        @staticmethod
        def forward(ctx, x, bias, packs):
            ctx.packs = packs
            return linear(x, packs, bias)

        @staticmethod
        def backward(ctx, grad):
            return linear_input_grad(grad.to(torch.bfloat16), ctx.packs), None, None

    return FrozenLinear
