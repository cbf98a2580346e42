"""The training loss: cross-entropy on labelled positions only, without full [B, T, V] logits.

A causal LM predicts token t+1 from the hidden state at t, so the positions that matter are the
ones whose *shifted* label is not -100 (responses and EOS; never prompts or padding). We run the
decoder, gather those hidden states (N of them, usually a fraction of B*T) and apply the LM head
and the cross-entropy in chunks of `chunk_size` rows. Logits for prompt and padding positions are
never computed, and at most one chunk of logits exists at a time, so memory is flat in vocabulary
size (Qwen2.5's 151,936-token head is 1.2 GB of fp32 logits for 2,048 tokens otherwise).

`fused_linear_cross_entropy` computes the gradient of each chunk during the forward pass (as
Liger's fused linear cross-entropy does): the chunk's logits are freed at once instead of being
kept for backward, and backward is one multiply. The loss is SUM-reduced: the engine divides by
the number of labelled tokens in the whole optimizer step, so every token weighs the same however
the tokens fall into micro-batches.
"""

from __future__ import annotations

import functools

from .packed_linear import linear, linear_input_grad, packs_for

IGNORE_INDEX = -100
"""Label of positions that are not trained on."""
LOGITS_BUDGET = {"cpu": 1 << 23, "cuda": 1 << 26}
"""Elements of one chunk of fp32 logits: 32 MiB on CPU (stays in cache), 256 MiB on GPUs (fewer launches)."""
# Families whose logits are exactly `lm_head(final hidden state)`: no softcapping, no logit scale.
# Others (Gemma 2/3 softcap, Cohere/Granite scale, ...) take the plain path through the model.
PLAIN_HEAD_MODEL_TYPES = frozenset({
    "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral", "mixtral", "phi3", "starcoder2",
    "olmo", "olmo2", "smollm3", "gpt_neox", "stablelm", "deepseek_v3",
})


