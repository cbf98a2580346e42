"""Per-example causal attention for training batches, registered with transformers (`VARLEN_ATTENTION`).

- `varlen_attention_forward`: causal attention within each example of packed rows (position_ids
  restart at 0), with no T×T mask; torch's FlashAttention varlen kernel on CUDA. On the CPU, the
  examples of such rows are gathered into zero-padded groups of similar length (`length_groups`)
  and each group runs as one batched call.
- `block_causal_attention`: CPU bf16 attention in query blocks, keeping the probabilities for
  backward: torch's CPU flash kernel recomputes them and runs at 10-15% of the bf16 matmul rate
  here; this is 1.7-2.6x faster fwd + bwd at 128-1,024 tokens, for memory the estimate counts.
"""

from __future__ import annotations

import functools

VARLEN_ATTENTION = "hafs_varlen_sdpa"
"""Name under which `register_varlen_attention` registers per-example attention with transformers."""
ATTENTION_BLOCK = 64
"""Query rows per block of `block_causal_attention`. Its diagonal blocks are computed whole, so smaller
blocks waste less; fwd + bwd on this CPU, 64 against 128: 5-25% faster at 120-1,000 tokens."""
CPU_BLOCK_ATTENTION_BYTES = 32 << 20
"""Saved probabilities (bf16) per attention call up to which CPU attention uses block_causal_attention
(length_groups keeps its groups within it); an example too long for it alone takes torch's flash
kernel, which keeps none. With 8 heads: examples up to ~2,000 tokens."""


_registered = False
# All layers see one batch: its position_ids tensor, the segments found in it, its gather plans by head count.
_batch_cache: dict = {"position_ids": None, "segments": None, "plans": {}}


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
    if _batch_cache["position_ids"] is not position_ids:
        pos = position_ids if position_ids.shape[0] == batch else position_ids.expand(batch, -1)
        _batch_cache.update(position_ids=position_ids, segments=row_segments(pos), plans={})
    return _batch_cache["segments"]


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """Causal attention within each example of packed rows; transformers' sdpa for anything else.

    query [B, H, T, D], key/value [B, Hkv, T, D] → ([B, T, H, D], None), as sdpa_attention_forward.
    """
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
        return _causal(query, key, value, scaling, gqa).transpose(1, 2).contiguous(), None
    plans = _batch_cache["plans"]
    if heads not in plans:
        plans[heads] = _gather_plan(segments, width, heads, query.device)
    return _grouped_causal(query, key, value, plans[heads], scaling, gqa), None


def length_groups(lengths: list[int], heads: int, slack: float = 1.25) -> list[list[int]]:
    """Indices of `lengths` in groups of similar length, each run as one zero-padded batch.

    Longest first, a group takes the next example while its padded size (members x longest) stays
    within `slack` x its real tokens and, for bf16 CPU attention, its kept probabilities within
    CPU_BLOCK_ATTENTION_BYTES. Members are listed in their original order. E.g. lengths
    [100, 10, 98, 12] -> [[0, 2], [1, 3]].
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            longest = lengths[group[0]]
            n = len(group) + 1
            fits = n * longest <= slack * (sum(lengths[j] for j in group) + lengths[i])
            if fits and (within_block_budget(n, heads, longest) or not within_block_budget(1, heads, longest)):
                group.append(i)
                continue
        groups.append([i])
    return [sorted(g) for g in groups]


def _gather_plan(segments, width: int, heads: int, device):
    """Index tensors that move packed rows' examples into padded groups and back."""
    import torch

    spans = [(b * width + s, e - s) for b, row in enumerate(segments) for s, e in row]
    groups, placed = [], []
    for group in length_groups([n for _, n in spans], heads):
        longest = max(spans[i][1] for i in group)
        # Padding slots read token 0: causal attention keeps them from every real query, their
        # outputs are dropped, and their gradients are exactly zero (no output gradient reaches a
        # dropped row, and every real row's probability on them is exp(-inf) = 0).
        take = torch.zeros(len(group), longest, dtype=torch.long)
        real = []
        for j, i in enumerate(group):
            start, n = spans[i]
            take[j, :n] = torch.arange(start, start + n)
            real.append(torch.arange(j * longest, j * longest + n))
            placed.append(take[j, :n])
        groups.append((len(group), longest, take.view(-1).to(device), torch.cat(real).to(device)))
    # Each group's outputs come out in its own order; with several groups they are put back in row order.
    order = None
    if len(groups) > 1:
        placed = torch.cat(placed)
        order = torch.empty_like(placed)
        order[placed] = torch.arange(len(placed))
        order = order.to(device)
    return groups, order


