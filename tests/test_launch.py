"""`hafs launch`: the SkyPilot task built from a preset, checked by SkyPilot's own task loader."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hafs.training.errors import ConfigError
from hafs.training.launch import accelerator_for, build_task, cluster_name, cmd_launch, task_yaml
from hafs.training.loader import load_config
from hafs.training.plan import resolve
from hafs.training.schema import HardwareProfile

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "training.toml"


@pytest.fixture
def dataset(tmp_path) -> Path:
    d = tmp_path / "alttp_yaze_full"
    d.mkdir()
    (d / "train.jsonl").write_text('{"instruction": "LDA #$01", "output": "loads 1"}\n')
    return d


def _plan(preset: str, dataset: Path, *extra: str):
    return resolve(load_config(CONFIG), preset, [f"dataset.path={dataset}", *extra])


def _sky_python() -> str:
    """A Python that imports SkyPilot: this one, or the interpreter of the `sky` command on PATH.

    SkyPilot usually lives in its own environment (its click pin conflicts with transformers').
    """
    if importlib.util.find_spec("sky") is not None:
        return sys.executable
    exe = shutil.which("sky")
    if exe:
        first = Path(exe).read_text(errors="replace").splitlines()[0]
        if first.startswith("#!") and Path(first[2:].strip().split()[0]).exists():
            return first[2:].strip().split()[0]
    pytest.skip("SkyPilot not installed (pipx install skypilot, or its `sky` on PATH)")


def _sky_task(task: dict, tmp_path: Path) -> dict:
    """What SkyPilot's own loader (`sky.Task.from_yaml`, as `sky launch` reads it) makes of the task."""
    path = tmp_path / "task.sky.yaml"
    path.write_text(task_yaml(task))
    code = ("import json, sys, sky\n"
            "t = sky.Task.from_yaml(sys.argv[1])\n"
            "(r,) = t.resources\n"
            "print(json.dumps({'cloud': str(r.cloud), 'accelerators': r.accelerators, 'num_nodes': t.num_nodes,"
            " 'file_mounts': t.file_mounts, 'workdir': t.workdir, 'setup': t.setup, 'run': t.run,"
            " 'envs': t.envs}))\n")
    proc = subprocess.run([_sky_python(), "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_single_gpu_task_on_runpod(dataset):
    plan = _plan("oracle-rauru-cloud", dataset, "learning_rate=3e-4")
    task = build_task(plan, "runpod", overrides=[f"dataset.path={dataset}", "learning_rate=3e-4"], workdir=ROOT)
    assert task["resources"] == {"infra": "runpod", "accelerators": "RTX4090:1"}
    assert task["num_nodes"] == 1 and task["workdir"] == str(ROOT)
    assert task["file_mounts"] == {"~/hafs-run/config/training.toml": str(CONFIG.resolve()),
                                   f"~/hafs-run/data/{dataset.name}": str(dataset)}
    run = task["run"]
    assert "torchrun" not in run
    assert ('hafs train oracle-rauru-cloud --config "$HOME/hafs-run/config/training.toml" '
            f'--set "dataset.path=$HOME/hafs-run/data/{dataset.name}"') in run
    assert '--set "output.models_dir=$HOME/hafs-run/models"' in run and '--set "output.registry="' in run
    assert "--set learning_rate=3e-4" in run
    assert str(dataset) not in run  # the local path override was replaced by the uploaded copy
    assert "pip install -e ." in task["setup"] and "torch" in task["setup"]

    parsed = _sky_task(task, dataset.parent)
    assert parsed["cloud"] == "RunPod" and parsed["accelerators"] == {"RTX4090": 1}
    assert parsed["num_nodes"] == 1 and parsed["workdir"] == str(ROOT)
    assert parsed["file_mounts"] == task["file_mounts"] and parsed["run"] == run
    assert parsed["setup"] == task["setup"] and parsed["envs"]["HAFS_PRESET"] == "oracle-rauru-cloud"


def test_multi_gpu_runs_torchrun(dataset):
    plan = _plan("oracle-rauru-cloud-x4", dataset)
    task = build_task(plan, "lambda", workdir=ROOT)
    assert task["resources"]["accelerators"] == "A100:4"
    assert "torchrun --nnodes=$SKYPILOT_NUM_NODES" in task["run"]
    assert "--nproc_per_node=$SKYPILOT_NUM_GPUS_PER_NODE" in task["run"]
    assert "--no-python hafs train oracle-rauru-cloud-x4" in task["run"]
    parsed = _sky_task(task, dataset.parent)
    assert parsed["cloud"] == "Lambda" and parsed["accelerators"] == {"A100": 4}


def test_multi_node_is_lambda_only(dataset):
    plan = _plan("oracle-rauru-cloud-x4", dataset, "hardware.num_nodes=2")
    with pytest.raises(ConfigError) as err:
        build_task(plan, "runpod", workdir=ROOT)
    assert "does not run multi-node" in str(err.value) and "hardware.cloud-a100-40gb-x4.num_nodes" in str(err.value)
    task = build_task(plan, "lambda", workdir=ROOT)
    assert task["num_nodes"] == 2 and 'MASTER_ADDR=$(echo "$SKYPILOT_NODE_IPS" | head -n1)' in task["run"]
    assert _sky_task(task, dataset.parent)["num_nodes"] == 2


def test_local_base_model_is_uploaded(dataset, tmp_path):
    base = tmp_path / "my-base"
    base.mkdir()
    plan = _plan("oracle-rauru-cloud", dataset, f"expert.base_model={base}")
    task = build_task(plan, "runpod", overrides=[f"expert.base_model={base}"], workdir=ROOT)
    assert task["file_mounts"]["~/hafs-run/base/my-base"] == str(base)
    assert task["run"].count("expert.base_model=") == 1
    assert '--set "expert.base_model=$HOME/hafs-run/base/my-base"' in task["run"]


@pytest.mark.parametrize("key, name, accelerator, expected", [
    ("cloud-rtx-4090", "Cloud RTX 4090 24GB", "", "RTX4090"),
    ("cloud-a100-40gb", "Cloud A100 40GB", "", "A100"),
    ("cloud-a100-80gb", "Cloud A100 80GB", "", "A100-80GB"),
    ("cloud-a100-40gb-x4", "Cloud 4x A100 40GB", "", "A100"),
    ("cloud-h100", "H100 SXM", "", "H100"),
    ("rented", "Cloud L40S 48GB", "", "L40S"),
    ("cloud-rtx-6000-ada", "RTX 6000 Ada", "", "RTX6000-Ada"),
    ("whatever", "anything", "H200", "H200"),
])
def test_accelerator_from_profile(key, name, accelerator, expected):
    assert accelerator_for(key, HardwareProfile(name=name, device="cuda", accelerator=accelerator)) == expected


def test_unknown_gpu_asks_for_the_accelerator_key():
    with pytest.raises(ConfigError) as err:
        accelerator_for("my-box", HardwareProfile(name="Home GPU", device="cuda"))
    assert err.value.problems[0].key == "hardware.my-box.accelerator"


def test_refuses_cpu_profiles_and_missing_datasets(dataset, tmp_path):
    with pytest.raises(ConfigError, match="cloud GPUs need a cuda one"):
        build_task(resolve(load_config(CONFIG), "demo"), "runpod", workdir=ROOT)
    with pytest.raises(ConfigError, match="has no train.jsonl"):
        build_task(_plan("oracle-rauru-cloud", tmp_path / "nowhere"), "runpod", workdir=ROOT)
    with pytest.raises(ConfigError, match="unknown cloud"):
        build_task(_plan("oracle-rauru-cloud", dataset), "aws", workdir=ROOT)


def _args(**kw):
    base = dict(preset="oracle-rauru-cloud", cloud="runpod", dry_run=True, overrides=[], config=str(CONFIG),
                verbose=False, json=False)
    return argparse.Namespace(**{**base, **kw})


def test_dry_run_prints_the_task_yaml(dataset, capsys):
    assert cmd_launch(_args(overrides=[f"dataset.path={dataset}"])) == 0
    out = capsys.readouterr().out
    task = yaml.safe_load(out)  # summary and instructions are YAML comments
    assert task["name"] == cluster_name("oracle-rauru-cloud") == "hafs-oracle-rauru-cloud"
    assert task["resources"]["accelerators"] == "RTX4090:1"
    assert "rsync -Pavz hafs-oracle-rauru-cloud:~/hafs-run/models/" in out and "sky down" in out
    assert "$0.60/hour" in out


def test_launch_without_skypilot_explains_how_to_get_it(dataset, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sky" else real(name, *a))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(ConfigError) as err:
        cmd_launch(_args(dry_run=False, overrides=[f"dataset.path={dataset}"]))
    assert "pipx install skypilot" in str(err.value) and "--dry-run" in str(err.value)


def test_a_signal_while_torchrun_starts_reaches_the_workers(monkeypatch):
    """A SIGTERM that lands while the launcher starts torchrun (its handlers already in) is handed on once
    torchrun exists, instead of stopping the launcher alone and leaving torchrun training as an orphan."""
    import os
    import signal
    import subprocess
    from types import SimpleNamespace

    from hafs.training import relaunch

    sent = []

    class Agent:
        pid = 4242

        def __init__(self, cmd, **kwargs):
            assert kwargs["start_new_session"]
            os.kill(os.getpid(), signal.SIGTERM)  # arrives inside Popen, before the launcher knows the pid

        def wait(self):
            return 0

    monkeypatch.setattr(relaunch, "relaunch_command", lambda plan, argv: ["torchrun", "train.py"])
    monkeypatch.setattr(subprocess, "Popen", Agent)
    monkeypatch.setattr(relaunch, "signal_workers", lambda pid, signum: sent.append((pid, signum)))
    plan = SimpleNamespace(hardware=SimpleNamespace(num_nodes=1), world_size=lambda: 2)
    missed = []  # where the signal goes if the launcher's handlers are not in yet (instead of killing pytest)
    def miss(signum, _frame):
        missed.append(signum)

    before = signal.signal(signal.SIGTERM, miss)
    try:
        assert relaunch.relaunch(plan, [], log=lambda *_: None) == 0  # no status file: torchrun's own code
        assert sent == [(4242, signal.SIGTERM)] and missed == []
        assert signal.getsignal(signal.SIGTERM) is miss  # the launcher put the caller's handler back
    finally:
        signal.signal(signal.SIGTERM, before)
