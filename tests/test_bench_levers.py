"""bench/bench_levers.py really switches each lever: otherwise its on/off ratios would read 1.0 and mislead."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from hafs.training import kernels

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def levers():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_levers", BENCH / "bench_levers.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_switch_installs_and_removes_each_lever(levers):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2 import modeling_qwen2

    torch.manual_seed(0)
    model = get_peft_model(Qwen2ForCausalLM(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    original_rotary = modeling_qwen2.apply_rotary_pos_emb
    ids = torch.randint(0, 64, (1, 9))
    reference = model(ids).logits
    kinds = {"lora": lambda m: hasattr(m, "lora_A") and hasattr(m, "base_layer"),
             "rms_norm": lambda m: type(m).__name__ == "Qwen2RMSNorm",
             "swiglu": lambda m: type(m).__name__ == "Qwen2MLP"}
    try:
        for lever, is_kind in kinds.items():
            modules = [m for m in model.modules() if is_kind(m)]
            assert modules
            levers.switch(model, lever, True)
            assert all("forward" in m.__dict__ for m in modules), lever
            torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)
            levers.switch(model, lever, False)
            assert not any("forward" in m.__dict__ for m in modules), lever
        from hafs.training import packed_linear

        model.to(torch.bfloat16).requires_grad_(False)  # packing applies to frozen bf16 weights
        reference = model(ids).logits
        levers.switch(model, "packed", True)
        levers.switch(model, "packed", True)  # idempotent
        head = model.get_base_model().lm_head.weight
        assert packed_linear.packs_for(head) is not None
        assert torch.equal(model(ids).logits, reference)
        levers.switch(model, "packed", False)
        assert packed_linear.packs_for(head) is None and packed_linear._packs == {}
        levers.switch(model, "rotary", True)
        assert modeling_qwen2.apply_rotary_pos_emb.func is kernels.apply_rotary_pos_emb
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-2, rtol=1e-2)
        levers.switch(model, "rotary", False)
        assert not hasattr(modeling_qwen2.apply_rotary_pos_emb, "func")
    finally:
        modeling_qwen2.apply_rotary_pos_emb = original_rotary


def test_no_cudnn_lever_reaches_the_sdpa_flags_through_the_run_settings(levers):
    from hafs.training.precision import RunSettings

    settings = RunSettings(device="cuda", sdpa_cudnn=True)
    levers.switch(None, "no_cudnn", True, settings)
    with settings.attention_kernels():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    levers.switch(None, "no_cudnn", False, settings)
    assert settings.sdpa_cudnn
