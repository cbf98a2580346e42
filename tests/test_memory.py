"""The memory estimate: parameter counts, saved activations, scaling, suggestions, and the plan gate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hafs.training.errors import ConfigError, HardwareError
from hafs.training.hardware import Capabilities, CpuInfo, MpsInfo
from hafs.training.loader import load_config
from hafs.training.memory import GIB, ModelShape, estimate_memory
from hafs.training.memory_check import check_memory, check_plan, estimate_for_plan
from hafs.training.memory_fit import fit_suggestions
from hafs.training.model_config import load_model_config
from hafs.training.plan import resolve

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests/fixtures/qwen2.5-coder-1.5b-config.json"
QWEN_15B = json.loads(FIXTURE.read_text())
TINY = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256, "tie_word_embeddings": True,
        "max_position_embeddings": 512}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MAC = Capabilities(os="Darwin", torch_version="2.13.0",
                   mps=MpsInfo(available=True, built=True, macos_version="13.6", unified_memory_gb=32,
                               working_set_gb=21.3, bf16=False),
                   cpu=CpuInfo(model_name="Apple M1 Pro", arch="arm64", cores=10, ram_gb=32))


def est(config=QWEN_15B, **kw):
    args = {"sequence_length": 1024, "batch_size": 1, "lora_r": 8, "lora_targets": TARGETS, "precision": "bf16",
                "gradient_checkpointing": False, "packing": False, "attn_impl": "sdpa", "device_kind": "cuda"}
    return estimate_memory(config, **{**args, **kw})


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "config" / "training.toml")


def test_fixture_is_qwen25_coder_15b():
    shape = ModelShape.from_config(QWEN_15B)
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == (1536, 28, 12, 2, 128)
    assert (shape.intermediate, shape.vocab, shape.tied) == (8960, 151936, True)
    assert shape.parameter_count() == 1_543_714_304  # Qwen's model card: 1.54B
    assert shape.lora_parameter_count(8, TARGETS) == 28 * 8 * (1536 + 1536 + 1536 + 256 + 1536 + 256 + 1536 + 1536)


def test_parameter_counts_match_transformers_and_peft():
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    for tied in (True, False):
        config = {**TINY, "tie_word_embeddings": tied}
        with torch.random.fork_rng():
            model = Qwen2ForCausalLM(Qwen2Config(**config))
        shape = ModelShape.from_config(config)
        assert shape.parameter_count() == sum(p.numel() for p in model.parameters())
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert shape.lora_parameter_count(4, ["q_proj", "v_proj", "down_proj"]) == trainable


@pytest.mark.parametrize("packing", [False, True])
def test_saved_activations_match_autograd(packing):
    """The per-layer terms count what autograd really keeps (bf16 weights, fp32 LoRA, autocast, dropout)."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, attn_implementation="sdpa")).to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=8, target_modules=TARGETS, lora_dropout=0.05))
        model.train()
        seq, batch = 128, 2 if packing else 1  # one unpadded row needs no mask; packed rows do
        ids = torch.randint(0, 256, (batch, seq))
        pos = torch.cat([torch.arange(64), torch.arange(64)]).repeat(batch, 1) if packing else None
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model.base_model.model.model(input_ids=ids, position_ids=pos, use_cache=False)
    predicted = est(TINY, sequence_length=seq, batch_size=batch, packing=packing, device_kind="cpu",
                    autocast=True).settings["saved_bytes"]
    assert predicted == pytest.approx(sum(saved.values()), rel=0.05)


def test_saved_activations_match_autograd_with_the_engines_settings():
    """Same check with what the trainer really runs on CPU: precision.run_settings + prepare_for_training
    (no fp32 input copy under autocast, byte-mask dropout) and per-example packed attention."""
    torch = pytest.importorskip("torch")
    precision = pytest.importorskip("hafs.training.precision")
    model_loading = pytest.importorskip("hafs.training.model_loading")
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hafs.training.memory_check import settings_kwargs

    settings = precision.run_settings(types.SimpleNamespace(device="cpu", precision="bf16", packing=True,
                                                            gradient_checkpointing=False))
    if settings.attn_implementation == precision.VARLEN_ATTENTION:
        model_loading.register_varlen_attention()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, attn_implementation=settings.attn_implementation))
        model = get_peft_model(model.to(torch.bfloat16), LoraConfig(r=8, target_modules=TARGETS, lora_dropout=0.05),
                               autocast_adapter_dtype=True)
        model_loading.prepare_for_training(model, settings)
        model.train()
        seq, batch = 128, 2
        ids = torch.randint(0, 256, (batch, seq))
        # one example per row: the estimate's worst case for the probabilities CPU attention keeps
        # (two examples of 64 keep half of one of 128)
        pos = torch.arange(seq).repeat(batch, 1)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), settings.autocast():
            model.base_model.model.model(input_ids=ids, position_ids=pos, use_cache=False)
    predicted = est(TINY, sequence_length=seq, batch_size=batch, packing=True, lora_targets=TARGETS,
                    **settings_kwargs(settings)).settings["saved_bytes"]
    assert predicted == pytest.approx(sum(saved.values()), rel=0.05)


