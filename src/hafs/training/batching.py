"""Which examples go into which micro-batch (a pure function of the epoch), and tensors for one.

`plan_batches` decides the order of one epoch from (lengths, batch shape, seed, epoch) alone, so a
resumed run finds its place from (epoch, micro_batch_index) without saving any sampler state.

Two layouts, both with little padding:
- packing: examples are packed into rows of at most `sequence_length` tokens (best-fit
  decreasing); a row holds several examples that cannot see each other (see `collate`).
- no packing: one example per row, rows of similar length batched together (sorted within
  shuffled mega-chunks, as HF's length-grouped sampler does), so padding is small.

`collate` returns `input_ids`, `labels` and `position_ids` and deliberately NO `attention_mask`:
with position_ids restarting at 0 at every example, transformers (>= 4.54) builds a block-diagonal
causal mask from them (`masking_utils.find_packed_sequence_indices`) for eager and sdpa. That
detection only runs when there is no KV cache, so the model MUST be called with
`use_cache=False` (or `model.config.use_cache = False`) — with a cache, packed examples attend to
each other. Padding positions continue the last example's positions, so an unpacked batch is not
mistaken for a packed one and sdpa keeps its fast `is_causal` path. Right padding needs no mask:
under a causal mask no real token can see a later pad, and pads are never targets.
"""

from __future__ import annotations

import bisect

import numpy as np

LENGTH_GROUP_CHUNK = 64
"""Micro-batches per mega-chunk that is sorted by length (bigger: less padding, less randomness)."""
PAD_MULTIPLE = 8
"""Batch width is rounded up to a multiple of this (tensor-core and kernel friendly)."""
IGNORE_INDEX = -100
"""Label of positions that are not trained on (the loss ignores them)."""
FORWARD_KWARGS = {"use_cache": False}
"""Pass these to the model's forward with a collated batch (packed examples stay separate)."""


def plan_batches(lengths: np.ndarray, *, batch_size: int, sequence_length: int, packing: bool,
                 seed: int, epoch: int) -> list[list[list[int]]]:
    """Micro-batches of one epoch: each a list of rows, each row a list of example indices.

    Every example appears exactly once. Deterministic in its arguments; the micro-batch with the
    most tokens comes first, so running out of memory happens at step 1, not hours in.
    E.g. lengths [5, 3, 4], batch_size 2, sequence_length 8, packing: one micro-batch holding the
    rows [0, 1] (8 tokens) and [2] (4 tokens), in a seeded order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if batch_size < 1 or sequence_length < 1:
        raise ValueError("batch_size and sequence_length must be >= 1")
    if len(lengths) == 0:
        return []
    if lengths.max() > sequence_length:
        raise ValueError(f"an example has {int(lengths.max())} tokens, over sequence_length {sequence_length}")
    rng = np.random.default_rng([abs(int(seed)), int(epoch)])
    if packing:
        rows = pack(lengths, sequence_length, rng)
        rows = [rows[i] for i in rng.permutation(len(rows))]
        batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    else:
        order = rng.permutation(len(lengths))
        chunk = batch_size * LENGTH_GROUP_CHUNK
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(-lengths[part], kind="stable")].tolist()
            batches += [[[i] for i in part[j:j + batch_size]] for j in range(0, len(part), batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
    cost = [len(b) * max(int(lengths[row].sum()) for row in b) for b in batches]
    first = int(np.argmax(cost))
    return [batches[first]] + batches[:first] + batches[first + 1:]


def pack(lengths: np.ndarray, capacity: int, rng: np.random.Generator) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows of at most `capacity` tokens.

    Equal lengths are ordered randomly (by `rng`), so rows differ between epochs.
    """
    perm = rng.permutation(len(lengths))
    order = perm[np.argsort(-lengths[perm], kind="stable")].tolist()
    sizes = lengths.tolist()
    smallest = int(lengths.min())
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row) of rows that can still take something
    for i in order:
        size = sizes[i]
        k = bisect.bisect_left(free, (size, -1))
        if k < len(free):
            space, row = free.pop(k)
            rows[row].append(i)
        else:
            space, row = capacity, len(rows)
            rows.append([i])
        space -= size
        if space >= smallest:
            bisect.insort(free, (space, row))
    return rows


def collate(tokenized, rows: list[list[int]], pad_id: int, *, pad_multiple: int = PAD_MULTIPLE) -> dict:
    """Tensors of one micro-batch: {"input_ids", "labels", "position_ids"}, each Long[B, T].

    T is the longest row rounded up to `pad_multiple`; rows are right-padded with `pad_id`.
    Labels are not shifted (the model shifts them) and are -100 on prompts, padding and every
    example's first token. position_ids restart at 0 at each example. Call the model with
    `**batch, **FORWARD_KWARGS` (see the module docstring for why `use_cache=False`).

    Example: rows [[0, 1]] with example 0 = prompt [7, 8] + response [9, EOS=2] and example 1 = text
    [5, 6, 2] gives input_ids [[7, 8, 9, 2, 5, 6, 2, pad]], labels [[-100, -100, 9, 2, -100, 6, 2, -100]],
    position_ids [[0, 1, 2, 3, 0, 1, 2, 3]].
    """
    import torch

    offsets, ids_flat, mask_flat = tokenized.offsets, tokenized.input_ids, tokenized.label_mask
    row_lens = [int(sum(offsets[i + 1] - offsets[i] for i in row)) for row in rows]
    width = max(row_lens)
    width = -(-width // pad_multiple) * pad_multiple if pad_multiple > 1 else width
    batch = len(rows)
    input_ids = np.full((batch, width), pad_id, dtype=np.int64)
    labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty((batch, width), dtype=np.int64)
    arange = np.arange(2 * width, dtype=np.int64)
    for b, row in enumerate(rows):
        t = n = 0
        for i in row:
            s, e = int(offsets[i]), int(offsets[i + 1])
            n = e - s
            ids = ids_flat[s:e]
            input_ids[b, t:t + n] = ids
            labels[b, t:t + n] = np.where(mask_flat[s:e], ids, IGNORE_INDEX)
            position_ids[b, t:t + n] = arange[:n]
            t += n
        position_ids[b, t:] = arange[n:n + width - t]
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids)}


def end_to_end(rows: list[list[int]]) -> list[list[int]]:
    """A micro-batch's rows laid end to end as one row (padding-free; position_ids keep examples apart).

    E.g. [[3], [0, 2], [1]] -> [[3, 0, 2, 1]].
    """
    return [[i for row in rows for i in row]]


def padding_waste(lengths: np.ndarray, batches: list[list[list[int]]], pad_multiple: int = PAD_MULTIPLE) -> float:
    """Fraction of the batch tensors' cells that are padding (for logs and benchmarks)."""
    lengths = np.asarray(lengths)
    real = cells = 0
    for b in batches:
        row_lens = [int(lengths[row].sum()) for row in b]
        width = -(-max(row_lens) // pad_multiple) * pad_multiple
        real += sum(row_lens)
        cells += width * len(b)
    return 1 - real / cells if cells else 0.0
