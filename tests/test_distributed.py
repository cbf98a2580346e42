"""Data-parallel training on CPU: 2 gloo workers under torchrun against one process with the same global batch.

The 2-worker run is started the way a user starts it on a multi-GPU profile: `python scripts/train.py
PRESET` with `hardware.num_gpus = 2`, which re-executes itself under torchrun. Its per-step losses and
its final adapter must match a single process with gradient_accumulation doubled (same micro-batches
per optimizer step), and exactly one model directory may appear.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
PRESET = "dist-test"

HYPERPARAMETERS = """
{steps}
learning_rate = 2e-3
warmup_steps = 1
logging_steps = 1
save_steps = 2
seed = 3
"""


def make_config(root: Path, model: Path, accumulation: int, *, data: Path = REPO / "data" / "demo",
                steps: str = "max_steps = 4") -> Path:
    return tiny_config(root, model, preset=PRESET, data=data, gradient_accumulation=accumulation,
                       hyperparameters=HYPERPARAMETERS.format(steps=steps), hyperparameters_name="dist")


def small_dataset(root: Path, train_rows: int, val_rows: int) -> Path:
    """The first rows of the demo dataset (an epoch of a few micro-batches)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train_rows), ("val", val_rows)):
        lines = (REPO / "data" / "demo" / f"{split}.jsonl").read_text().splitlines()[:n]
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def train(config: Path, *extra: str, evaluate: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HAFS_TEST_SLOW_STEP_MS"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), PRESET, "--config", str(config),
                           *([] if evaluate else ["--no-eval"]), *extra],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO, check=False)
    assert done.returncode == 0, f"train.py failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def only_model(root: Path) -> Path:
    dirs = [p for p in (root / "models").iterdir()]
    assert len(dirs) == 1, dirs  # no second directory, no staging leftovers from another rank
    return dirs[0]


def adapter(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "adapter_model.safetensors"))


def test_two_gloo_workers_match_one_process_with_the_same_global_batch(tmp_path, tiny_model):
    train(make_config(tmp_path / "single", tiny_model, accumulation=2))
    multi = train(make_config(tmp_path / "multi", tiny_model, accumulation=1), "--set", "hardware.num_gpus=2")

    assert "torch.distributed.run" in multi.stdout and "--nproc_per_node=2" in multi.stdout
    assert "global batch = 2 x 1 x 2 = 4 per step" in multi.stdout
    assert multi.stdout.count("Model saved to:") == 1  # rank 1 prints nothing of its own
    one, two = only_model(tmp_path / "single"), only_model(tmp_path / "multi")
    meta1, meta2 = (json.loads((d / "metadata.json").read_text()) for d in (one, two))
    assert meta2["training"]["world_size"] == 2 and meta1["training"]["world_size"] == 1
    assert meta1["training"]["tokens_trained"] == meta2["training"]["tokens_trained"]
    losses1, losses2 = meta1["losses"]["train"], meta2["losses"]["train"]
    assert [s for s, _ in losses1] == [s for s, _ in losses2] == [1, 2, 3, 4]
    assert losses1[-1][1] < losses1[0][1]  # it trained
    for (_, a), (_, b) in zip(losses1, losses2):
        assert abs(a - b) < 1e-4, (losses1, losses2)
    w1, w2 = adapter(one), adapter(two)
    assert w1.keys() == w2.keys() and w1
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    # rank 0 alone wrote checkpoints: one run folder, rotated to the newest two steps
    runs = list((tmp_path / "multi" / "checkpoints").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in runs[0].iterdir()) == ["checkpoint-2"]

    # resume under 2 workers from step 2: both ranks restore it and finish like the uninterrupted run
    train(tmp_path / "multi" / "training.toml", "--set", "hardware.num_gpus=2", "--resume",
          str(runs[0] / "checkpoint-2"))
    resumed = [d for d in (tmp_path / "multi" / "models").iterdir() if d != two]
    assert len(resumed) == 1
    meta3 = json.loads((resumed[0] / "metadata.json").read_text())
    assert meta3["resume"]["from_step"] == 2 and meta3["losses"]["train"] == losses2
    w3 = adapter(resumed[0])
    assert max(float((w2[k] - w3[k]).abs().max()) for k in w2) < 1e-6


