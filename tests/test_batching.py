"""Epoch plans (packing, length grouping), collation, and packed-vs-unpacked equivalence on Qwen2."""

from __future__ import annotations

import numpy as np
import pytest

from hafs.training.batching import FORWARD_KWARGS, IGNORE_INDEX, collate, end_to_end, padding_waste, plan_batches
from hafs.training.data import SplitStats
from hafs.training.tokenize import TokenizedSplit, TokenStats

VOCAB = 96
EOS = 2
PAD = 1


def make_split(lengths, prompt_lengths=None, seed: int = 0) -> TokenizedSplit:
    """A tokenized split with random ids: example i has prompt_lengths[i] prompt tokens, then response + EOS."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    prompt_lengths = np.asarray(prompt_lengths if prompt_lengths is not None else lengths // 2)
    ids, mask = [], []
    for n, p in zip(lengths, prompt_lengths):
        ex = rng.integers(3, VOCAB, size=n).astype(np.int32)
        ex[-1] = EOS
        m = np.arange(n) >= p
        m[0] = False
        ids.append(ex)
        mask.append(m)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedSplit(split="train", input_ids=np.concatenate(ids), label_mask=np.concatenate(mask),
                          offsets=offsets, lines=np.arange(1, len(lengths) + 1, dtype=np.int32),
                          raw=SplitStats(split="train", path="x"), stats=TokenStats(examples=len(lengths)))


def long_tailed(n: int, cap: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(4.6, 0.6, size=n).astype(np.int64), 4, cap)


# ----------------------------------------------------------------------------- plan_batches

@pytest.mark.parametrize("packing", [True, False])
def test_plan_covers_every_example_once_and_is_deterministic(packing):
    lengths = long_tailed(1000, 512)
    kw = dict(batch_size=4, sequence_length=512, packing=packing, seed=7)
    plan = plan_batches(lengths, epoch=0, **kw)
    flat = [i for batch in plan for row in batch for i in row]
    assert sorted(flat) == list(range(1000))
    assert all(1 <= len(batch) <= 4 for batch in plan)
    assert all(lengths[row].sum() <= 512 for batch in plan for row in batch)
    if not packing:
        assert all(len(row) == 1 for batch in plan for row in batch)
        assert len(plan) == 250
    assert plan_batches(lengths.copy(), epoch=0, **kw) == plan  # a pure function: resume relies on it
    other = plan_batches(lengths, epoch=1, **kw)
    assert other != plan and sorted(i for b in other for r in b for i in r) == list(range(1000))
    assert plan_batches(lengths, epoch=0, **{**kw, "seed": 8}) != plan
    # the micro-batch with the most tokens comes first (out-of-memory surfaces at step 1)
    cost = [len(b) * max(lengths[r].sum() for r in b) for b in plan]
    assert cost[0] == max(cost)


def test_packing_fills_rows():
    lengths = long_tailed(2000, 1024, seed=3)
    plan = plan_batches(lengths, batch_size=4, sequence_length=1024, packing=True, seed=0, epoch=0)
    rows = [r for b in plan for r in b]
    lower_bound = int(np.ceil(lengths.sum() / 1024))
    assert len(rows) <= lower_bound * 1.03 + 1
    assert padding_waste(lengths, plan) < 0.05


def test_length_grouping_cuts_padding():
    lengths = long_tailed(2000, 1024, seed=4)
    grouped = plan_batches(lengths, batch_size=8, sequence_length=1024, packing=False, seed=0, epoch=0)
    rng = np.random.default_rng(0)
    order = rng.permutation(2000).tolist()
    shuffled = [[[i] for i in order[j:j + 8]] for j in range(0, 2000, 8)]
    assert padding_waste(lengths, grouped) < 0.15 < padding_waste(lengths, shuffled)


def test_plan_edge_cases():
    assert plan_batches(np.array([], dtype=np.int64), batch_size=2, sequence_length=8, packing=True,
                        seed=0, epoch=0) == []
    assert plan_batches(np.array([8]), batch_size=2, sequence_length=8, packing=True, seed=0, epoch=0) == [[[0]]]
    with pytest.raises(ValueError):
        plan_batches(np.array([9]), batch_size=2, sequence_length=8, packing=False, seed=0, epoch=0)


# ----------------------------------------------------------------------------- collate

def test_collate_labels_positions_and_padding():
    split = make_split([4, 3, 6], prompt_lengths=[2, 0, 3])
    batch = collate(split, [[0, 1], [2]], pad_id=PAD)
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see batching docstring
    assert ids.shape == labels.shape == pos.shape == (2, 8) and ids.dtype == labels.dtype == pos.dtype
    e0, e1, e2 = (split.example(i)[0].tolist() for i in range(3))
    assert ids[0].tolist() == e0 + e1 + [PAD]
    assert ids[1].tolist() == e2 + [PAD, PAD]
    # -100 on prompts, on every example's first token and on padding; the response and EOS kept
    assert labels[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, e0[2], EOS, IGNORE_INDEX, e1[1], EOS, IGNORE_INDEX]
    assert labels[1].tolist() == [IGNORE_INDEX] * 3 + [e2[3], e2[4], EOS, IGNORE_INDEX, IGNORE_INDEX]
    # positions restart per example; padding continues the last example's positions
    assert pos[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert pos[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_packed_labels_never_cross_a_boundary():
    """HF shifts labels: logits at t are scored against labels[t+1]. At an example's first position the
    label must be -100, else the previous example's last token would learn to predict it."""
    lengths = long_tailed(300, 256, seed=5)
    split = make_split(lengths, prompt_lengths=np.zeros(300, dtype=int))  # prompt-less: worst case
    plan = plan_batches(split.lengths, batch_size=4, sequence_length=256, packing=True, seed=0, epoch=0)
    starts = 0
    for micro in plan:
        batch = collate(split, micro, pad_id=PAD)
        pos, labels = batch["position_ids"], batch["labels"]
        for b, row in enumerate(micro):
            t = 0
            for i in row:
                assert pos[b, t] == 0 and labels[b, t] == IGNORE_INDEX
                starts += 1
                t += int(split.lengths[i])
            assert (labels[b, t:] == IGNORE_INDEX).all()
    assert starts == 300


