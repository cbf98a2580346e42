"""The leaner training pieces compute what they replace: LoRA Linear, SwiGLU MLP, RMSNorm, dropout masks."""

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


def test_lora_forward_under_bf16_autocast_matches_peft():
    net, layer = lora_layer(alpha=16, r=4)
    layer.base_layer.to(torch.bfloat16)  # frozen weights in bf16, adapters fp32: what training loads
    x = torch.randn(3, 5, 12, requires_grad=True)
    a = layer.lora_A["default"].weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = layer(x)
        ours = kernels.lora_forward(layer, x)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2)
    g1 = torch.autograd.grad(ours.float().sum(), [x, a])
    g2 = torch.autograd.grad(ref.float().sum(), [x, a])
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u.float(), v.float(), rtol=2e-2, atol=2e-2)


def test_lora_forward_leaves_a_trainable_base_layer_to_peft():
    net, layer = lora_layer()
    layer.base_layer.weight.requires_grad_(True)  # e.g. unfrozen on purpose: its gradient must not be lost
    x = torch.randn(4, 12)
    kernels.lora_forward(layer, x).sum().backward()
    assert layer.base_layer.weight.grad is not None and layer.base_layer.weight.grad.abs().sum() > 0


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


@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_equals_qwen2_rms_norm(weight_grad):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    g = torch.Generator().manual_seed(5)
    norm = Qwen2RMSNorm(24, eps=1e-6)
    norm.weight.data = torch.randn(24, generator=g, dtype=torch.float64) * 0.2 + 1
    norm.weight.requires_grad_(weight_grad)
    norm.double()
    x = (torch.randn(3, 7, 24, generator=g, dtype=torch.float64) * 3).requires_grad_()
    grad = torch.randn(3, 7, 24, generator=g, dtype=torch.float64)
    wrt = [x, norm.weight] if weight_grad else [x]
    # fp64 (transformers' RMSNorm would compute it in fp32): the formula itself, to 1e-12
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    ref_grads = torch.autograd.grad(ref, wrt, grad)
    ours = kernels.rms_norm_forward(norm, x)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, wrt, grad), ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # fp32: transformers' module itself
    norm.float()
    xf = x.detach().float().requires_grad_()
    wrt = [xf, norm.weight] if weight_grad else [xf]
    ours, ref = kernels.rms_norm_forward(norm, xf), norm(xf)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, wrt, grad.float()), torch.autograd.grad(ref, wrt, grad.float())):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # bf16 activations: per-row factors are applied in bf16 (one rounding more than transformers'
    # fp32-internal module), so both are held to the fp64 formula on the same bf16 inputs.
    norm.to(torch.bfloat16)
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    exact = x.detach().to(torch.bfloat16).double().requires_grad_()
    w64 = norm.weight.detach().double()
    formula = w64 * (exact * torch.rsqrt(exact.pow(2).mean(-1, keepdim=True) + 1e-6))
    (exact_grad,) = torch.autograd.grad(formula, [exact], grad.bfloat16().double())
    ours, ref = kernels.rms_norm_forward(norm, xb), norm(xb)
    assert ours.dtype == ref.dtype == torch.bfloat16
    (a,), (b,) = torch.autograd.grad(ours, [xb], grad.bfloat16()), torch.autograd.grad(ref, [xb], grad.bfloat16())

    def error(t, truth):
        return float((t.detach().double() - truth.detach()).norm() / truth.detach().norm())

    torch.testing.assert_close(ours.double(), formula, atol=0, rtol=2 ** -6)  # three bf16 roundings at most
    assert error(ours, formula) < max(1.5 * error(ref, formula), 2 ** -8)
    assert error(a, exact_grad) < max(1.5 * error(b, exact_grad), 2 ** -7)


def test_patch_model_replaces_the_rms_norms_of_a_qwen2_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    counts = kernels.patch_model(model, lora=False, swiglu=False)
    assert counts["rms_norm"] == 2 * 2 + 1  # two per layer and the final one
    assert kernels.patch_model(model, rms_norm=False)["rms_norm"] == 0


def test_rotary_equals_transformers_values_and_gradients():
    from transformers.models.qwen2 import modeling_qwen2

    original = modeling_qwen2.apply_rotary_pos_emb
    if hasattr(original, "keywords"):  # patched by an earlier test in this process
        original = original.keywords["_original"]
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 9, 16, generator=g, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.randn(2, 2, 9, 16, generator=g, dtype=torch.float64)
    angles = torch.randn(2, 9, 8, generator=g, dtype=torch.float64)
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos(), emb.sin()
    q.requires_grad_(), k.requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    ref = original(q, k, cos, sin)
    ours = kernels.apply_rotary_pos_emb(q, k, cos, sin, _original=original)
    assert ours[0].stride() == q.stride()  # layout kept: the attention's view of it stays a view
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    ref_grads = torch.autograd.grad(ref, [q, k], [gq, gk])
    for a, b in zip(torch.autograd.grad(ours, [q, k], [gq, gk]), ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # bf16: within a rounding (one rounding here, three in transformers')
    qb, kb, cb, sb = (t.detach().bfloat16() for t in (q, k, cos, sin))
    for a, b in zip(kernels.apply_rotary_pos_emb(qb, kb, cb, sb, _original=original), original(qb, kb, cb, sb)):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2 ** -7)
    # not covered (fp32 tables for bf16 q, k): transformers' own function decides
    mixed = kernels.apply_rotary_pos_emb(qb, kb, cos.float(), sin.float(), _original=original)
    assert torch.equal(mixed[0], original(qb, kb, cos.float(), sin.float())[0])


def test_patch_rotary_keeps_a_qwen2_models_logits_and_gradients():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2 import modeling_qwen2

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).double()
    ids = torch.randint(0, 64, (2, 11))
    before = model(ids).logits
    grads_before = torch.autograd.grad(before.square().sum(), list(model.parameters()))
    original = modeling_qwen2.apply_rotary_pos_emb
    try:
        assert kernels.patch_rotary(model)
        assert kernels.patch_rotary(model)  # idempotent: wraps the original once
        assert modeling_qwen2.apply_rotary_pos_emb.keywords["_original"] is (
            original.keywords["_original"] if hasattr(original, "keywords") else original)
        after = model(ids).logits
        grads_after = torch.autograd.grad(after.square().sum(), list(model.parameters()))
    finally:
        modeling_qwen2.apply_rotary_pos_emb = original
    torch.testing.assert_close(after, before, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads_after, grads_before):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    config = model.config
    config.model_type = "gemma"  # a family it does not cover: nothing patched
    assert not kernels.patch_rotary(model)
