"""The leaner training pieces compute what they replace: LoRA Linear, SwiGLU MLP, dropout masks, attention."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread

from hafs.training import kernels


def lora_layer(alpha=16, r=4, dropout=0.0, seed=0):
    """A peft lora.Linear (in 12, out 10) with non-zero B, inside a tiny module."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 10)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(seed)
    net = get_peft_model(Net(), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"],
                                           init_lora_weights=False))
    return net, net.base_model.model.proj


def test_lora_forward_equals_peft_values_and_gradients():
    net, layer = lora_layer(alpha=16, r=4)  # scaling 4: the folded scale must match
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    net.double()
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    ref = layer(x)
    ref_grads = torch.autograd.grad((ref ** 2).sum(), [x] + params)
    ours = kernels.lora_forward(layer, x)
    grads = torch.autograd.grad((ours ** 2).sum(), [x] + params)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_lora_forward_with_dropout_uses_the_mask_and_rescales(monkeypatch):
    net, layer = lora_layer(alpha=8, r=4, dropout=0.25)
    net.double().train()
    x = torch.randn(2, 6, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 6, 12, generator=torch.Generator().manual_seed(1)) >= 0.25
    monkeypatch.setattr(kernels, "keep_mask", lambda t, p: mask)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ours = kernels.lora_forward(layer, x)
    ref = layer.base_layer(x) + ((x * mask / 0.75) @ a.T @ b.T) * 2.0
    torch.testing.assert_close(ours, ref)
    g1 = torch.autograd.grad(ours.sum(), [x, a, b])
    g2 = torch.autograd.grad(ref.sum(), [x, a, b])
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v)
    layer.eval()  # no dropout in eval mode: the mask is not used
    torch.testing.assert_close(kernels.lora_forward(layer, x), layer.base_layer(x) + (x @ a.T @ b.T) * 2.0)


def test_patched_lora_layer_still_honours_disabled_adapters():
    net, layer = lora_layer()
    counts = kernels.patch_model(net)
    assert counts["lora"] == 1
    x = torch.randn(4, 12)
    with net.disable_adapter():
        torch.testing.assert_close(net(x), layer.base_layer(x))
    assert not torch.allclose(net(x), layer.base_layer(x))


def test_swiglu_mlp_equals_qwen2_mlp():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    torch.manual_seed(0)
    mlp = Qwen2MLP(Qwen2Config(hidden_size=16, intermediate_size=40)).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    ref = mlp(x)
    ref_grads = torch.autograd.grad((ref ** 2).sum(), [x] + list(mlp.parameters()), allow_unused=True)
    ours = kernels.swiglu_mlp_forward(mlp, x)
    grads = torch.autograd.grad((ours ** 2).sum(), [x] + list(mlp.parameters()), allow_unused=True)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_keep_mask_probability_and_determinism():
    x = torch.empty(400_003)  # not a multiple of 4: the last word is partly used
    torch.manual_seed(3)
    m = kernels.keep_mask(x, 0.1)
    assert m.shape == x.shape and m.dtype == torch.bool
    assert abs(float(m.float().mean()) - 0.9) < 0.003
    torch.manual_seed(3)
    assert torch.equal(kernels.keep_mask(x, 0.1), m)
    assert bool(kernels.keep_mask(x, 0.0).all())


@pytest.mark.parametrize("width", [1, 7, 128, 129, 300])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_block_causal_attention_equals_causal_sdpa_in_values_and_gradients(width, kv_heads):
    # float64: the blocks, the stacked query groups and the softmax backward are exact, not just close
    g = torch.Generator().manual_seed(width)
    q = torch.randn(2, 4, width, 16, generator=g, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.randn(2, kv_heads, width, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, width, 16, generator=g, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))  # q non-contiguous, as transformers passes it
    ours = kernels.block_causal_attention(q, k, v, 0.3)
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
        ours = kernels._causal(q, k, v, None, True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                           enable_gqa=True)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref, atol=1e-2, rtol=1e-2)
    probabilities = [t for t in saved if t.dim() == 4 and t.shape[-1] != 16]
    assert sum(t.numel() for t in probabilities) == 2 * 4 * kernels.saved_probabilities(200)
    assert kernels.saved_probabilities(200) == 128 * 128 + 72 * 200 and kernels.saved_probabilities(5) == 25
    # over the budget: torch's flash kernel, which keeps no probabilities
    long = 4096
    assert 2 * 4 * kernels.saved_probabilities(long) * 2 > kernels.CPU_BLOCK_ATTENTION_BYTES
    q, k, v = (torch.randn(2, h, long, 16).bfloat16().requires_grad_() for h in (4, 2, 2))
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels._causal(q, k, v, None, True)
    assert not [t for t in saved if t.dim() == 4 and t.shape[-1] == long]


def test_row_segments_split_at_position_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert kernels.row_segments(pos) == [[(0, 3), (3, 5), (5, 9)], [(0, 9)]]