def test_monotonic_in_sequence_length_and_batch():
    for kw in ({}, {"packing": True}, {"gradient_checkpointing": True}, {"attn_impl": "eager"}):
        totals = [est(sequence_length=s, batch_size=b, **kw).total_gb for b in (1, 2, 4) for s in (256, 512, 2048)]
        by_batch = [totals[i:i + 3] for i in (0, 3, 6)]
        for row in by_batch:
            assert row == sorted(row) and len(set(row)) == 3
        for col in zip(*by_batch):
            assert list(col) == sorted(col) and len(set(col)) == 3


def test_linear_in_sequence_length_with_sdpa_quadratic_with_eager():
    a, b, c = (est(sequence_length=s).measurable_gb for s in (2048, 4096, 6144))
    assert (c - b) == pytest.approx(b - a, rel=1e-9)  # no T x T term
    a, b, c = (est(sequence_length=s, attn_impl="eager").measurable_gb for s in (2048, 4096, 6144))
    assert (c - b) > 1.2 * (b - a)


def test_logits_are_chunked_not_batch_seq_vocab():
    e = est(sequence_length=4096, batch_size=4)
    full_logits_gb = 4 * 4096 * 151936 * 4 / GIB
    assert e.logits_gb < full_logits_gb / 40
    assert e.settings["loss_chunk"] == 128  # loss.default_chunk_size for a 152k vocabulary


def test_checkpointing_precision_and_breakdown():
    plain, ckpt = est(sequence_length=4096), est(sequence_length=4096, gradient_checkpointing=True)
    assert ckpt.activations_gb < plain.activations_gb / 3
    assert plain.weights_gb == pytest.approx(1_543_714_304 * 2 / GIB)
    assert est(precision="fp32").weights_gb == pytest.approx(2 * plain.weights_gb)
    assert plain.lora_gb == pytest.approx(ModelShape.from_config(QWEN_15B).lora_parameter_count(8, TARGETS) * 16 / GIB)
    parts = plain.to_dict()
    assert sum(parts[k] for k in ("weights_gb", "lora_gb", "activations_gb", "logits_gb", "overhead_gb",
                                  "runtime_gb")) == pytest.approx(plain.total_gb)
    text = plain.render()
    assert "frozen weights" in text and f"{plain.total_gb:7.2f} GiB" in text
    json.dumps(parts)


def test_checkpointing_some_layers_is_between_none_and_all():
    kw = {"sequence_length": 2048, "batch_size": 4, "gradient_checkpointing": True}
    none, every = est(**{**kw, "gradient_checkpointing": False}), est(**kw)
    assert est(**kw, checkpointed_layers=28).total_gb == every.total_gb
    assert est(**kw, checkpointed_layers=0).total_gb == none.total_gb
    steps = [est(**kw, checkpointed_layers=k).activations_gb for k in range(29)]
    assert all(a > b for a, b in zip(steps[:28], steps[1:28]))  # each checkpointed layer frees its activations
    # linear in the layers left alone: what one layer keeps minus its checkpointed input
    gaps = [a - b for a, b in zip(steps[1:28], steps[2:28])]
    assert max(gaps) == pytest.approx(min(gaps))
    assert "14 of 28 layers checkpointed" in est(**kw, checkpointed_layers=14).render()
    # A run on some layers asks whether all of them would fit, as the OOM hint does.
    fit = fit_suggestions(QWEN_15B, available_memory_gb=every.total_gb + 0.01, checkpointed_layers=20,
                          **{k: v for k, v in est(**kw).inputs.items() if k not in ("checkpointed_layers",)
                             and k not in ("available_memory_gb",)})
    assert fit.gradient_checkpointing_fits is True


