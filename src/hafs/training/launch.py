"""`hafs launch PRESET --cloud runpod|lambda`: train a preset on a rented GPU through SkyPilot.

The preset is resolved and checked here first (no money is spent on a config error). The SkyPilot
task then says: the accelerator of the preset's hardware profile (`accelerator`, else derived from
the profile's name: cloud-rtx-4090 → RTX4090), `num_gpus` per node and `num_nodes` machines; the
project as workdir; the config file, the dataset (and a local base model) uploaded; setup installs
hafs with a CUDA torch; run calls `hafs train` (under torchrun for several GPUs). The model comes
back with rsync (printed after launch): RunPod and Lambda have no object store SkyPilot could
mount without another cloud's credentials.

SkyPilot is used through its `sky` command, installed as a tool of its own (`pipx install
skypilot`): it pins click < 8.2 while transformers' huggingface_hub needs click >= 8.4.2, so pip
cannot put both in one environment. `--dry-run` prints the task YAML without it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import ConfigError, Problem

CLOUDS = {"runpod": "RunPod", "lambda": "Lambda Cloud"}
MULTI_NODE_CLOUDS = ("lambda",)
"""Clouds on which SkyPilot provisions several nodes for one task (RunPod: single node only)."""
REMOTE_ROOT = "~/hafs-run"
"""Everything the run reads or writes on the cluster lives under this folder."""
INSTALL_HINT = ("install SkyPilot as its own tool (its click pin conflicts with transformers'): "
                "pipx install skypilot  (or: uv tool install skypilot), then `sky check runpod` (or lambda)")
LOCAL_PATH_KEYS = ("dataset.path", "output.models_dir", "output.logs_dir", "output.checkpoints_dir",
                   "output.registry", "expert.base_model")
"""Overrides naming paths on this machine: the task points them at the uploaded copies instead."""
KNOWN_ACCELERATORS = (
    "B200", "H200", "H100", "H100-MEGA", "GH200", "A100", "A100-80GB", "A10G", "A10", "A40", "A6000", "A5000",
    "A4000", "L40S", "L40", "L4", "T4", "V100", "V100-32GB", "RTX4090", "RTX5090", "RTX3090", "RTX4000-Ada",
    "RTX6000-Ada", "RTXA6000", "RTXA5000", "RTXA4000", "RTX6000", "MI300X",
)
"""SkyPilot accelerator names a profile name may be derived to (else set `accelerator` in the profile)."""


def accelerator_for(profile_key: str, hw) -> str:
    """SkyPilot accelerator name: the profile's `accelerator`, else derived from its key or name.

    cloud-rtx-4090 → RTX4090, cloud-a100-40gb → A100, cloud-a100-80gb → A100-80GB, cloud-h100 → H100.
    """
    if hw.accelerator:
        return hw.accelerator
    known = {k.replace("-", "").upper(): k for k in KNOWN_ACCELERATORS}
    for text in (profile_key, hw.name):
        tokens = [t for t in re.split(r"[-_\s]+", text.lower())
                  if t and t not in ("cloud", "gpu", "nvidia") and not re.fullmatch(r"x\d+|\d+x", t)]
        memory = "".join(t for t in tokens if re.fullmatch(r"\d+gb", t)).upper()
        chip = "".join(t for t in tokens if not re.fullmatch(r"\d+gb", t)).upper()
        for candidate in (chip + memory, chip):  # A100 + 80GB → A100-80GB; A100 + 40GB → A100
            if candidate in known:
                return known[candidate]
    raise ConfigError([Problem(f"cannot tell which cloud GPU hardware profile '{profile_key}' ({hw.name}) is",
                               key=f"hardware.{profile_key}.accelerator",
                               hint='add e.g. accelerator = "RTX4090" to the profile (SkyPilot\'s GPU name)')])


def project_dir() -> Path | None:
    """The hafs source checkout this code runs from (synced as workdir), or None when installed from a wheel."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "hafs").is_dir() else None


