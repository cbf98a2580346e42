"""The chunked loss: equal to plain cross-entropy on full logits (value and gradients), labelled positions only."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread

from hafs.training.loss import (
    IGNORE_INDEX,
    causal_lm_loss,
    count_labelled,
    default_chunk_size,
    fused_linear_cross_entropy,
    plain_head,
    select_labelled,
)


def tiny_causal_lm(vocab=96, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).double().float()


def batch_with_prompts(vocab=96, rows=3, width=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    labels = ids.clone()
    for r in range(rows):
        labels[r, : 4 + 3 * r] = IGNORE_INDEX  # prompt
        labels[r, width - 2 * r:] = IGNORE_INDEX  # padding (none in row 0)
    position_ids = torch.arange(width).repeat(rows, 1)
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


def reference_loss(logits, labels):
    """Plain HF-style loss, summed: shift, full logits, ignore -100."""
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_fused_loss_and_gradients_equal_plain_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    n, d, v = 50, 16, 300
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    b = torch.randn(v, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    ours = fused_linear_cross_entropy(h, w, t, bias=b, chunk_size=chunk)
    ours_grads = torch.autograd.grad(ours * 3.0, (h, w, b))  # a non-unit upstream gradient is applied
    ref = torch.nn.functional.cross_entropy(h @ w.T + b, t, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 3.0, (h, w, b))
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5), (ours, ref)
    for a, r in zip(ours_grads, ref_grads):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-5), (a - r).abs().max()


def test_fused_loss_without_grad_matches_and_handles_no_labels():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(10, 8, generator=g), torch.randn(40, 8, generator=g)
    t = torch.randint(0, 40, (10,), generator=g)
    with torch.no_grad():
        ours = fused_linear_cross_entropy(h, w, t, chunk_size=3)
    assert torch.allclose(ours, torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum"), rtol=1e-6)
    empty = fused_linear_cross_entropy(h[:0].requires_grad_(), w, t[:0])
    assert float(empty.detach()) == 0.0


def test_select_labelled_takes_positions_whose_next_token_is_labelled():
    hidden = torch.arange(2 * 5).float().view(2, 5, 1)
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 3, -100, -100, 4]])
    h, t = select_labelled(hidden, labels)
    # row 0: labels at 2, 3 -> hidden 1, 2; row 1: labels at 1, 4 -> hidden 0, 3 (i.e. 5 and 8 flat)
    assert h.view(-1).tolist() == [1.0, 2.0, 5.0, 8.0]
    assert t.tolist() == [7, 8, 3, 4]
    assert count_labelled(labels) == 4


def test_model_loss_equals_full_logits_loss_with_gradients():
    model = tiny_causal_lm()
    batch = batch_with_prompts()
    assert plain_head(model)
    loss, n = causal_lm_loss(model, batch, chunk_size=5)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    ref = reference_loss(logits, batch["labels"])
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters()], allow_unused=True)
    assert n == count_labelled(batch["labels"]) == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-5), (loss, ref)
    checked = 0
    for a, r in zip(grads, ref_grads):
        if r is None:
            continue
        checked += 1
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-6), (a - r).abs().max()
    assert checked >= 10


def test_prompt_and_padding_tokens_do_not_change_the_loss():
    model = tiny_causal_lm()
    batch = batch_with_prompts()
    loss, _ = causal_lm_loss(model, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    # Replace the input token under every padding position (after the last label of rows 1 and 2):
    changed["input_ids"][1, -2:] = 5
    changed["input_ids"][2, -4:] = 6
    again, _ = causal_lm_loss(model, changed)
    assert torch.allclose(loss, again)
    # ...while changing a labelled response token does change it.
    changed["input_ids"][0, 10] = (changed["input_ids"][0, 10] + 1) % 96
    changed["labels"][0, 10] = changed["input_ids"][0, 10]
    assert not torch.allclose(loss, causal_lm_loss(model, changed)[0])


def test_default_chunk_size_keeps_logits_small():
    assert default_chunk_size(16384) == 512
    assert default_chunk_size(151936) == 128
    assert default_chunk_size(100) == 4096
    assert default_chunk_size(151936, "cuda") == 384  # bigger chunks on GPUs: fewer kernel launches


def bf16_case(seed: int, n: int, v: int, spread: float, chunk: int):
    """(bf16 loss, hidden states, head, targets) of fused_linear_cross_entropy's bf16-softmax path."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, 32, generator=g) * spread).bfloat16().requires_grad_()
    w = torch.randn(v, 32, generator=g).bfloat16()
    t = torch.randint(0, v, (n,), generator=g)
    loss = fused_linear_cross_entropy(h, w, t, chunk_size=chunk, compute_dtype=torch.bfloat16, bf16_softmax=True)
    return loss, h, w, t


def test_bf16_loss_path_matches_fp64_cross_entropy():
    # bf16 compute: softmax straight from bf16 logits, each token's loss -log p(target)
    ours, h, w, t = bf16_case(2, 40, 500, 2.0, 16)
    (grad_h,) = torch.autograd.grad(ours * 2.0, (h,))
    hd = h.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(hd @ w.double().T, t, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 2.0, (hd,))
    assert ours.dtype == torch.float32
    assert abs(float(ours.detach()) - float(ref.detach())) / float(ref.detach()) < 1e-4, (ours, ref)
    assert ((grad_h.double() - ref_grad).norm() / ref_grad.norm()) < 1e-2


def test_bf16_loss_path_survives_probabilities_that_underflow():
    # Logits hundreds apart: a target's probability underflows even bf16's range (loss > ~87), so
    # -log p(target) would be inf; that chunk takes max - log(p_max) instead.
    ours, h, w, t = bf16_case(3, 24, 300, 30.0, 8)
    ref = torch.nn.functional.cross_entropy(h.detach().double() @ w.double().T, t, reduction="none")
    assert float(ref.max()) > 100  # the case is real
    assert torch.isfinite(ours)
    assert abs(float(ours.detach()) - float(ref.sum())) / float(ref.sum()) < 1e-2