def test_checkpointing_the_first_layers_recomputes_only_them_and_keeps_the_gradients():
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hafs.training.model_loading import enable_checkpointing

    def model():
        torch.manual_seed(0)
        base = Qwen2ForCausalLM(Qwen2Config(**{**TINY, "num_hidden_layers": 4}))
        return get_peft_model(base.requires_grad_(False), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                     init_lora_weights=False, target_modules=TARGETS))

    def step(m):
        calls, saved = [0] * 4, [0]
        for i, layer in enumerate(m.get_base_model().model.layers):
            # a pre-hook: the recompute stops (early_stop) as soon as it has what backward needs
            layer.input_layernorm.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t
        m.train()
        ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return calls, saved[0], {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    plain_calls, plain_saved, plain_grads = step(model())
    some = model()
    assert enable_checkpointing(some, 2) == 2
    calls, saved, grads = step(some)
    assert plain_calls == [1, 1, 1, 1] and calls == [2, 2, 1, 1]  # only the first two run again in backward
    every = model()
    assert enable_checkpointing(every) == 4
    all_calls, all_saved, _ = step(every)
    assert all_calls == [2, 2, 2, 2] and all_saved < saved < plain_saved
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad)


def test_fit_suggestions_are_the_largest_that_fit():
    asked = {"sequence_length": 4096, "batch_size": 4, "lora_r": 8, "lora_targets": TARGETS, "precision": "bf16",
                 "packing": False, "device_kind": "cuda"}
    plain = est(sequence_length=4096, batch_size=4).total_gb
    ckpt = est(sequence_length=4096, batch_size=4, gradient_checkpointing=True).total_gb
    budget = (plain + ckpt) / 2
    fit = fit_suggestions(QWEN_15B, available_memory_gb=budget, gradient_checkpointing=False, **asked)
    assert not fit.fits and fit.gradient_checkpointing_fits is True
    s, b = fit.max_sequence_length, fit.max_batch_size
    assert s % 64 == 0 and 0 < s < 4096 and 0 < b < 4
    assert est(sequence_length=s, batch_size=4).total_gb <= budget < est(sequence_length=s + 64, batch_size=4).total_gb
    assert (est(sequence_length=4096, batch_size=b).total_gb
            <= budget < est(sequence_length=4096, batch_size=b + 1).total_gb)
    assert "gradient_checkpointing = true" in fit.hint() and f"sequence_length = {s}" in fit.hint()
    hopeless = fit_suggestions(QWEN_15B, available_memory_gb=2.0, gradient_checkpointing=False, **asked)
    assert (hopeless.max_sequence_length, hopeless.max_batch_size,
            hopeless.gradient_checkpointing_fits) == (0, 0, False)
    assert "does not fit" in hopeless.hint()


def test_mac_mps_preset_with_the_15b_model_gets_a_verdict(cfg):
    plan = resolve(cfg, "oracle-rauru-mac")
    verdict = check_memory(plan, QWEN_15B, caps=MAC)
    e = verdict.estimate
    assert verdict.fits and verdict.available_gb == 20 and not verdict.gradient_checkpointing
    assert e.settings["device_kind"] == "mps" and e.settings["precision"] == "fp16"
    assert 4 < e.total_gb < 20
    assert "verdict" in verdict.render() and "fits" in verdict.render()
    plan.hardware.available_memory_gb = 5
    tight = check_memory(plan, QWEN_15B, caps=MAC)
    assert not tight.fits and len(tight.problems) == 1
    p = tight.problems[0]
    assert p.message.startswith("Hardware Mac M1/M2/M3 with MPS is unsupported: training needs about")
    assert "sequence_length = " in p.hint and "gradient_checkpointing" not in p.hint  # not on MPS profiles
    assert check_memory(plan, QWEN_15B, caps=MAC, force=True).problems == []


