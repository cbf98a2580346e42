"""The dry run's time estimate: read from earlier runs' metadata.json, never guessed."""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_hardware import CU128, linux_cpu, with_gpu

from hafs.training.earlier_runs import describe_estimate, find_earlier_run
from hafs.training.loader import load_config

ROOT = Path(__file__).resolve().parents[1]
CPU = "cpu: Fake EPYC, 8 cores, 32.0 GiB RAM"


def write_run(models: Path, name: str, *, base="hafs-demo/tiny-qwen2", device=CPU, precision="bf16",
              seconds=10.0, tokens=20_000, age=0.0, created="2026-11-27T05:00:00", checkpointing=False) -> Path:
    folder = models / name
    folder.mkdir(parents=True)
    meta = {"model": {"base": base}, "hardware": {"device_name": device},
            "training": {"precision": precision, "duration_seconds": seconds, "tokens_trained": tokens},
            "metadata": {"created": created}, "run_settings": {"gradient_checkpointing": checkpointing}}
    path = folder / "metadata.json"
    path.write_text(json.dumps(meta))
    stamp = path.stat().st_mtime - age
    os.utime(path, (stamp, stamp))
    return folder


def test_the_newest_run_of_the_same_model_device_and_precision_is_the_evidence(tmp_path):
    write_run(tmp_path, "old", seconds=10, tokens=10_000, age=3600)
    newest = write_run(tmp_path, "newest", seconds=10, tokens=30_000, age=60)
    write_run(tmp_path, "other-gpu", device="cuda: NVIDIA H200 (sm_90, 139.7 GiB)", tokens=900_000)
    write_run(tmp_path, "other-base", base="Qwen/Qwen2.5-Coder-1.5B", tokens=900_000)
    write_run(tmp_path, "fp32", precision="fp32", tokens=900_000)
    write_run(tmp_path, "untimed", seconds=0, tokens=900_000)
    write_run(tmp_path, "on-4-gpus", tokens=900_000).joinpath("metadata.json").write_text(json.dumps(
        {"model": {"base": "hafs-demo/tiny-qwen2"}, "hardware": {"device_name": CPU}, "metadata": None,
         "training": {"precision": "bf16", "duration_seconds": 1, "tokens_trained": 9e6, "world_size": 4}}))
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "metadata.json").write_text('{"model": ')  # a run killed mid-write
    run = find_earlier_run(tmp_path, base_model="hafs-demo/tiny-qwen2", device=CPU, precision="bf16")
    assert run.model_dir == newest and run.tokens_per_second == 3_000
    assert find_earlier_run(tmp_path, base_model="hafs-demo/tiny-qwen2", device=CPU, precision="fp16") is None
    assert find_earlier_run(tmp_path / "missing", base_model="x", device=CPU, precision="bf16") is None
    # A newer run with gradient checkpointing (a second forward per layer) only stands for a checkpointed plan.
    checkpointed = write_run(tmp_path, "checkpointed", tokens=900_000, checkpointing=True)
    assert find_earlier_run(tmp_path, base_model="hafs-demo/tiny-qwen2", device=CPU, precision="bf16",
                            checkpointing=False).model_dir == newest
    for either in (True, None):
        assert find_earlier_run(tmp_path, base_model="hafs-demo/tiny-qwen2", device=CPU, precision="bf16",
                                checkpointing=either).model_dir == checkpointed
    # tokens_trained counts every worker's: a 4-worker run only stands for a 4-worker plan
    four = find_earlier_run(tmp_path, base_model="hafs-demo/tiny-qwen2", device=CPU, precision="bf16", world_size=4)
    assert four.model_dir.name == "on-4-gpus" and four.tokens_per_second == 9e6 and four.created == ""


def test_estimate_names_its_source_and_scales_by_tokens(tmp_path):
    run = find_earlier_run(write_run(tmp_path, "r1", seconds=37.3, tokens=58_868).parent,
                           base_model="hafs-demo/tiny-qwen2", device=CPU, precision="bf16")
    assert describe_estimate(58_868, run) == ("~37 s (58,868 tokens at 1,578 tokens/s, as r1 did on 2026-11-27)")
    assert describe_estimate(58_868 * 10, run).startswith("~6 min ")
    assert describe_estimate(58_868 * 300, run).startswith("~3.1 h ")


def test_dry_run_prints_the_time_only_with_an_earlier_run_to_go_by(tmp_path):
    from hafs.training.dryrun import dry_run

    cfg = load_config(ROOT / "config" / "training.toml")
    overrides = [f"output.models_dir={tmp_path}"]
    report = dry_run(cfg, "demo", overrides, caps=linux_cpu())
    assert "training time (est.)" not in report.numbers
    # A run of the same model on another machine is no evidence for this one.
    write_run(tmp_path, "on-a-gpu", device=with_gpu("NVIDIA H200", (9, 0), CU128, 139).describe("cuda"))
    assert "training time (est.)" not in dry_run(cfg, "demo", overrides, caps=linux_cpu()).numbers
    write_run(tmp_path, "here", seconds=4, tokens=40_000, age=60)  # 10,000 tokens/s
    write_run(tmp_path, "checkpointed", seconds=1, tokens=40_000, checkpointing=True)  # newer; the demo fits without
    report = dry_run(cfg, "demo", overrides, caps=linux_cpu())
    tokens = (report.numbers.get("training tokens") or report.numbers["training tokens (est.)"]) * 3  # 3 epochs
    assert report.numbers["training time (est.)"].startswith(
        f"~{round(tokens / 10_000)} s ({tokens:,} tokens at 10,000 tokens/s, as here did")
    assert "training time (est.)" in report.render()


def test_dry_run_time_counts_max_steps_and_accumulation_and_needs_the_planned_device(tmp_path):
    from hafs.training.dryrun import dry_run

    cfg = load_config(ROOT / "config" / "training.toml")
    write_run(tmp_path, "here", seconds=4, tokens=40_000)
    report = dry_run(cfg, "demo", [f"output.models_dir={tmp_path}", "max_steps=5", "gradient_accumulation=2"],
                     caps=linux_cpu())
    per_epoch = report.numbers.get("training tokens") or report.numbers["training tokens (est.)"]
    steps_per_epoch = -(-report.numbers["micro-batches per epoch"] // 2)
    tokens = int(per_epoch * 5 / steps_per_epoch)
    assert report.numbers["optimizer steps"] == 5
    assert f"({tokens:,} tokens at 10,000 tokens/s" in report.numbers["training time (est.)"]
    # A CUDA plan dry-run on a machine without a GPU: this CPU's runs say nothing about it.
    gpu = dry_run(cfg, "demo", [f"output.models_dir={tmp_path}", "hardware.device=cuda"], caps=linux_cpu())
    assert "training time (est.)" not in gpu.numbers
