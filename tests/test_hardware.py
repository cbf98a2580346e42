"""Hardware detection rules, pre-flight checks, profile blocks and preset ranking, on fake machines."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hafs.training.hardware import (
    CU128_HINT,
    Capabilities,
    CpuInfo,
    CudaGpu,
    MpsInfo,
    _sass_runs_on,
    detect,
    gpu_supported_by_build,
)
from hafs.training.hardware_report import detect_report, profile_block
from hafs.training.loader import load_config, load_config_text
from hafs.training.plan import resolve
from hafs.training.preflight import preflight, rank_presets

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "training.toml"
QWEN_15B = json.loads((ROOT / "tests/fixtures/qwen2.5-coder-1.5b-config.json").read_text())
TINY = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1024, "tie_word_embeddings": True}
CU126 = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
CU128 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")


def loader(base_model: str) -> dict:
    """Model configs without the hub: the 1.5B fixture for Qwen ids, the tiny shape for the demo."""
    return QWEN_15B if base_model.startswith("Qwen/") else TINY


def linux_cpu(bf16: bool = True, ram: float = 32.0) -> Capabilities:
    flags = ("avx2", "avx512f") + (("avx512_bf16",) if bf16 else ())
    return Capabilities(os="Linux", os_version="6.8", python_version="3.11.7", torch_version="2.13.0+cpu",
                        cpu=CpuInfo(model_name="Fake EPYC", arch="x86_64", cores=8, ram_gb=ram, flags=flags))


def with_gpu(name: str, cap: tuple[int, int], arch: tuple[str, ...], memory: float = 16.0, n: int = 1):
    gpus = tuple(CudaGpu(i, name, memory, cap, gpu_supported_by_build(cap, arch), cap[0] >= 8) for i in range(n))
    return dataclasses.replace(linux_cpu(), torch_version="2.13.0+cu128", torch_cuda_version="12.8",
                               cuda_arch_list=arch, gpus=gpus)


def mac(bf16: bool = False) -> Capabilities:
    return Capabilities(os="Darwin", os_version="23.6", python_version="3.11.7", torch_version="2.13.0",
                        mps=MpsInfo(available=True, built=True, macos_version="14.6" if bf16 else "13.6",
                                    unified_memory_gb=32, working_set_gb=21.3, bf16=bf16),
                        cpu=CpuInfo(model_name="Apple M1 Pro", arch="arm64", cores=10, ram_gb=32))


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG)


# ------------------------------------------------------------------ the build-vs-GPU rule

@pytest.mark.parametrize("cap, arch, expected", [
    ((12, 0), CU126, False),          # RTX 50xx on a build without Blackwell kernels
    ((12, 0), CU128, True),
    ((8, 9), ("sm_80", "sm_86"), True),     # same major, newer minor runs older SASS
    ((8, 7), ("sm_80", "sm_86"), False),    # Jetson Orin only runs sm_87 code
    ((9, 0), ("sm_80", "compute_80"), True),  # PTX is JIT-compiled for newer GPUs
    ((9, 0), ("sm_80",), False),
    ((12, 0), ("sm_90a", "compute_90a"), False),  # arch-specific PTX does not carry forward
    ((10, 0), ("sm_90", "sm_120"), False),
    ((11, 0), ("sm_101",), True),           # 10.1 code runs on 11.0 (torch's table)
    ((7, 5), (), True),                     # empty list: cannot tell, as torch
])
def test_gpu_supported_by_build(cap, arch, expected):
    assert gpu_supported_by_build(cap, arch) is expected


def test_sass_rule_matches_torch_table():
    torch_cuda = pytest.importorskip("torch.cuda")
    table = getattr(torch_cuda, "DEVICE_REQUIREMENT", None)
    if table is None:
        pytest.skip("this torch has no DEVICE_REQUIREMENT table")
    ccs = sorted(table) + [89, 121]
    for code in table:
        for device in ccs:
            assert _sass_runs_on(code, device) == (device in table[code]), (code, device)


# ------------------------------------------------------------------ pre-flight

def test_cuda_profile_without_cuda_is_refused_with_fitting_presets(cfg):
    pf = preflight(resolve(cfg, "oracle-rauru-windows"), linux_cpu(), cfg)
    assert len(pf.problems) == 1
    p = pf.problems[0]
    assert p.message.startswith("Hardware Windows RTX 5060 Ti 16GB is unsupported: ")
    assert "CPU-only" in p.message and p.key == "hardware.windows-rtx-5060"
    assert "presets that fit this machine: demo" in p.hint
    with pytest.raises(Exception, match="cannot run on this machine"):
        pf.raise_for_problems("oracle-rauru-windows")


def test_sm120_on_build_without_it_is_refused_with_install_hint(cfg):
    caps = with_gpu("NVIDIA GeForce RTX 5060 Ti", (12, 0), CU126)
    assert caps.gpus[0].supported_by_build is False
    pf = preflight(resolve(cfg, "oracle-rauru-windows"), caps, cfg)
    assert len(pf.problems) == 1
    assert "sm_120" in pf.problems[0].message and "sm_90" in pf.problems[0].message
    assert CU128_HINT in pf.problems[0].hint
    assert "download.pytorch.org/whl/cu128" in pf.problems[0].hint


def test_sm120_on_build_with_it_runs(cfg):
    pf = preflight(resolve(cfg, "oracle-rauru-windows"), with_gpu("NVIDIA GeForce RTX 5060 Ti", (12, 0), CU128), cfg)
    assert pf.problems == [] and pf.device == "cuda" and pf.precision == "bf16"


def test_mps_profile_on_linux_is_refused(cfg):
    pf = preflight(resolve(cfg, "oracle-rauru-mac"), linux_cpu(), cfg)
    assert [p.message for p in pf.problems] == [
        "Hardware Mac M1/M2/M3 with MPS is unsupported: MPS needs macOS on Apple silicon; this machine runs Linux"]


def test_mps_without_bf16_refuses_bf16_but_runs_fp16(cfg):
    plan = resolve(cfg, "oracle-rauru-mac")
    assert plan.precision == "fp16"
    assert preflight(plan, mac(bf16=False), cfg).problems == []
    plan.hardware.supports_bf16, plan.precision = True, "bf16"
    pf = preflight(plan, mac(bf16=False), cfg)
    assert len(pf.problems) == 1 and "macOS 14" in pf.problems[0].message
    assert 'precision = "fp16"' in pf.problems[0].hint
    assert preflight(plan, mac(bf16=True), cfg).problems == []


def test_gpu_without_bf16_is_refused(cfg):
    pf = preflight(resolve(cfg, "oracle-rauru-cloud"), with_gpu("Tesla T4", (7, 5), CU126), cfg)
    assert len(pf.problems) == 1 and "compute capability 8.0" in pf.problems[0].message


def test_cpu_without_bf16_downgrades_to_fp32_with_a_notice(cfg):
    plan = resolve(cfg, "demo")
    assert plan.precision == "bf16"
    pf = preflight(plan, linux_cpu(bf16=False), cfg)
    assert pf.problems == [] and pf.precision == "fp32"
    assert len(pf.notes) == 1 and "fp32" in pf.notes[0] and "AVX512-BF16" in pf.notes[0]
    pf = preflight(plan, linux_cpu(bf16=True), cfg)
    assert pf.precision == "bf16" and pf.notes == []


def test_auto_picks_cuda_then_mps_then_cpu(cfg):
    plan = resolve(cfg, "demo")
    plan.hardware.device = plan.device = "auto"
    assert preflight(plan, with_gpu("NVIDIA H100", (9, 0), CU128), cfg).device == "cuda"
    assert preflight(plan, mac(bf16=True), cfg).device == "mps"
    skipped = preflight(plan, with_gpu("NVIDIA GeForce RTX 5090", (12, 0), CU126), cfg)
    assert skipped.device == "cpu" and skipped.problems == []
    assert "RTX 5090" in skipped.notes[0] and "cu128" in skipped.notes[0]
    # auto on a GPU without bf16 adapts (the device was not pinned) instead of refusing
    plan.hardware.supports_fp16 = True
    t4 = preflight(plan, with_gpu("Tesla T4", (7, 5), CU126), cfg)
    assert (t4.device, t4.precision, t4.problems) == ("cuda", "fp16", [])


def test_multi_gpu_profile_needs_the_gpus(cfg):
    pf = preflight(resolve(cfg, "oracle-rauru-cloud-x4"), with_gpu("NVIDIA A100", (8, 0), CU128, 40), cfg)
    assert len(pf.problems) == 1 and "4 GPUs" in pf.problems[0].message
    ok = preflight(resolve(cfg, "oracle-rauru-cloud-x4"), with_gpu("NVIDIA A100", (8, 0), CU128, 40, n=4), cfg)
    assert ok.problems == []


def test_preflight_imports_neither_transformers_nor_torch():
    code = ("import sys; from hafs.training.loader import load_config; from hafs.training.plan import resolve;"
            "from hafs.training import hardware as h, preflight as p;"
            f"cfg = load_config({str(CONFIG)!r});"
            "caps = h.Capabilities(os='Linux', cpu=h.CpuInfo(cores=2, ram_gb=8));"
            "pf = p.preflight(resolve(cfg, 'oracle-rauru-mac'), caps, cfg); assert pf.problems;"
            "p.rank_presets(cfg, caps, memory=False);"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ profile block

@pytest.mark.parametrize("caps", [
    linux_cpu(), linux_cpu(bf16=False), mac(bf16=True),
    with_gpu('NVIDIA "Quoted" \\ GPU', (9, 0), CU128, 79.1, n=2),
    with_gpu("NVIDIA GeForce RTX 5060 Ti", (12, 0), CU126),
], ids=["cpu", "cpu-no-bf16", "mac", "h100x2-odd-name", "rtx5060-unsupported"])
def test_profile_block_round_trips_through_the_loader(caps):
    block = profile_block(caps)
    parsed = load_config_text(block, "<block>")
    (key, hw), = parsed.hardware.items()
    assert block.startswith(f"[hardware.{key}]")
    assert hw.device == caps.best_device()
    assert 0 < hw.available_memory_gb <= max(caps.cpu.ram_gb, caps.device_memory_gb(hw.device))
    if hw.device == "cuda":
        assert hw.supports_bf16 and hw.num_gpus == 2 and '"Quoted"' in hw.name
    elif hw.device == "mps":
        assert hw.supports_bf16 and hw.supports_fp16 and not hw.supports_gradient_checkpointing
    else:
        assert hw.supports_bf16 == caps.cpu.bf16_fast
    if caps.gpus and not caps.usable_gpus():
        assert "sm_120" in hw.reason
    # Pasted after the shipped config, it is one more valid profile.
    merged = load_config_text(CONFIG.read_text() + "\n" + block, str(CONFIG))
    assert key in merged.hardware


# ------------------------------------------------------------------ ranking and the report

def test_rank_presets_on_a_linux_cpu(cfg):
    ranked = rank_presets(cfg, linux_cpu(), config_loader=loader)
    assert ranked[0][0] == "demo" and ranked[0][1] is True
    assert "cpu, bf16" in ranked[0][2] and "GiB" in ranked[0][2]
    assert [name for name, ok, _ in ranked if ok] == ["demo"]
    assert len(ranked) == len(cfg.presets)


def test_rank_presets_on_a_mac_gives_the_mac_presets_a_memory_verdict(cfg):
    ranked = {name: (ok, reason) for name, ok, reason in rank_presets(cfg, mac(), config_loader=loader)}
    for preset in ("oracle-rauru-mac", "oracle-sheik-mac", "my-custom-training"):
        ok, reason = ranked[preset]
        assert ok and reason.startswith("mps, fp16") and "of 20 GiB" in reason
    assert ranked["oracle-rauru-windows"][0] is False
    order = [name for name, ok, _ in rank_presets(cfg, mac(), config_loader=loader) if ok]
    assert order.index("oracle-rauru-mac") < order.index("demo")  # MPS before CPU


def test_rank_presets_reports_a_preset_that_does_not_fit(cfg):
    small = dataclasses.replace(mac(), mps=dataclasses.replace(mac().mps, working_set_gb=4.0))
    ranked = {name: (ok, reason) for name, ok, reason in rank_presets(cfg, small, config_loader=loader)}
    ok, reason = ranked["oracle-rauru-mac"]
    assert not ok and "of 4 GiB" in reason and "too much" in reason


def test_detection_on_this_machine_is_json_and_round_trips():
    caps = detect()
    assert caps.cpu.cores >= 1 and caps.cpu.ram_gb > 0 and caps.torch_version
    data = json.loads(json.dumps(caps.to_dict()))
    assert data["best_device"] == caps.best_device() and "cpu" in data["device_kinds"]
    assert Capabilities.from_dict(data) == caps


def test_detect_report_and_cmd_detect_json(cfg, capsys, monkeypatch):
    text = detect_report(mac(), cfg, config_loader=loader)
    assert "[hardware.local-mps]" in text and "ok  oracle-rauru-mac" in text and "bf16 no" in text
    from hafs.training import hardware_report

    monkeypatch.setattr(hardware_report, "detect", linux_cpu)
    monkeypatch.setattr(hardware_report, "rank_presets", lambda c, caps: rank_presets(c, caps, config_loader=loader))
    assert hardware_report.cmd_detect(types.SimpleNamespace(config=str(CONFIG), json=True)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["capabilities"]["cpu"]["bf16_fast"] is True
    assert out["presets"][0] == {"preset": "demo", "runs_here": True, "reason": out["presets"][0]["reason"]}
    assert load_config_text(out["profile_block"]).hardware


def test_precision_is_settled_by_the_gpu_present_and_kept_when_none_is():
    from hafs.training.precision import settle_precision

    assert settle_precision("bf16", "cuda", with_gpu("Tesla T4", (7, 5), CU126))[0] == "fp16"  # no bf16 before sm_80
    assert settle_precision("bf16", "cuda", with_gpu("NVIDIA A100", (8, 0), CU128, 40)) == ("bf16", None)
    # a dry run for a cloud profile on a laptop: no GPU to judge by, the profile's precision stands
    assert settle_precision("bf16", "cuda", linux_cpu()) == ("bf16", None)
    assert settle_precision("bf16", "cpu", linux_cpu(bf16=False))[0] == "fp32"
    assert settle_precision("fp16", "cpu", linux_cpu())[0] == "fp32"


def test_padding_free_batches_only_where_the_attention_keeps_examples_apart():
    from hafs.training.precision import VARLEN_ATTENTION, run_settings

    def plan(device, packing=False):
        return types.SimpleNamespace(device=device, precision="bf16", packing=packing, gradient_checkpointing=False)

    cpu = run_settings(plan("cpu"), linux_cpu())
    assert cpu.attn_implementation == VARLEN_ATTENTION and cpu.padding_free
    assert "padding-free" in cpu.describe()
    assert run_settings(plan("cpu", packing=True), linux_cpu()).padding_free
    gpu = run_settings(plan("cuda"), with_gpu("NVIDIA A100", (8, 0), CU128, 40))
    assert not gpu.padding_free and "padding-free" not in gpu.describe()


def test_cpu_only_kernel_choices_are_settled_in_run_settings():
    from hafs.training.precision import run_settings

    def plan(device, precision="bf16", distributed=None):
        return types.SimpleNamespace(device=device, precision=precision, packing=False, gradient_checkpointing=False,
                                     hardware=types.SimpleNamespace(distributed=distributed))

    cpu = run_settings(plan("cpu"), linux_cpu())
    assert cpu.bf16_loss_softmax and cpu.lean_rotary and cpu.lean_rms_norm and cpu.fused_optimizer
    assert cpu.packed_weights
    # a CPU without fast bf16 trains in fp32: the loss keeps its fp32 softmax, the weights stay unpacked
    fp32 = run_settings(plan("cpu"), linux_cpu(bf16=False))
    assert not fp32.bf16_loss_softmax and not fp32.packed_weights
    assert not run_settings(plan("cpu", distributed="fsdp"), linux_cpu()).packed_weights  # sharded layers
    gpu = run_settings(plan("cuda"), with_gpu("NVIDIA A100", (8, 0), CU128, 40))
    assert not (gpu.bf16_loss_softmax or gpu.packed_weights)
    # hafs's RMSNorm and rotary nodes rather than Liger's Triton kernels: fewer host cycles per launch-bound step
    assert gpu.lean_rotary and gpu.lean_rms_norm and not gpu.liger
    # a GPU without bf16 trains in fp16: transformers' fp32 RMSNorm, no row factor rounded to fp16
    t4 = run_settings(plan("cuda"), with_gpu("Tesla T4", (7, 5), CU128, 16))
    assert t4.precision == "fp16" and not (t4.lean_rms_norm or t4.lean_rotary or t4.liger)
    assert gpu.fused_optimizer
    assert not gpu.sdpa_cudnn  # no per-shape cuDNN graphs for length-grouped batches


def test_attention_kernels_keep_cudnn_out_only_when_asked():
    torch = pytest.importorskip("torch")
    from hafs.training.precision import RunSettings

    flags = (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.flash_sdp_enabled,
             torch.backends.cuda.mem_efficient_sdp_enabled)
    before = [f() for f in flags]
    with RunSettings(device="cuda", sdpa_cudnn=False).attention_kernels():
        assert [f() for f in flags] == [False, True, True]
    assert [f() for f in flags] == before
    cpu = RunSettings(device="cpu", sdpa_cudnn=False)
    with RunSettings(device="cuda", sdpa_cudnn=True).attention_kernels(), cpu.attention_kernels():
        assert [f() for f in flags] == before  # cuDNN allowed, and CPU runs, leave SDPA's choice alone
    with RunSettings(device="cuda").attention_kernels():
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # the default: no per-shape cuDNN graphs
    with RunSettings(device="cpu", precision="bf16", autocast_dtype="bfloat16").autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