def test_check_plan_turns_on_checkpointing_only_when_needed(cfg):
    plan = resolve(cfg, "oracle-rauru-cloud")  # RTX 4090 profile, 2048 x 4, checkpointing left to memory
    assert plan.gradient_checkpointing is None
    settings = types.SimpleNamespace(device="cuda", precision="bf16", attn_implementation="sdpa",
                                     gradient_checkpointing=False, loss_chunk_size=None, autocast_dtype="bfloat16")
    logged = []
    plain = estimate_for_plan(plan, QWEN_15B, settings=settings).total_gb
    ckpt = estimate_for_plan(plan, QWEN_15B, settings=settings, gradient_checkpointing=True).total_gb
    plan.hardware.available_memory_gb = (plain + ckpt) / 2
    e = check_plan(plan, settings, log=logged.append, model_config=QWEN_15B)
    assert settings.gradient_checkpointing is True and e.settings["gradient_checkpointing"]
    assert any(f"without it the run needs ~{plain:.1f} GiB" in line for line in logged)
    # Half-way between the two, the fewest layers that fit are checkpointed, not all 28.
    k = settings.checkpointed_layers
    assert 0 < k < 28 and e.settings["checkpointed_layers"] == k
    assert e.total_gb <= plan.hardware.available_memory_gb
    assert estimate_for_plan(plan, QWEN_15B, settings=types.SimpleNamespace(
        **{**vars(settings), "checkpointed_layers": k - 1})).total_gb > plan.hardware.available_memory_gb
    assert any(f"on the first {k} of 28 layers" in line for line in logged)
    settings.checkpointed_layers = None
    plan.hardware.available_memory_gb = ckpt / 2
    settings.gradient_checkpointing = False
    with pytest.raises(HardwareError, match="does not fit in memory"):
        check_plan(plan, settings, log=logged.append, model_config=QWEN_15B)
    assert check_plan(plan, settings, force=True, log=logged.append, model_config=QWEN_15B) is not None
    assert "--force" in logged[-1]


def test_checkpointing_is_relaxed_for_data_shorter_than_sequence_length(cfg):
    from hafs.training.memory_check import relax_for_data

    plan = resolve(cfg, "oracle-rauru-cloud")  # 2048 x 4, checkpointing left to memory
    plan.packing = False
    settings = types.SimpleNamespace(device="cuda", precision="bf16", attn_implementation="sdpa",
                                     gradient_checkpointing=False, checkpointed_layers=None, loss_chunk_size=None,
                                     autocast_dtype="bfloat16")
    plain = estimate_for_plan(plan, QWEN_15B, settings=settings).total_gb
    ckpt = estimate_for_plan(plan, QWEN_15B, settings=settings, gradient_checkpointing=True).total_gb
    plan.hardware.available_memory_gb = (plain + ckpt) / 2
    first = check_plan(plan, settings, log=lambda *a: None, model_config=QWEN_15B)
    k = settings.checkpointed_layers
    logged = []
    relaxed = relax_for_data(plan, settings, 1200, first, log=logged.append, model_config=QWEN_15B)
    assert settings.gradient_checkpointing and settings.checkpointed_layers < k
    assert relaxed.settings["sequence_length"] == 1200 and relaxed.total_gb <= plan.hardware.available_memory_gb
    assert "longest example has 1,200 tokens" in logged[0] and f"instead of {k}" in logged[0]
    assert re.search(r"GiB of \d+(\.\d)?$", logged[0])  # a fractional budget with one decimal, not 8.27623
    # Short enough data needs none at all.
    short = relax_for_data(plan, settings, 300, relaxed, log=logged.append, model_config=QWEN_15B)
    assert short.total_gb <= plan.hardware.available_memory_gb and not short.settings["gradient_checkpointing"]
    assert not settings.gradient_checkpointing and settings.checkpointed_layers is None
    assert "gradient checkpointing off" in logged[-1]
    # Left alone: an explicit choice, packed rows (always full), data as long as the limit.
    for change in ({"gradient_checkpointing": True}, {"packing": True}):
        other = resolve(cfg, "oracle-rauru-cloud")
        other.packing = False
        for key, value in change.items():
            setattr(other, key, value)
        s2 = types.SimpleNamespace(**{**vars(settings), "gradient_checkpointing": True, "checkpointed_layers": 20})
        assert relax_for_data(other, s2, 300, first, log=logged.append, model_config=QWEN_15B) is first
        assert s2.checkpointed_layers == 20
    s3 = types.SimpleNamespace(**{**vars(settings), "gradient_checkpointing": True, "checkpointed_layers": k})
    assert relax_for_data(plan, s3, 2048, first, log=logged.append, model_config=QWEN_15B) is first