def _tokens(t):
    """[B, H, T, D] -> [B * T, H, D]: one row per token (a view for what transformers passes)."""
    return t.transpose(1, 2).reshape(t.shape[0] * t.shape[2], t.shape[1], t.shape[3])


def _grouped_causal(query, key, value, plan, scaling, gqa):
    """Causal attention within each example of packed rows, similar lengths batched.

    Run one by one, short examples cost a dozen small ops each per layer (fwd + bwd); gathered
    into zero-padded groups (length_groups) they run as one batched call per group.
    query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D].
    """
    import torch

    batch, heads, width, dim = query.shape
    groups, order = plan
    flat = [_tokens(t) for t in (query, key, value)]
    parts = []
    for n, longest, take, real in groups:
        q, k, v = (f.index_select(0, take).view(n, longest, f.shape[1], dim).transpose(1, 2) for f in flat)
        out = _causal(q, k, v, scaling, gqa).transpose(1, 2).reshape(n * longest, heads, dim)
        parts.append(out.index_select(0, real))
    out = parts[0] if len(parts) == 1 else torch.cat(parts).index_select(0, order)
    return out.view(batch, width, heads, dim)


def _causal(query, key, value, scaling, gqa):
    """Causal attention of [B, H, T, D] tensors: block_causal_attention for CPU bf16 within its byte budget.

    A batch over the budget whose single rows fit runs in slices of rows that do (each row is its own
    sequence): the memory estimate counts probabilities for every row that fits alone, and the block
    kernel is 1.7-2.6x faster than the flash one."""
    import torch

    batch, heads, width, dim = query.shape
    cpu_bf16 = query.dtype == torch.bfloat16 and query.device.type == "cpu"
    rows = rows_within_block_budget(heads, width) if cpu_bf16 else 0
    if rows:
        scale = scaling if scaling is not None else dim ** -0.5
        if rows >= batch:
            return block_causal_attention(query, key, value, scale)
        return torch.cat([block_causal_attention(query[i:i + rows], key[i:i + rows], value[i:i + rows], scale)
                          for i in range(0, batch, rows)])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)


def within_block_budget(batch: int, heads: int, width: int) -> bool:
    """block_causal_attention keeps at most CPU_BLOCK_ATTENTION_BYTES of bf16 probabilities for this call."""
    return batch <= rows_within_block_budget(heads, width)


def rows_within_block_budget(heads: int, width: int) -> int:
    """Most rows of `width` tokens whose bf16 probabilities one block_causal_attention call may keep."""
    return CPU_BLOCK_ATTENTION_BYTES // (heads * saved_probabilities(width) * 2)


def saved_probabilities(width: int, block: int = ATTENTION_BLOCK) -> int:
    """Probabilities block_causal_attention keeps per head for one sequence of `width` tokens."""
    return sum(min(block, width - s) * min(width, s + block) for s in range(0, width, block))


def block_causal_attention(query, key, value, scale: float):
    """Causal softmax(q k^T * scale) v with grouped-query heads, q [B, H, T, D], k/v [B, Hkv, T, D]."""
    return _block_causal_function().apply(query, key, value, scale)