def test_fsdp_workers_shard_the_base_and_match_one_process_on_an_uneven_epoch(tmp_path, tiny_model):
    # 7 kept samples, one per micro-batch: the epoch's last step has one micro-batch, and under fsdp
    # rank 1 must still join its all-gathers (engine: a zero-weighted micro-batch). Evaluation is
    # on: the before/after val loss and the greedy generations run on both ranks in lockstep.
    data = small_dataset(tmp_path / "data", train_rows=10, val_rows=4)
    steps, unpacked = "num_epochs = 1", ("--set", "packing=false", "--set", "batch_size=1")
    train(make_config(tmp_path / "single", tiny_model, accumulation=2, data=data, steps=steps), *unpacked,
          evaluate=True)
    multi = train(make_config(tmp_path / "multi", tiny_model, accumulation=1, data=data, steps=steps), *unpacked,
                  "--set", "hardware.num_gpus=2", "--set", "hardware.distributed=fsdp", evaluate=True)

    assert "global batch = 1 x 1 x 2 = 2 per step" in multi.stdout, multi.stdout
    assert "7 training samples" in multi.stdout
    one, two = only_model(tmp_path / "single"), only_model(tmp_path / "multi")
    meta1, meta2 = (json.loads((d / "metadata.json").read_text()) for d in (one, two))
    losses1, losses2 = meta1["losses"]["train"], meta2["losses"]["train"]
    assert [s for s, _ in losses1] == [s for s, _ in losses2] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(losses1, losses2):
        assert abs(a - b) < 1e-4, (losses1, losses2)
    w1, w2 = adapter(one), adapter(two)
    assert w1.keys() == w2.keys() and w1
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    e1, e2 = meta1["evaluation"], meta2["evaluation"]
    assert abs(e1["after"]["val"]["loss"] - e2["after"]["val"]["loss"]) < 1e-4
    assert e1["after"]["val"]["loss"] != e1["before"]["val"]["loss"]
    gens = (two / "eval" / "generations.jsonl").read_text().splitlines()
    assert gens == (one / "eval" / "generations.jsonl").read_text().splitlines() and gens

    # resume under fsdp (rank 0 wrote the checkpoint alone), and non-reentrant checkpointing inside the
    # sharded layers (recomputation all-gathers again): both end where the plain fsdp run did
    fsdp = ("--set", "hardware.num_gpus=2", "--set", "hardware.distributed=fsdp")
    run = next((tmp_path / "multi" / "checkpoints").iterdir())
    train(tmp_path / "multi" / "training.toml", *unpacked, *fsdp, "--resume", str(run / "checkpoint-2"))
    train(tmp_path / "multi" / "training.toml", *unpacked, *fsdp, "--set", "gradient_checkpointing=true")
    later = [d for d in (tmp_path / "multi" / "models").iterdir() if d != two]
    assert len(later) == 2
    for d in later:
        w = adapter(d)
        assert max(float((w2[k] - w[k]).abs().max()) for k in w2) < 1e-6, d


def test_dry_run_prints_the_torchrun_and_accelerate_commands(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, accumulation=1)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), PRESET, "--config", str(config),
                           "--dry-run", "--set", "hardware.num_gpus=4"], capture_output=True, text=True,
                          timeout=120, cwd=REPO, check=False)
    assert "torchrun --standalone --nproc_per_node=4" in done.stdout, done.stdout + done.stderr
    assert "accelerate launch --multi_gpu --num_processes=4" in done.stdout
    assert "global batch 8 per optimizer step" in done.stdout
    assert "--dry-run" not in done.stdout.split("torchrun", 1)[1]