def test_load_model_config_sources(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert load_model_config(str(tmp_path)) == TINY
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HardwareError, match="no config.json"):
        load_model_config(str(empty))

    import huggingface_hub

    def offline(repo, filename, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    from hafs.training import model_config

    monkeypatch.setattr(model_config, "_hub_reachable", lambda timeout=2.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(HardwareError) as err:
        load_model_config("acme/unknown-7b")
    assert "acme/unknown-7b" in err.value.problems[0].message and "--force" in err.value.problems[0].hint
    # the seed's base model has its shape shipped with hafs: an offline dry run still gets a verdict
    assert load_model_config("Qwen/Qwen2.5-Coder-1.5B") == QWEN_15B
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, **kw: str(FIXTURE))
    assert load_model_config("acme/unknown-7b")["hidden_size"] == 1536
    monkeypatch.setattr(model_config, "_hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(HardwareError, match="cannot be reached"):
        load_model_config("acme/unknown-7b")
    assert load_model_config(str(FIXTURE))["num_hidden_layers"] == 28

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv("HAFS_MODEL_CONFIGS", str(FIXTURE.parent))  # how --dry-run gets a verdict offline
    assert load_model_config("Qwen/Qwen2.5-Coder-1.5B") == QWEN_15B
    (tmp_path / "acme--tiny.json").write_text(json.dumps(TINY))
    monkeypatch.setenv("HAFS_MODEL_CONFIGS", f"{empty}{os.pathsep}{tmp_path}")
    assert load_model_config("acme/tiny") == TINY

    from hafs.training import demo

    monkeypatch.setattr(demo, "resolve_demo_model", lambda name, *a, **k: tmp_path)
    assert load_model_config("hafs-demo/tiny-qwen2") == TINY


def test_unreadable_configs_are_hardware_errors():
    with pytest.raises(HardwareError, match="num_hidden_layers"):
        ModelShape.from_config({"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10})
    gpt2 = ModelShape.from_config({"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100})
    assert (gpt2.hidden, gpt2.layers, gpt2.kv_heads, gpt2.intermediate) == (64, 2, 4, 256)


def test_release_freed_memory_sets_glibcs_threshold():
    """On glibc the call succeeds (in a child process: it changes malloc for the whole process)."""
    code = "from hafs.training.memory import release_freed_memory as r; print(r())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import platform

    expected = "True" if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else "False"
    assert out == expected


def test_cpu_allocator_mode_changes_only_the_cpu_overhead():
    glibc = est(device_kind="cpu", sequence_length=2048, batch_size=4)
    mmap = est(device_kind="cpu", sequence_length=2048, batch_size=4, cpu_allocator="mmap")
    assert glibc.activations_gb == mmap.activations_gb and glibc.overhead_gb > mmap.overhead_gb + 1.0
    assert est(cpu_allocator="mmap").total_gb == est().total_gb  # CUDA: no effect


def test_fsdp_shards_the_layers_not_the_embeddings(cfg):
    shape = ModelShape.from_config(QWEN_15B)
    whole, sharded = est(), est(weight_shards=4)
    layer, layers = shape.layer_parameter_count(), shape.layers
    rest = shape.parameter_count() - layers * layer  # embedding (tied) and the final norm stay on every worker
    assert sharded.weights_gb * GIB == pytest.approx((rest + layers * layer / 4 + 2 * layer) * 2)
    assert whole.weights_gb - sharded.weights_gb == pytest.approx((layers * layer * 3 / 4 - 2 * layer) * 2 / GIB)
    assert sharded.activations_gb == whole.activations_gb  # each worker still runs its own batch
    assert "layers sharded over 4 workers" in sharded.render()

    # a 4-GPU ddp preset that does not fit one GPU is told that fsdp would, with the per-worker figure
    plan = resolve(cfg, "oracle-rauru-cloud-x4", check_hardware=False)
    assert plan.world_size() == 4 and plan.hardware.distributed == "ddp"
    plan.gradient_checkpointing = False
    ddp = estimate_for_plan(plan, QWEN_15B)
    fsdp_gb = estimate_memory(QWEN_15B, **{**ddp.inputs, "weight_shards": 4}).total_gb
    plan.hardware.available_memory_gb = (fsdp_gb + ddp.total_gb) / 2
    verdict = check_memory(plan, QWEN_15B)
    assert not verdict.fits
    assert 'distributed = "fsdp" in [hardware.cloud-a100-40gb-x4]' in verdict.problems[0].hint
    assert f"~{fsdp_gb:.1f} GiB each" in verdict.problems[0].hint
    plan.hardware.distributed = "fsdp"
    assert check_memory(plan, QWEN_15B).fits


def test_under_torchrun_the_workers_it_started_decide_the_shards(cfg, monkeypatch):
    plan = resolve(cfg, "oracle-rauru-cloud-x4", check_hardware=False)
    plan.hardware.distributed = "fsdp"
    assert estimate_for_plan(plan, QWEN_15B).settings["weight_shards"] == 4  # num_gpus from the profile
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun --nproc_per_node=2 wins
    assert estimate_for_plan(plan, QWEN_15B).settings["weight_shards"] == 2
    plan.hardware.distributed = "ddp"
    assert estimate_for_plan(plan, QWEN_15B).settings["weight_shards"] == 1


def test_cpu_attention_probabilities_are_counted_for_every_example_that_fits_the_budget():
    # 4 rows of 1,024 tokens at 12 heads: together over the 32 MiB per-call budget, each alone within
    # it, so attention.length_groups runs them in several calls that all keep their probabilities.
    from hafs.training.attention import CPU_BLOCK_ATTENTION_BYTES, saved_probabilities

    heads, seq = QWEN_15B["num_attention_heads"], 1024
    one = heads * saved_probabilities(seq) * 2
    assert one <= CPU_BLOCK_ATTENTION_BYTES < 4 * one
    cpu = dict(attn_impl="hafs_varlen_sdpa", device_kind="cpu", sequence_length=seq)
    a, b = (est(batch_size=n, **cpu).settings["saved_bytes"] for n in (1, 4))
    layers = QWEN_15B["num_hidden_layers"]
    # the probabilities scale with the batch like everything else (no drop at the per-call budget)
    assert b - a == pytest.approx(3 * a, rel=0.02)
    assert a > layers * one


def test_the_dry_run_prints_each_memory_note_once(cfg):
    """The verdict's text carries its own notes; the report's note lines must not repeat them."""
    from hafs.training.dryrun import DryRunReport

    report = DryRunReport(plan=resolve(cfg, "demo"), memory_text="  verdict: fits\n  note: weights not packed",
                          notes=["weights not packed", "tokenizer offline"])
    text = report.render()
    assert text.count("weights not packed") == 1 and "note: tokenizer offline" in text


def test_lora_targets_the_model_lacks_are_found_from_config_json_before_loading(cfg):
    from hafs.training.memory_check import check_plan
    from hafs.training.model_config import target_problems

    plan = resolve(cfg, "demo")
    assert target_problems(plan, QWEN_15B) == []
    plan.lora.target_modules = ["q_prj", "v_proj"]
    (problem,) = target_problems(plan, QWEN_15B)
    assert problem.key == f"lora.{plan.lora_name}.target_modules" and "did you mean 'q_proj'" in problem.message
    assert target_problems(plan, {**QWEN_15B, "model_type": "phi3"}) == []  # layer names unknown: peft checks
    with pytest.raises(ConfigError, match="q_prj"):  # the trainer's gate, before any weight is read
        check_plan(plan, model_config=QWEN_15B, log=lambda *a: None)


def test_a_hub_model_that_cannot_be_downloaded_is_said_before_the_run(tmp_path, monkeypatch, cfg):
    from hafs.training import model_config
    from hafs.training.dryrun import dry_run

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(model_config, "_hub_reachable", lambda timeout=2.0: False)
    problem = model_config.hub_download_problem("Qwen/Qwen2.5-Coder-1.5B", "experts.x.base_model")
    assert problem is not None and "cannot be reached" in problem.message and problem.key == "experts.x.base_model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the reason given is the one that applies
    assert "HF_HUB_OFFLINE is set" in model_config.hub_download_problem("Qwen/Qwen2.5-Coder-1.5B", "k").message
    assert model_config.hub_download_problem("hafs-demo/tiny-qwen2", "k") is None
    assert model_config.hub_download_problem(str(tmp_path), "k") is None  # a local folder
    report = dry_run(cfg, "demo", ["expert.base_model=Qwen/Qwen2.5-Coder-1.5B"])
    assert any("not in the local Hugging Face cache" in p.message for p in report.problems)
    monkeypatch.setattr(model_config, "_hub_reachable", lambda timeout=2.0: True)
    assert model_config.hub_download_problem("Qwen/Qwen2.5-Coder-1.5B", "k") is None  # it will download