def default_chunk_size(vocab_size: int, device: str = "cpu") -> int:
    """Rows per chunk: LOGITS_BUDGET / vocab, a multiple of 64 between 128 and 4096."""
    rows = LOGITS_BUDGET.get(str(device).split(":")[0], LOGITS_BUDGET["cpu"]) // max(1, vocab_size)
    return max(128, min(4096, rows // 64 * 64))


def count_labelled(labels) -> int:
    """Positions the loss is computed on: shifted labels that are not IGNORE_INDEX."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def select_labelled(hidden, labels):
    """(hidden states [N, d], targets [N]) of the positions whose next token is labelled.

    `labels` are unshifted (HF convention): the hidden state at t is scored against labels[t + 1].
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def fused_linear_cross_entropy(hidden, weight, targets, *, bias=None, chunk_size: int | None = None,
                               compute_dtype=None, bf16_softmax: bool = False):
    """sum_i CE(hidden[i] @ weight.T + bias, targets[i]), chunked; differentiable in hidden (and weight, bias).

    `compute_dtype` is the dtype of the two matmuls (default: the weight's); softmax arithmetic and the
    sum are fp32. `bf16_softmax` (RunSettings.bf16_loss_softmax; used with bf16 compute, no bias, when
    gradients are needed) runs the softmax on the bf16 logits inside torch's kernel, which computes in
    fp32 and writes bf16 probabilities. Gradients are computed chunk by chunk in the forward pass when
    autograd needs them.
    """
    import torch

    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float()
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.device.type)
    dtype = compute_dtype or weight.dtype
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:
        with torch.no_grad():
            return _chunks(hidden, weight, bias, targets, chunk, dtype, grads=False)[0]
    return _make_function().apply(hidden, weight, bias, targets, chunk, dtype, bf16_softmax)


def _chunks(hidden, weight, bias, targets, chunk: int, dtype, grads: bool, bf16_softmax: bool = False):
    """Loss sum, and the gradients of hidden / weight / bias when `grads`."""
    import torch

    w = weight.to(dtype)
    # The head's pre-packed copies inside a training run (packed_linear), when they are what w holds.
    packs = packs_for(weight) if dtype == weight.dtype == torch.bfloat16 and bias is None else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if grads and hidden.requires_grad else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads and weight.requires_grad else None
    grad_b = torch.zeros_like(bias, dtype=torch.float32) if grads and bias is not None and bias.requires_grad else None
    # Autocast off: the casts are explicit, and the softmax must stay fp32 whatever the context.
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(dtype)
            t = targets[start:start + chunk]
            if grads and bf16_softmax and dtype == torch.bfloat16 and bias is None:
                # bf16 logits straight into torch's softmax (fp32 arithmetic inside, bf16 out: the
                # gradient's dtype) instead of an fp32 copy and five passes over it. Each token's
                # loss is -log p(target), read off the probabilities: within bf16's 2^-9 relative
                # rounding of p, i.e. 0.002 absolute per token (lse - logit would carry the bf16
                # logit's rounding, ~0.03 at |logit| ~ 10), and no pass for the row maxima. A
                # probability that underflowed (loss > ~87) falls back to max - log(p_max), p_max
                # >= 1/vocab, for that chunk.
                logits = linear(h, packs) if packs else h @ w.T
                probs = torch.softmax(logits, dim=1)
                picked = probs.gather(1, t[:, None]).float()
                if bool((picked > 0).all()):
                    total -= picked.log_().sum()
                else:
                    peak, top = logits.max(dim=1, keepdim=True)
                    lse = peak.float() - probs.gather(1, top).float().log()
                    total += (lse - logits.gather(1, t[:, None]).float()).sum()
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                _chunk_grads(probs, h, w, hidden, grad_h, grad_w, start, chunk, packs)
                continue
            logits = (h @ w.T).float()
            if bias is not None:
                logits += bias.float()
            picked = logits.gather(1, t[:, None]).squeeze(1)
            # In place: max, exp, sum, divide on the one buffer -> probabilities (softmax) and lse.
            peak = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(peak).exp_()
            norm = probs.sum(dim=1, keepdim=True)
            total += (norm.log() + peak).squeeze(1).sub(picked).sum()
            if not grads:
                continue
            # d CE / d logits = softmax - onehot(target)
            probs.div_(norm)
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            _chunk_grads(probs.to(dtype), h, w, hidden, grad_h, grad_w, start, chunk)
            if grad_b is not None:
                grad_b += probs.sum(0)
    return total, grad_h, grad_w, grad_b


def _chunk_grads(d_logits, h, w, hidden, grad_h, grad_w, start: int, chunk: int, packs=None) -> None:
    """One chunk's share of the hidden-state and weight gradients, from d CE / d logits (`packs`: the
    head's packed copies, packed_linear, for the hidden-state gradient)."""
    if grad_h is not None:
        d_hidden = linear_input_grad(d_logits, packs) if packs else d_logits @ w
        grad_h[start:start + chunk] = d_hidden.to(hidden.dtype)
    if grad_w is not None:
        grad_w += (d_logits.T @ h).float()


@functools.cache  # built on first use: importing this module stays torch-free
def _make_function():
    import torch

    class FusedLinearCE(torch.autograd.Function):
        """Loss in forward with the gradients precomputed; backward scales them by the incoming grad."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, chunk, dtype, bf16_softmax):
            total, grad_h, grad_w, grad_b = _chunks(hidden, weight, bias, targets, chunk, dtype, grads=True,
                                                    bf16_softmax=bf16_softmax)
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w, grad_b = ctx.saved_tensors
            g = grad_out
            gh = None if grad_h is None else grad_h * g.to(grad_h.dtype)
            gw = None if grad_w is None else (grad_w * g).to(ctx.dtypes[0])
            gb = None if grad_b is None else (grad_b * g).to(ctx.dtypes[1])
            return gh, gw, gb, None, None, None, None

    return FusedLinearCE


def plain_head(model) -> bool:
    """Whether `model`'s logits are `lm_head(decoder(x))` with a frozen plain Linear head.

    Then `causal_lm_loss` may skip the model's own head; otherwise (a LoRA on lm_head, a trained
    head, softcapped or scaled logits) it runs the model whole.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return (getattr(base.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES
            and type(head) is torch.nn.Linear and not getattr(base.config, "final_logit_softcapping", None))


def causal_lm_loss(model, batch: dict, *, chunk_size: int | None = None, compute_dtype=None, plain: bool | None = None,
                   bf16_softmax: bool = False):
    """(summed cross-entropy over labelled positions, number of them) for one micro-batch.

    `batch` holds input_ids, labels and position_ids (no attention mask: packed examples are kept
    apart through position_ids). The loss tensor is fp32; divide it by the step's token count.
    `bf16_softmax`: see fused_linear_cross_entropy.
    """
    import torch

    labels = batch["labels"]
    n = count_labelled(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if plain is None:
        plain = plain_head(model)
    if plain:
        hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
        head = base.get_output_embeddings()
        h, targets = select_labelled(hidden, labels)
        loss = fused_linear_cross_entropy(h, head.weight, targets, bias=head.bias, chunk_size=chunk_size,
                                          compute_dtype=compute_dtype or hidden.dtype, bf16_softmax=bf16_softmax)
        return loss, n
    logits = model(**inputs, use_cache=False).logits
    h, targets = select_labelled(logits, labels)
    return torch.nn.functional.cross_entropy(h.float(), targets, reduction="sum"), n