def cluster_name(preset: str) -> str:
    """SkyPilot cluster names: lowercase letters, digits and '-', starting with a letter."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"hafs-{preset}".lower()).strip("-")
    return re.sub(r"-{2,}", "-", name)[:60].rstrip("-")


def build_task(plan, cloud: str, *, overrides: list[str] | tuple = (), workdir: Path | None = None) -> dict:
    """The SkyPilot task (as its YAML dict) that runs `hafs train plan.preset` on `cloud`."""
    if cloud not in CLOUDS:
        raise ConfigError([Problem(f"unknown cloud '{cloud}'", key="--cloud", hint=f"one of: {', '.join(CLOUDS)}")])
    hw, key = plan.hardware, plan.hardware_name
    problems = []
    if hw.device not in ("cuda", "auto"):
        problems.append(Problem(f"hardware profile '{key}' is a {hw.device} profile; cloud GPUs need a cuda one",
                                key=f"presets.{plan.preset}.hardware", file=plan.config_path,
                                hint="use a preset on a cloud-* profile (hafs list presets)"))
    if hw.num_nodes > 1 and cloud not in MULTI_NODE_CLOUDS:
        problems.append(Problem(f"{CLOUDS[cloud]} does not run multi-node tasks (profile '{key}' has "
                                f"num_nodes = {hw.num_nodes})", key=f"hardware.{key}.num_nodes",
                                file=plan.config_path,
                                hint=f"use --cloud {' or '.join(MULTI_NODE_CLOUDS)}, "
                                     "or num_nodes = 1 with more num_gpus"))
    if problems:
        raise ConfigError(problems, title=f"Preset '{plan.preset}' cannot be launched on {CLOUDS[cloud]}:")
    config_path = Path(plan.config_path)
    dataset_dir = Path(plan.dataset_dir)
    _check_local_inputs(plan, config_path, dataset_dir)
    workdir = workdir if workdir is not None else project_dir()

    remote_config = f"{REMOTE_ROOT}/config/{config_path.name}"
    remote_data = f"{REMOTE_ROOT}/data/{dataset_dir.name}"
    mounts = {remote_config: str(config_path), remote_data: str(dataset_dir)}
    # $HOME, not ~: the values go through --set, where the shell would not expand a ~ after '='.
    sets = [f"dataset.path=$HOME/{remote_data[2:]}"]
    sets += [f"output.{d}=$HOME/{REMOTE_ROOT[2:]}/{d.split('_')[0]}" for d in ("models_dir", "logs_dir",
                                                                                "checkpoints_dir")]
    sets.append("output.registry=")  # the user's registry is on their machine, not the cluster
    base = _local_base_model(plan)
    if base is not None:
        mounts[f"{REMOTE_ROOT}/base/{base.name}"] = str(base)
        sets.append(f"expert.base_model=$HOME/{REMOTE_ROOT[2:]}/base/{base.name}")

    args = ["train", plan.preset, "--config", _expandable(f"$HOME/{remote_config[2:]}")]
    for value in sets:
        args += ["--set", _expandable(value)]
    for value in overrides:  # the user's own, passed literally; local paths were replaced above
        if value.split("=", 1)[0].strip() not in LOCAL_PATH_KEYS:
            args += ["--set", shlex.quote(value)]
    command = " ".join(args)
    run = ["set -e"]
    if hw.num_gpus * hw.num_nodes > 1:
        # SkyPilot's documented multi-node recipe: the first node's IP is the rendezvous address.
        run += ['MASTER_ADDR=$(echo "$SKYPILOT_NODE_IPS" | head -n1)',
                "torchrun --nnodes=$SKYPILOT_NUM_NODES --node_rank=$SKYPILOT_NODE_RANK "
                "--nproc_per_node=$SKYPILOT_NUM_GPUS_PER_NODE --master_addr=$MASTER_ADDR --master_port=29500 "
                f"--no-python hafs {command}"]
    else:
        run.append(f"hafs {command}")

    setup = ["set -e", "python3 -m pip install --upgrade pip",
             # PyPI's Linux torch wheels are the CUDA builds; an image's preinstalled CUDA torch that
             # satisfies the range is kept.
             "python3 -m pip install 'torch>=2.4'"]
    setup.append("python3 -m pip install -e ." if workdir else "python3 -m pip install hafs")

    task: dict = {"name": cluster_name(plan.preset)}
    if workdir:
        task["workdir"] = str(workdir)
    task["resources"] = {"infra": cloud, "accelerators": f"{accelerator_for(key, hw)}:{hw.num_gpus}"}
    task["num_nodes"] = hw.num_nodes
    task["envs"] = {"PYTHONUNBUFFERED": "1", "HAFS_PRESET": plan.preset}
    task["file_mounts"] = mounts
    task["setup"] = "\n".join(setup) + "\n"
    task["run"] = "\n".join(run) + "\n"
    return task


def _expandable(arg: str) -> str:
    """Double-quoted for the remote shell: $HOME expands, nothing else is interpreted."""
    return '"' + re.sub(r'(["\\`$])', r"\\\1", arg).replace("\\$HOME", "$HOME") + '"'


def _check_local_inputs(plan, config_path: Path, dataset_dir: Path) -> None:
    problems = []
    if not config_path.is_file():
        problems.append(Problem("the config must be a file to upload it", file=str(config_path),
                                hint="pass --config FILE"))
    train = dataset_dir / plan.dataset.train_split
    if not train.is_file():
        problems.append(Problem(f"dataset '{plan.dataset_name}' has no {plan.dataset.train_split} to upload",
                                key=f"datasets.{plan.dataset_name}.path", file=plan.config_path,
                                hint=f"expected {train}"))
    if problems:
        raise ConfigError(problems, title=f"Preset '{plan.preset}' cannot be launched:")


def _local_base_model(plan) -> Path | None:
    """A base model that is a folder on this machine must travel too; hub ids and demo models do not."""
    from .plan import resolve_path

    name = plan.expert.base_model
    if name.startswith("hafs-demo/"):
        return None
    path = resolve_path(name, plan.config_dir())
    return path.resolve() if path.is_dir() else None


def task_yaml(task: dict) -> str:
    """The task as YAML, multi-line scripts as literal blocks (readable, and what `sky launch` takes)."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    _Dumper.add_representer(str, _str)
    return yaml.dump(task, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def fetch_instructions(task: dict, models_dir: str = "./models") -> list[str]:
    """How to follow the run, bring the trained model home and stop paying for the cluster."""
    name = task["name"]
    return [f"Follow the run:   sky logs {name}",
            "When it has finished, copy the model back and stop the cluster:",
            f"  rsync -Pavz {name}:{REMOTE_ROOT}/models/ {shlex.quote(os.path.normpath(models_dir))}/",
            f"  sky down {name}"]


def cmd_launch(args) -> int:
    from .loader import load_config
    from .plan import resolve

    cfg = load_config(args.config)
    plan = resolve(cfg, args.preset, args.overrides)
    task = build_task(plan, args.cloud, overrides=args.overrides)
    text = task_yaml(task)
    gpus = plan.hardware.num_gpus * plan.hardware.num_nodes
    cost = plan.hardware.cost_per_hour
    summary = (f"# {plan.preset} on {CLOUDS[args.cloud]}: {task['resources']['accelerators']} x {task['num_nodes']} "
               f"node(s), {gpus} GPU(s)" + (f", about ${cost * plan.hardware.num_nodes:.2f}/hour" if cost else ""))
    if args.dry_run:
        notes = "".join(f"# {line}\n" for line in fetch_instructions(task, plan.output.models_dir))
        print(f"{summary}\n{text}{notes}", end="")
        return 0
    sky = _sky_command()
    out_dir = Path(plan.output.logs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    yaml_path = out_dir / f"{task['name']}.sky.yaml"
    yaml_path.write_text(text, encoding="utf-8")
    print(f"{summary}\nTask written to {yaml_path}")
    # The sky CLI (not its Python API) so the user sees SkyPilot's own price table and confirms it.
    proc = subprocess.run([*sky, "launch", "--cluster", task["name"], str(yaml_path)])
    if proc.returncode != 0:
        raise ConfigError([Problem(f"sky launch failed (exit {proc.returncode})",
                                   hint=f"see SkyPilot's message above; `sky check {args.cloud}` tests credentials")])
    print("\n".join(fetch_instructions(task, plan.output.models_dir)))
    return 0


def _sky_command() -> list[str]:
    """The `sky` CLI: on PATH (pipx / uv tool install), else SkyPilot importable in this environment."""
    exe = shutil.which("sky")
    if exe:
        return [exe]
    import importlib.util

    if importlib.util.find_spec("sky") is not None:
        return [sys.executable, "-c", "import sys; from sky.cli import cli; sys.exit(cli())"]
    raise ConfigError([Problem("hafs launch needs SkyPilot's `sky` command, which is not installed",
                               hint=INSTALL_HINT + "; --dry-run prints the task without it")])
