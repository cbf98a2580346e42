"""Per-example CPU attention: block kernel, budgets, packed rows gathered into groups, all equal to sdpa."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread

from hafs.training import attention


@pytest.mark.parametrize("width", [1, 7, 64, 65, 128, 300])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_block_causal_attention_equals_causal_sdpa_in_values_and_gradients(width, kv_heads):
    # float64: the blocks, the stacked query groups and the softmax backward are exact, not just close
    g = torch.Generator().manual_seed(width)
    q = torch.randn(2, 4, width, 16, generator=g, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.randn(2, kv_heads, width, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, width, 16, generator=g, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))  # q non-contiguous, as transformers passes it
    ours = attention.block_causal_attention(q, k, v, 0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3,
                                                           enable_gqa=kv_heads != 4)
    grad = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_cpu_bf16_attention_takes_the_block_kernel_within_its_budget_and_keeps_what_it_counts():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 200, 16, generator=g).bfloat16().requires_grad_()
    k = torch.randn(2, 2, 200, 16, generator=g).bfloat16().requires_grad_()
    v = torch.randn(2, 2, 200, 16, generator=g).bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = attention._causal(q, k, v, None, True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                           enable_gqa=True)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref, atol=1e-2, rtol=1e-2)
    probabilities = [t for t in saved if t.shape[-1] != 16]  # [B * kv heads, rows, keys] per block
    assert sum(t.numel() for t in probabilities) == 2 * 4 * attention.saved_probabilities(200)
    assert attention.saved_probabilities(200) == 64 * (64 + 128 + 192) + 8 * 200
    assert attention.saved_probabilities(5) == 25
    # over the budget: torch's flash kernel, which keeps no probabilities
    long = 4096
    assert 2 * 4 * attention.saved_probabilities(long) * 2 > attention.CPU_BLOCK_ATTENTION_BYTES
    q, k, v = (torch.randn(2, h, long, 16).bfloat16().requires_grad_() for h in (4, 2, 2))
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attention._causal(q, k, v, None, True)
    assert not [t for t in saved if t.shape[-1] == long and t.dtype == torch.bfloat16]  # (its lse is fp32)


def test_row_segments_split_at_position_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert attention.row_segments(pos) == [[(0, 3), (3, 5), (5, 9)], [(0, 9)]]


def test_length_groups_batch_similar_lengths_within_padding_and_memory_budgets():
    assert attention.length_groups([100, 10, 98, 12], heads=8) == [[0, 2], [1, 3]]
    assert attention.length_groups([50], heads=8) == [[0]]
    lengths = [120, 118, 40, 119, 300, 39, 5]
    groups = attention.length_groups(lengths, heads=8)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) * longest <= 1.25 * sum(lengths[i] for i in g) or len(g) == 1
    # the kept probabilities of a group stay within the per-call budget
    long = [1024] * 4
    big = attention.length_groups(long, heads=8)
    assert len(big) > 1
    assert all(len(g) * 8 * attention.saved_probabilities(1024) * 2 <= attention.CPU_BLOCK_ATTENTION_BYTES for g in big)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_packed_rows_attention_equals_each_example_alone(dtype):
    # Rows holding several examples (packing, or a micro-batch laid end to end): the examples are
    # gathered into padded groups; each must attend only to itself, in values and gradients.
    g = torch.Generator().manual_seed(4)
    # row 0: examples of 30, 3, 140, 29 and 5 tokens, then 3 padding tokens continuing the last one's
    # positions; row 1: examples of 200 and 10 tokens. Width 210.
    width = 210
    pos = torch.tensor([sum((list(range(n)) for n in row), []) for row in ([30, 3, 140, 29, 8], [200, 10])])
    heads, kv, dim = 4, 2, 16
    q = torch.randn(2, width, heads, dim, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, width, kv, dim, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(2, width, kv, dim, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    module = torch.nn.Module()
    module.is_causal = True
    attention._batch_cache["position_ids"] = None
    out, _ = attention.varlen_attention_forward(module, q, k, v, None, scaling=0.25, position_ids=pos)
    assert out.shape == (2, width, heads, dim)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    segments = attention.row_segments(pos)
    assert len(attention._batch_cache["plans"][heads][0]) > 1  # several groups: outputs put back in order
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-2, rtol=2e-2)
    for b, row in enumerate(segments):
        for s, e in row:
            qs, ks, vs = (t[b:b + 1, :, s:e].detach().double().requires_grad_() for t in (q, k, v))
            ref = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.25,
                                                                   enable_gqa=True)
            ref_grads = torch.autograd.grad(ref, (qs, ks, vs), grad[b:b + 1, s:e].transpose(1, 2).double())
            torch.testing.assert_close(out[b:b + 1, s:e].transpose(1, 2).double(), ref, **tol)
            for ours, r in zip(grads, ref_grads):
                torch.testing.assert_close(ours[b:b + 1, :, s:e].double(), r, **tol)


def test_one_example_per_row_over_the_budget_goes_in_slices_of_block_attention(monkeypatch):
    # Rows of one example each whose probabilities fit one by one but not all at once: the rows run in
    # slices that fit, through the block kernel (the memory estimate counts its probabilities), not the
    # flash kernel; values and gradients equal sdpa's.
    g = torch.Generator().manual_seed(5)
    batch, heads, kv, width, dim = 3, 4, 2, 100, 16
    one_row = heads * attention.saved_probabilities(width) * 2
    monkeypatch.setattr(attention, "CPU_BLOCK_ATTENTION_BYTES", 2 * one_row)  # two rows fit, three do not
    pos = torch.arange(width).repeat(batch, 1)
    q = torch.randn(batch, width, heads, dim, generator=g).bfloat16().transpose(1, 2).requires_grad_()
    k, v = (torch.randn(batch, width, kv, dim, generator=g).bfloat16().transpose(1, 2).requires_grad_() for _ in "kv")
    module = torch.nn.Module()
    module.is_causal = True
    attention._batch_cache["position_ids"] = None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, _ = attention.varlen_attention_forward(module, q, k, v, None, scaling=0.25, position_ids=pos)
    kept = [t for t in saved if t.dtype == torch.bfloat16 and t.dim() == 1]  # the block kernel's probabilities
    assert sorted(t.numel() for t in kept) == [n * heads * attention.saved_probabilities(width) for n in (1, 2)]
    grad = torch.randn(out.shape, generator=g).bfloat16()
    grads = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=0.25, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad.transpose(1, 2).double())
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=2e-2, rtol=2e-2)
    for ours, r in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), r, atol=2e-2, rtol=2e-2)
