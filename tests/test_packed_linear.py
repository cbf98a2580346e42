"""Pre-packed frozen weights (packed_linear): the same numbers, only inside the training run, counted in memory."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread

from hafs.training import kernels, model_loading, packed_linear  # noqa: E402
from hafs.training import loss as loss_module  # noqa: E402
from hafs.training.loss import causal_lm_loss  # noqa: E402
from hafs.training.memory import estimate_memory  # noqa: E402
from hafs.training.memory_check import check_plan  # noqa: E402

if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
    pytest.skip("this CPU has no oneDNN bf16 (packing is only used where it has)", allow_module_level=True)


def lora_model(dropout=0.1):
    """A bf16 Qwen2 (biased q/k/v, tied head) with LoRA on q, v and o, patched with hafs's kernels."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    base.to(torch.bfloat16).requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "o_proj"]))
    kernels.patch_model(model)
    return model


def step(model, batch):
    """Loss and the adapter gradients of one micro-batch (dropout masks drawn from seed 1)."""
    torch.manual_seed(1)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = causal_lm_loss(model, batch, compute_dtype=torch.bfloat16, bf16_softmax=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def batch():
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :10] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(40)[None]}


def test_packed_training_step_is_bit_identical_and_uses_the_packs(monkeypatch):
    model, b = lora_model(), batch()
    plain_loss, plain_grads = step(model, b)
    calls = []
    original = packed_linear.linear
    monkeypatch.setattr(packed_linear, "linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(kernels, "linear", packed_linear.linear)
    monkeypatch.setattr(loss_module, "linear", packed_linear.linear)
    with packed_linear.packed_weights(model) as patched:
        # the Linears called directly get the packed forward: k_proj, gate, up, down per layer and the LM
        # head; the LoRA layers' base layers are read through their packs by kernels.lora_forward
        assert patched == 2 * 4 + 1
        packed_loss, packed_grads = step(model, b)
        head = model.get_base_model().lm_head.weight
        assert packed_linear.packs_for(head) is not None
    # every frozen matmul of the forward went through a pack: 7 Linears x 2 layers + the head's chunk
    assert len(calls) == 2 * 7 + 1
    assert torch.equal(packed_loss, plain_loss)
    assert packed_grads.keys() == plain_grads.keys() and len(plain_grads) == 2 * 3 * 2
    for name, grad in plain_grads.items():
        assert torch.equal(packed_grads[name], grad), name
        assert grad.abs().sum() > 0, name
    # nothing is left behind: packs freed, plain forwards back
    assert packed_linear._packs == {} and packed_linear.packs_for(head) is None
    assert not [m for m in model.modules() if "forward" in m.__dict__ and type(m) is torch.nn.Linear]


def test_frozen_linear_input_gradient_matches_f_linear():
    torch.manual_seed(3)
    layer = torch.nn.Linear(48, 80).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 30, 48, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, 30, 80, dtype=torch.bfloat16)
    (expected,) = torch.autograd.grad(torch.nn.functional.linear(x, layer.weight, layer.bias), [x], grad)
    with packed_linear.packed_weights(layer) as patched:
        assert patched == 1
        out = layer(x)
        (got,) = torch.autograd.grad(out, [x], grad)
    assert torch.equal(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert torch.equal(got, expected)


def test_row_pieces_cover_every_row_count_with_a_handful_of_shapes():
    sizes = set()
    for rows in range(1, 3000):
        pieces = packed_linear.row_pieces(rows)
        assert 0 <= sum(pieces) - rows < packed_linear.ROW_GRANULE, rows
        tail = pieces[rows // 512:]  # after the whole pieces: one more whole one, or distinct smaller sizes
        assert tail == [512] or len(set(tail)) == len(tail) and all(n < 512 for n in tail), rows
        sizes.update(pieces)
    assert sizes == {512, 256, 128, 64, 32}
    assert packed_linear.row_pieces(1100) == [512, 512, 64, 32]


@pytest.mark.parametrize("rows", [7, 512, 1100])
def test_frozen_matmuls_run_in_fixed_row_pieces_with_the_same_numbers(monkeypatch, rows):
    """Whatever the token count, the packed matmuls only see the row_pieces sizes (cached primitives),
    and forward and input gradient are those of F.linear."""
    torch.manual_seed(4)
    layer = torch.nn.Linear(48, 80).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(1, rows, 48, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, rows, 80, dtype=torch.bfloat16)
    seen = []
    original = packed_linear._matmul
    monkeypatch.setattr(packed_linear, "_matmul", lambda x2, *a: seen.append(x2.shape[0]) or original(x2, *a))
    with packed_linear.packed_weights(layer):
        out = layer(x)
        (got,) = torch.autograd.grad(out, [x], grad)
    assert seen == 2 * packed_linear.row_pieces(rows)  # forward, then the input gradient
    (expected,) = torch.autograd.grad(torch.nn.functional.linear(x, layer.weight, layer.bias), [x], grad)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_weights_that_cannot_or_no_longer_match_their_pack_take_the_plain_matmul():
    trainable = torch.nn.Linear(16, 16).to(torch.bfloat16)  # requires grad: never packed
    fp32 = torch.nn.Linear(16, 16).requires_grad_(False)
    frozen = torch.nn.Linear(16, 16).to(torch.bfloat16).requires_grad_(False)
    net = torch.nn.Sequential(trainable, fp32, frozen)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with packed_linear.packed_weights(net) as patched:
        assert patched == 1
        assert packed_linear.packs_for(trainable.weight) is None and packed_linear.packs_for(fp32.weight) is None
        # the weight's memory replaced (as a load or merge would): its pack no longer applies
        frozen.weight.data = torch.randn(16, 16, dtype=torch.bfloat16)
        assert packed_linear.packs_for(frozen.weight) is None
        assert torch.equal(frozen(x), torch.nn.functional.linear(x, frozen.weight, frozen.bias))
    with packed_linear.packed_weights(net, enabled=False) as patched:
        assert patched == 0 and packed_linear._packs == {}


QWEN = {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": True}


@pytest.mark.parametrize("batch", [1, 2])
def test_the_estimate_counts_two_copies_of_the_linears_and_the_join_of_row_pieces(batch):
    """Two packed copies of every frozen Linear and the head; and with more tokens than one row piece, the
    widest frozen output (the MLP's, 8,960) once more while its pieces are joined."""
    args = dict(sequence_length=512, batch_size=batch, lora_r=8, lora_targets=["q_proj", "v_proj"],
                precision="bf16", gradient_checkpointing=False, packing=True, device_kind="cpu")
    plain, packed = estimate_memory(QWEN, **args), estimate_memory(QWEN, **args, packed_weights=True)
    linears = 28 * (1536 * 1536 * 2 + 2 * 1536 * 256 + 3 * 1536 * 8960) + 151936 * 1536
    assert packed.weights_gb - plain.weights_gb == pytest.approx(2 * 2 * linears / 2**30)
    joined = 0 if batch == 1 else 1024 * 8960 * 2
    assert packed.activations_gb - plain.activations_gb == pytest.approx(joined / 2**30)
    assert "packed copies" in packed.render()


def test_check_plan_gives_up_packing_before_anything_else():
    from pathlib import Path

    from hafs.training.loader import load_config
    from hafs.training.memory_check import estimate_for_plan
    from hafs.training.plan import resolve

    plan = resolve(load_config(Path(__file__).resolve().parents[1] / "config" / "training.toml"), "oracle-rauru-mac")
    plan.gradient_checkpointing = False
    settings = types.SimpleNamespace(device="cpu", precision="bf16", attn_implementation="sdpa",
                                     autocast_dtype="bfloat16", gradient_checkpointing=False, loss_chunk_size=None,
                                     packed_weights=True)
    with_packs = estimate_for_plan(plan, QWEN, settings=settings).total_gb
    settings.packed_weights = False
    without = estimate_for_plan(plan, QWEN, settings=settings).total_gb
    assert with_packs > without
    logged = []
    settings.packed_weights = True
    plan.hardware.available_memory_gb = with_packs + 1
    check_plan(plan, settings, log=logged.append, model_config=QWEN)
    assert settings.packed_weights and logged == []
    plan.hardware.available_memory_gb = (with_packs + without) / 2
    estimate = check_plan(plan, settings, log=logged.append, model_config=QWEN)
    assert settings.packed_weights is False and not estimate.settings["packed_weights"]
    assert any("not pre-packed" in line for line in logged)


def test_qkv_of_an_attention_layer_run_as_one_node_with_the_per_layer_results(monkeypatch):
    from hafs.training import fused_qkv

    model, b = lora_model_qkv(), batch()
    monkeypatch.setattr(fused_qkv, "build", lambda *a: [])
    with packed_linear.packed_weights(model):
        per_layer_loss, per_layer_grads = step(model, b)
    monkeypatch.undo()
    nodes = []
    original = fused_qkv._qkv_function()
    monkeypatch.setattr(fused_qkv, "_qkv_function", lambda: type("Counted", (), {
        "apply": staticmethod(lambda *a: nodes.append(1) or original.apply(*a))}))
    with packed_linear.packed_weights(model):
        assert len({id(g) for g in fused_qkv._groups.values()}) == 2  # one per layer
        loss, grads = step(model, b)
        assert all(g.stash is None for g in fused_qkv._groups.values())  # k and v took their parts
    assert len(nodes) == 2 and fused_qkv._groups == {}
    # Same masks (drawn q, k, v in order) and the same GEMM columns: the loss is bit-identical; the
    # input gradient is one sum instead of three roundings, so gradients agree to bf16 precision.
    assert torch.equal(loss, per_layer_loss)
    for name, grad in per_layer_grads.items():
        if grad.abs().sum() > 0:
            assert float((grads[name] - grad).float().norm() / grad.float().norm()) < 1.5e-2, name
        else:
            assert grads[name].abs().sum() == 0, name


def lora_model_qkv():
    """As lora_model, with adapters on q, k, v and o (the attention layers' q/k/v form fused_qkv groups)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    base.to(torch.bfloat16).requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    kernels.patch_model(model)
    return model


def test_k_or_v_called_on_another_input_take_the_per_layer_path():
    from hafs.training import fused_qkv

    model = lora_model_qkv()
    attn = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(1, 5, 64, dtype=torch.bfloat16)
    other = torch.randn(1, 5, 64, dtype=torch.bfloat16)
    model.eval()  # no dropout: outputs are deterministic
    with torch.no_grad():
        expected_k = attn.k_proj(other)
        with packed_linear.packed_weights(model):
            attn.q_proj(x)
            group = fused_qkv._groups[id(attn.q_proj)]
            assert group.stash is not None
            torch.testing.assert_close(attn.k_proj(other), expected_k, atol=0, rtol=0)  # not x: computed
            assert group.stash[1] is not None  # x's k part still unclaimed
            model.base_model.disable_adapter_layers()
            try:
                no_adapter = attn.q_proj(x)  # peft's own path, base weights only
                torch.testing.assert_close(no_adapter, attn.q_proj.base_layer(x), atol=0, rtol=0)
            finally:
                model.base_model.enable_adapter_layers()


def test_the_fused_node_steps_aside_for_changed_weights_grad_mode_and_clip_qkv():
    from hafs.training import fused_qkv

    model = lora_model_qkv()
    attn = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(1, 5, 64, dtype=torch.bfloat16)
    model.eval()
    with packed_linear.packed_weights(model):
        group = fused_qkv._groups[id(attn.q_proj)]
        with torch.no_grad():
            attn.q_proj(x)
        assert group.stash is not None
        k = attn.k_proj(x)  # grad on now: the stashed k (no graph) is not handed out
        assert k.requires_grad and group.stash[1] is not None
        # a base weight given new memory: the group's stacked pack no longer applies
        attn.q_proj.base_layer.weight.data = torch.zeros_like(attn.q_proj.base_layer.weight)
        assert not group.unchanged() and fused_qkv.grouped_forward(attn.q_proj, x) is None
        with torch.no_grad():
            q = attn.q_proj(x)
            torch.testing.assert_close(q, attn.q_proj.base_layer(x) + attn.q_proj.lora_B["default"](
                attn.q_proj.lora_A["default"](x.float())).to(q.dtype) * attn.q_proj.scaling["default"],
                atol=2e-2, rtol=2e-2)
    model = lora_model_qkv()
    model.config.clip_qkv = 8.0  # OLMo clamps q/k/v in place: views of one tensor would not allow it
    with packed_linear.packed_weights(model):
        assert fused_qkv._groups == {}


def test_a_failed_build_leaves_no_group_behind(monkeypatch):
    from hafs.training import fused_qkv

    model = lora_model_qkv()
    calls = []

    def reorder(weight, hint):
        calls.append(1)
        if len(calls) > 2:  # the second group's pack: out of memory
            raise RuntimeError("out of memory")
        return torch.ops.mkldnn._reorder_linear_weight(weight, hint)

    with pytest.raises(RuntimeError, match="out of memory"):
        fused_qkv.build(model, reorder, 512)
    assert fused_qkv._groups == {}


def test_fused_node_under_gradient_checkpointing_recomputes_the_same_loss(monkeypatch):
    from hafs.training import fused_qkv

    model, b = lora_model_qkv(), batch()
    with packed_linear.packed_weights(model):
        loss, grads = step(model, b)
    model_loading.enable_checkpointing(model.get_base_model())
    nodes = []
    original = fused_qkv._qkv_function()
    monkeypatch.setattr(fused_qkv, "_qkv_function", lambda: type("Counted", (), {
        "apply": staticmethod(lambda *a: nodes.append(1) or original.apply(*a))}))
    with packed_linear.packed_weights(model):
        ckpt_loss, ckpt_grads = step(model, b)
        assert all(g.stash is None for g in fused_qkv._groups.values())
    assert len(nodes) == 4  # two layers, forward and recompute
    assert torch.equal(ckpt_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=0, rtol=0)


def test_when_checkpointing_is_needed_anyway_the_packed_copies_come_back_if_they_fit():
    from pathlib import Path

    from hafs.training.loader import load_config
    from hafs.training.memory_check import estimate_for_plan
    from hafs.training.plan import resolve

    plan = resolve(load_config(Path(__file__).resolve().parents[1] / "config" / "training.toml"), "oracle-rauru-cloud")
    assert plan.gradient_checkpointing is None and plan.hardware.supports_gradient_checkpointing
    settings = types.SimpleNamespace(device="cpu", precision="bf16", attn_implementation="sdpa",
                                     autocast_dtype="bfloat16", gradient_checkpointing=False, loss_chunk_size=None,
                                     packed_weights=True)

    def total(**kw):
        return estimate_for_plan(plan, QWEN, settings=types.SimpleNamespace(**{**vars(settings), **kw})).total_gb

    packed_gc = total(gradient_checkpointing=True)
    assert packed_gc < total(packed_weights=False)  # checkpointing saves more than the packs cost
    plan.hardware.available_memory_gb = packed_gc + 0.01
    logged = []
    estimate = check_plan(plan, settings, log=logged.append, model_config=QWEN)
    assert settings.gradient_checkpointing and settings.packed_weights
    assert estimate.settings["packed_weights"] and not any("not pre-packed" in line for line in logged)
    plan.hardware.available_memory_gb = total(gradient_checkpointing=True, packed_weights=False) + 0.01
    settings.gradient_checkpointing, settings.packed_weights = False, True
    check_plan(plan, settings, log=logged.append, model_config=QWEN)
    assert settings.gradient_checkpointing and not settings.packed_weights
    assert any("not pre-packed" in line for line in logged)


def test_primitive_cache_cap_is_set_once_and_leaves_the_users_own_value(monkeypatch):
    names = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    assert packed_linear.limit_primitive_cache(0) == {n: None for n in names}  # 0: the libraries' defaults
    assert packed_linear.limit_primitive_cache(160) == {n: "160" for n in names}
    assert packed_linear.limit_primitive_cache(500) == {n: "160" for n in names}  # set once
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "2048")  # the user's choice wins
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    assert packed_linear.limit_primitive_cache(96) == {"LRU_CACHE_CAPACITY": "2048",
                                                       "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "96"}


def test_primitive_cache_cap_covers_a_steps_attention_blocks_and_the_estimate_counts_it():
    import types

    from hafs.training.attention import ATTENTION_BLOCK
    from hafs.training.memory import estimate_memory
    from hafs.training.memory_check import settings_kwargs
    from hafs.training.precision import run_settings

    def settings(device, seq):
        return run_settings(types.SimpleNamespace(device=device, precision="bf16", packing=True, sequence_length=seq,
                                                  gradient_checkpointing=False))

    caps = [settings("cpu", seq).onednn_cache_capacity for seq in (256, 1024, 4096)]
    assert caps == sorted(caps) and caps[0] >= 64
    for seq, cap in zip((256, 1024, 4096), caps):
        assert cap >= 64 + 6 * -(-seq // ATTENTION_BLOCK)  # 6 GEMM shapes per attention block, fwd + bwd
    assert settings("cuda", 1024).onednn_cache_capacity == 0
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128, "vocab_size": 512, "model_type": "qwen2"}
    common = dict(sequence_length=1024, batch_size=1, lora_r=8, lora_targets=["q_proj"], packing=True)
    run = settings_kwargs(settings("cpu", 1024))
    capped = estimate_memory(cfg, **common, **run)
    default = estimate_memory(cfg, **common, **{**run, "primitive_cache_entries": 0})  # the libraries' 1,024
    gap = (default.overhead_gb - capped.overhead_gb) * 2**30
    assert gap == (1024 - caps[1]) * packed_linear.CACHE_ENTRY_BYTES