@functools.cache
def _block_causal_function():
    import torch

    @functools.lru_cache(maxsize=ATTENTION_BLOCK)
    def above_diagonal(n: int):
        return torch.ones(n, n, dtype=torch.bool).triu_(1)  # made once per size, not per block and layer

    def blocks(width):
        for s in range(0, width, ATTENTION_BLOCK):
            e = min(width, s + ATTENTION_BLOCK)
            yield s, e, above_diagonal(e - s)

    def gemm(a, b, scale, out=None):
        """Batched a @ b with the scale applied inside the GEMM (no extra pass, one rounding)."""
        return torch.baddbmm(torch.empty((), dtype=a.dtype, device=a.device).expand(1, 1, 1), a, b,
                             beta=0, alpha=scale, out=out)

    def scratch(like, rows: int, width: int):
        """One buffer for the largest block's [rows, width] matrices, reused by every block."""
        return torch.empty(rows * min(ATTENTION_BLOCK, width) * width, dtype=like.dtype, device=like.device)

    class BlockCausal(torch.autograd.Function):
        """Query block [s, e) against keys [0, e): the heads sharing a kv head are stacked as rows (one
        matmul per kv head, no repeated k/v); probabilities kept for backward.

        The scores leave the GEMM scaled and rounded to the input dtype once (as in transformers'
        eager attention; CPU GEMMs have no fp32 output for bf16 inputs); softmax and its backward
        run on them with fp32 arithmetic inside torch's kernels, which write bf16: no fp32 copies
        of the T x T blocks (1.2-1.9x faster than upcasting them, and closer to an fp64 reference).

        All blocks' probabilities live in one buffer allocated up front, and every block's scores
        (and, backward, its dP and dS) in one reused scratch buffer: allocated block by block, the
        growing sizes left freed scores the allocator could not reuse (tiny model, one 2,048-token
        example, 35 MB of probabilities: peak 229 → 204 MiB, bench/memory_accuracy.py)."""

        @staticmethod
        def forward(ctx, q, k, v, scale):
            b, h, t, d = q.shape
            hk = k.shape[1]
            g = h // hk
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            q5 = q.view(b, hk, g, t, d)
            out = torch.empty(b, hk, g, t, d, dtype=q.dtype, device=q.device)
            kept = torch.empty(b * h * saved_probabilities(t), dtype=q.dtype, device=q.device)
            work = scratch(q, b * h, t)
            offset = 0
            for s, e, mask in blocks(t):
                n = e - s
                size = b * h * n * e
                scores = gemm(q5[:, :, :, s:e].reshape(b * hk, g * n, d), k[:, :, :e].reshape(b * hk, e, d).mT,
                              scale, out=work[:size].view(b * hk, g * n, e))
                scores.view(b, hk, g, n, e)[..., s:e].masked_fill_(mask, float("-inf"))
                p = torch.ops.aten._softmax.out(scores, -1, False, out=kept[offset:offset + size].view_as(scores))
                out[:, :, :, s:e] = torch.bmm(p, v[:, :, :e].reshape(b * hk, e, d)).view(b, hk, g, n, d)
                offset += size
            ctx.save_for_backward(q, k, v, kept)
            ctx.scale = scale
            return out.view(b, h, t, d)

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, kept = ctx.saved_tensors
            b, h, t, d = q.shape
            hk = k.shape[1]
            g = h // hk
            acc = torch.promote_types(q.dtype, torch.float32)
            grad_out = grad_out.to(q.dtype).contiguous()
            q5, do5 = q.view(b, hk, g, t, d), grad_out.view(b, hk, g, t, d)
            dq = torch.empty(b, hk, g, t, d, dtype=q.dtype, device=q.device)
            dk = torch.zeros(b, hk, t, d, dtype=acc, device=q.device)
            dv = torch.zeros(b, hk, t, d, dtype=acc, device=q.device)
            work_dp, work_ds = scratch(q, b * h, t), scratch(q, b * h, t)
            offset = 0
            for s, e, _ in blocks(t):
                n = e - s
                size = b * h * n * e
                p = kept[offset:offset + size].view(b * hk, g * n, e)
                offset += size
                qb = q5[:, :, :, s:e].reshape(b * hk, g * n, d)
                dob = do5[:, :, :, s:e].reshape(b * hk, g * n, d)
                dv[:, :, :e] += torch.bmm(p.mT, dob).view(b, hk, e, d)
                dp = torch.bmm(dob, v[:, :, :e].reshape(b * hk, e, d).mT, out=work_dp[:size].view_as(p))
                # P * (dP - rowsum(dP * P))
                ds = torch.ops.aten._softmax_backward_data.out(dp, p, -1, q.dtype, grad_input=work_ds[:size].view_as(p))
                dq[:, :, :, s:e] = gemm(ds, k[:, :, :e].reshape(b * hk, e, d), ctx.scale).view(b, hk, g, n, d)
                dk[:, :, :e] += torch.bmm(ds.mT, qb).view(b, hk, e, d)
            return dq.view(b, h, t, d), dk.mul_(ctx.scale).to(k.dtype), dv.to(v.dtype), None

    return BlockCausal


def _cuda_varlen(query, key, value, segments, scaling, gqa):
    """torch's FlashAttention varlen kernel over the flattened tokens (one launch for all examples)."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, width, dim = query.shape
    bounds = [b * width + s for b, row in enumerate(segments) for s, _ in row] + [batch * width]
    cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
    longest = max(e - s for row in segments for s, e in row)
    out = varlen_attn(_tokens(query), _tokens(key), _tokens(value), cu, cu, longest, longest,
                      scale=scaling, window_size=(-1, 0), enable_gqa=gqa)
    return out.view(batch, width, heads, dim)