def test_launch_commands_for_one_and_several_nodes():
    from hafs.training import distributed
    from hafs.training.loader import load_config
    from hafs.training.plan import resolve

    plan = resolve(load_config(REPO / "config" / "training.toml"), "demo", check_hardware=False)
    plan.hardware.num_gpus, plan.hardware.num_nodes = 4, 2
    cmd = distributed.relaunch_command(plan, ["scripts/train.py", "demo", "--set", "lr=1"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nnodes=2" in cmd and "--nproc_per_node=4" in cmd and cmd[-4:] == ["scripts/train.py", "demo",
                                                                               "--set", "lr=1"]
    # the `hafs` console script is re-run as a module
    assert distributed.script_args(["/venv/bin/hafs", "train", "demo"]) == ["-m", "hafs.training.distributed",
                                                                           "train", "demo"]
    assert not distributed.needs_launch(plan, {"WORLD_SIZE": "8"}) and distributed.needs_launch(plan, {})


def test_every_worker_names_rank_0s_checkpoint_when_the_loss_diverges(tmp_path, tiny_model):
    """Other ranks learn rank 0's run folder: their own clock's guess lacks its -2 suffix (or is a second off)."""
    import datetime as dt

    config = make_config(tmp_path, tiny_model, accumulation=1, steps="max_steps = 8")
    now = dt.datetime.now()
    for second in range(600):  # every name of the next minutes is taken: rank 0 gets a "-2" folder
        (tmp_path / "checkpoints" / f"{PRESET}-{(now + dt.timedelta(seconds=second)):%Y%m%d-%H%M%S}").mkdir(
            parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HAFS_TEST_SLOW_STEP_MS"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), PRESET, "--config", str(config),
                           "--no-eval", "--set", "hardware.num_gpus=2", "--set", "learning_rate=1e30"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO, check=False)
    text = done.stdout + done.stderr
    assert done.returncode != 0 and ("became nan" in text or "became inf" in text), text[-3000:]
    (run_dir,) = (tmp_path / "checkpoints").glob(f"{PRESET}-*-2")
    (last,) = run_dir.glob("checkpoint-*")
    assert text.count(f"last good checkpoint: {last};") == 2, text[-3000:]  # rank 0's and rank 1's message
    assert "no checkpoint was saved" not in text, text[-3000:]


def test_single_process_context_is_a_no_op():
    from hafs.training.distributed import env_context

    ctx = env_context({})
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    assert ctx.all_reduce_sum([3, 2.5]) == [3, 2.5] and ctx.any(False) is False
    ctx2 = env_context({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ctx2.rank, ctx2.local_rank, ctx2.world_size, ctx2.is_main) == (3, 1, 4, False)


def test_a_worker_leaves_at_once_with_its_status_flushed_output_and_atexit_handlers_run():
    from hafs.training.distributed import exit_if_worker

    assert exit_if_worker(3) == 3  # not under torchrun: an ordinary return
    code = ("import atexit, sys; from hafs.training.distributed import exit_if_worker; print('saved', end='');"
            "atexit.register(lambda: print(' closed', end='')); "
            "sys.stderr.write('note'); exit_if_worker(7); print('not reached')")
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert (done.returncode, done.stdout, done.stderr) == (7, "saved closed", "note")


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to list the workers")
def test_sigterm_to_the_launcher_stops_the_workers_with_a_checkpoint_and_no_orphans(tmp_path, tiny_model):
    """The launcher is what a user or scheduler signals: its workers must save, and nothing keeps running."""
    import signal
    import time

    config = make_config(tmp_path, tiny_model, accumulation=1, steps="max_steps = 200")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", HAFS_TEST_SLOW_STEP_MS="300")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    launcher = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), PRESET, "--config", str(config),
                                 "--no-eval", "--set", "hardware.num_gpus=2"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    deadline = time.time() + 240
    while not list((tmp_path / "checkpoints").glob("*/checkpoint-2/manifest.json")):
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[0][-3000:]
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    out = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 143, out[-3000:]
    assert out.count("Resume with:") == 1 and "no checkpoint saved" not in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert _processes_mentioning(str(config)) == []  # no worker or torchrun agent left training
    steps = [int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("*/checkpoint-*")]
    assert max(steps) > 2  # saved when stopped, after the step it was in
    models = tmp_path / "models"
    assert not models.exists() or not any(models.iterdir())