# ----------------------------------------------------------------------------- model equivalence

def tiny_qwen2(attn: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    model.set_attn_implementation(attn)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_unpacked(attn):
    import torch

    model = tiny_qwen2(attn)
    lengths = [13, 7, 21, 5, 9, 30, 4]
    split = make_split(lengths, prompt_lengths=[3, 0, 10, 2, 4, 12, 1], seed=1)
    plan = plan_batches(split.lengths, batch_size=2, sequence_length=40, packing=True, seed=0, epoch=0)
    assert any(len(row) > 1 for b in plan for row in b)  # something really is packed

    reference, ref_loss_sum, ref_count = {}, 0.0, 0
    with torch.no_grad():
        for i in range(len(lengths)):
            alone = collate(split, [[i]], pad_id=PAD, pad_multiple=1)
            out = model(**alone, **FORWARD_KWARGS)
            reference[i] = out.logits[0]
            n = int((alone["labels"][0, 1:] != IGNORE_INDEX).sum())
            ref_loss_sum += float(out.loss) * n
            ref_count += n
        packed_sum, packed_count = 0.0, 0
        for micro in plan:
            batch = collate(split, micro, pad_id=PAD)
            out = model(**batch, **FORWARD_KWARGS)
            for b, row in enumerate(micro):
                t = 0
                for i in row:
                    n = lengths[i]
                    torch.testing.assert_close(out.logits[b, t:t + n], reference[i], atol=1e-5, rtol=0)
                    t += n
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            packed_sum += float(out.loss) * n
            packed_count += n
    assert packed_count == ref_count
    assert abs(packed_sum - ref_loss_sum) / ref_count < 1e-5


def test_unpacked_padded_batch_equals_single_examples():
    import torch

    model = tiny_qwen2("sdpa")
    split = make_split([11, 3, 17], seed=2)
    with torch.no_grad():
        batch = collate(split, [[0], [1], [2]], pad_id=PAD)
        logits = model(**batch, **FORWARD_KWARGS).logits
        for b, n in enumerate([11, 3, 17]):
            alone = model(**collate(split, [[b]], pad_id=PAD, pad_multiple=1), **FORWARD_KWARGS).logits[0]
            torch.testing.assert_close(logits[b, :n], alone, atol=1e-5, rtol=0)


def test_padding_free_micro_batch_equals_its_padded_rows():
    # The rows of a micro-batch laid end to end in one row (RunSettings.padding_free): the same
    # loss and gradients as the padded batch, with hafs's per-example CPU attention.
    import torch

    from hafs.training import attention
    from hafs.training.loss import causal_lm_loss

    attention.register_varlen_attention()
    model = tiny_qwen2(attention.VARLEN_ATTENTION).train()
    split = make_split([13, 7, 21, 5, 30], prompt_lengths=[3, 0, 10, 2, 4], seed=3)
    rows = [[4], [2], [0], [1], [3]]
    assert end_to_end(rows) == [[4, 2, 0, 1, 3]]
    padded, flat = collate(split, rows, pad_id=PAD), collate(split, end_to_end(rows), pad_id=PAD)
    assert flat["input_ids"].shape == (1, 80) and padded["input_ids"].shape == (5, 32)
    results = []
    for batch in (padded, flat):
        model.zero_grad()
        loss, n = causal_lm_loss(model, batch)
        loss.backward()
        results.append((float(loss.detach()), n, [p.grad.clone() for p in model.parameters()]))
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b == int(split.label_mask.sum())
    assert abs(loss_a - loss_b) < 1e-5 * n_a
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
