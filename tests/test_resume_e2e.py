"""Real kills of `python scripts/train.py`: SIGKILL then `--resume auto`, SIGTERM, kill during the final save.

Each test trains a tiny local Qwen2 (fp32, LoRA dropout > 0) on the shipped demo dataset and compares
the final adapter with an uninterrupted run's (max abs diff <= 1e-6, same losses). The recipe honours
HAFS_TEST_SLOW_STEP_MS (a sleep per optimizer step) so a kill lands mid-run on any machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
PRESET, MAX_STEPS, SAVE_STEPS = "kill-test", 12, 2
TIMEOUT = 300


def recipe_ready() -> bool:
    return importlib.util.find_spec("hafs.training.recipe") is not None


pytestmark = [pytest.mark.skipif(not recipe_ready(), reason="hafs.training.recipe not written yet"),
              pytest.mark.slow]

HYPERPARAMETERS = """
{length}
learning_rate = 1e-3
warmup_steps = 2
lr_scheduler = "cosine"
logging_steps = 1
save_steps = {save_steps}
save_total_limit = 2
seed = 5
"""


def make_run(root: Path, model: Path, max_steps: int = MAX_STEPS, num_epochs: float | None = None) -> Path:
    """A folder with its own training.toml (LoRA dropout > 0); returns the config path.

    With `num_epochs` the run's length is set by epochs instead of max_steps."""
    length = f"num_epochs = {num_epochs}" if num_epochs is not None else f"max_steps = {max_steps}"
    return tiny_config(root, model, preset=PRESET, lora_dropout=0.2, gradient_accumulation=2,
                       hyperparameters=HYPERPARAMETERS.format(length=length, save_steps=SAVE_STEPS),
                       hyperparameters_name="kill")


def command(config: Path, *extra: str, evaluate: bool = False) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "train.py"), PRESET, "--config", str(config),
            *([] if evaluate else ["--no-eval"]), *extra]


def env(slow_ms: int = 0) -> dict:
    out = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    out.pop("HAFS_TEST_SLOW_STEP_MS", None)
    if slow_ms:
        out["HAFS_TEST_SLOW_STEP_MS"] = str(slow_ms)
    return out


def run(config: Path, *extra: str, evaluate: bool = False) -> subprocess.CompletedProcess:
    done = subprocess.run(command(config, *extra, evaluate=evaluate), capture_output=True, text=True,
                          timeout=TIMEOUT, env=env(), cwd=REPO)
    assert done.returncode == 0, f"train.py failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def start(config: Path, slow_ms: int = 400, evaluate: bool = False) -> subprocess.Popen:
    return subprocess.Popen(command(config, evaluate=evaluate), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env(slow_ms), cwd=REPO)


def wait_for(proc: subprocess.Popen, found, what: str, timeout: float = TIMEOUT):
    """Poll until found() returns something truthy; fail if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = found()
        if value:
            return value
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"train.py exited ({proc.returncode}) before {what}; does the recipe honour "
                        f"HAFS_TEST_SLOW_STEP_MS?\n{out[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def killed_after_checkpoint_2(config: Path, root: Path) -> None:
    """Start a run of `config` and SIGKILL it once checkpoint-2 is complete under `root`."""
    proc = start(config, slow_ms=300)
    wait_for(proc, complete_checkpoint(root, 2), "checkpoint-2")
    proc.kill()
    proc.wait(timeout=30)


def complete_checkpoint(root: Path, min_step: int):
    def found():
        from hafs.training.checkpoint import checkpoint_step

        for path in (root / "checkpoints").glob("*/checkpoint-*"):
            if (path / "manifest.json").is_file() and checkpoint_step(path) >= min_step:
                return path
        return None
    return found


def model_dirs(root: Path) -> list[Path]:
    """Model folders that look like results (not hidden staging folders)."""
    models = root / "models"
    return sorted(p for p in models.iterdir() if not p.name.startswith(".")) if models.is_dir() else []


def final_model(root: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    dirs = model_dirs(root)
    assert len(dirs) == 1, dirs
    meta = json.loads((dirs[0] / "metadata.json").read_text())
    return load_file(str(dirs[0] / "adapter_model.safetensors")), meta


def resumed_from(meta: dict) -> str | None:
    """The checkpoint a model was resumed from, as metadata.json records it."""
    if isinstance(meta.get("resume"), dict):
        return meta["resume"].get("from_checkpoint")
    return meta.get("training", {}).get("resumed_from")


def assert_same_result(root: Path, reference: tuple[dict, dict]) -> dict:
    weights, meta = final_model(root)
    ref_weights, ref_meta = reference
    assert weights.keys() == ref_weights.keys()
    diff = max(float((weights[k] - ref_weights[k]).abs().max()) for k in weights)
    assert diff <= 1e-6, f"resumed adapter differs from the uninterrupted one by {diff}"
    assert meta["training"]["final_loss"] == ref_meta["training"]["final_loss"]
    assert meta["training"]["optimizer_steps"] == ref_meta["training"]["optimizer_steps"] == MAX_STEPS
    if "losses" in meta:
        assert meta["losses"]["train"] == ref_meta["losses"]["train"]
    return meta


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """An uninterrupted run: the result every interrupted one must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    run(make_run(root, tiny_model))
    weights, meta = final_model(root)
    assert resumed_from(meta) is None
    return weights, meta


def test_sigkill_mid_run_then_resume_auto_ends_identical(tmp_path, tiny_model, reference):
    config = make_run(tmp_path, tiny_model)
    proc = start(config)
    wait_for(proc, complete_checkpoint(tmp_path, 4), "checkpoint-4")
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert model_dirs(tmp_path) == []  # nothing that looks like a finished model
    from hafs.training.checkpoint import latest_checkpoint

    last = latest_checkpoint(next((tmp_path / "checkpoints").iterdir()))
    assert last is not None

    out = run(config, "--resume", "auto")
    meta = assert_same_result(tmp_path, reference)
    assert resumed_from(meta) and Path(resumed_from(meta)).name == last.name
    assert "Resumed from" in out.stdout + out.stderr


def test_sigterm_saves_a_checkpoint_prints_how_to_resume_and_exits_143(tmp_path, tiny_model, reference):
    config = make_run(tmp_path, tiny_model)
    proc = start(config)
    wait_for(proc, complete_checkpoint(tmp_path, 2), "checkpoint-2")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "--resume auto" in out and "Interrupted at step" in out
    step = int(out.split("Interrupted at step ")[1].split()[0].rstrip(".("))
    assert 2 <= step < MAX_STEPS
    from hafs.training.checkpoint import verify

    saved = list((tmp_path / "checkpoints").glob(f"*/checkpoint-{step}"))
    assert len(saved) == 1 and verify(saved[0]) == ""
    assert model_dirs(tmp_path) == []

    run(config, "--resume", "auto")
    assert Path(resumed_from(assert_same_result(tmp_path, reference))).name == f"checkpoint-{step}"


def test_sigkill_during_the_final_save_leaves_no_model_and_resume_recovers(tmp_path, tiny_model, reference):
    config = make_run(tmp_path, tiny_model)
    proc = subprocess.Popen(command(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(),
                            cwd=REPO)
    models = tmp_path / "models"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        if models.is_dir() and any(p.name.startswith(".staging-") for p in models.iterdir()):
            proc.kill()
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    if proc.returncode == 0:
        pytest.skip("the final save finished before the poll saw its staging folder")
    assert model_dirs(tmp_path) == []
    run(config, "--resume", "auto")
    assert_same_result(tmp_path, reference)


def test_a_diverging_run_stops_with_a_clear_message_and_writes_no_model(tmp_path, tiny_model):
    config = make_run(tmp_path, tiny_model)
    done = subprocess.run(command(config, "--set", "learning_rate=1e30"), capture_output=True, text=True,
                          timeout=TIMEOUT, env=env(), cwd=REPO)
    text = done.stdout + done.stderr
    assert done.returncode == 3, text[-3000:]
    assert "became nan" in text or "became inf" in text
    assert "learning rate" in text and model_dirs(tmp_path) == []
    (last,) = tmp_path.glob("checkpoints/*/checkpoint-2")  # saved before it diverged at step 3: named, once
    assert text.count(f"last good checkpoint: {last};") == 1, text[-3000:]


def test_resume_with_a_changed_lora_shape_is_refused(tmp_path, tiny_model):
    config = make_run(tmp_path, tiny_model, max_steps=4)
    killed_after_checkpoint_2(config, tmp_path)
    done = subprocess.run(command(config, "--resume", "auto", "--set", "lora.r=8"), capture_output=True,
                          text=True, timeout=TIMEOUT, env=env(), cwd=REPO)
    assert done.returncode == 2 and "lora.r: 4 → 8" in done.stderr and "--force" in done.stderr
    done = subprocess.run(command(config, "--resume", "auto", "--set", "max_steps=2"), capture_output=True,
                          text=True, timeout=TIMEOUT, env=env(), cwd=REPO)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "past the end of this run" in done.stderr and "saved after 2 optimizer steps" in done.stderr
    assert "max_steps" in done.stderr and "Resumed from" not in done.stdout and model_dirs(tmp_path) == []


def test_resume_auto_after_a_finished_run_starts_a_new_run_instead(tmp_path, tiny_model):
    config = make_run(tmp_path, tiny_model, max_steps=4)
    run(config)
    (first,) = model_dirs(tmp_path)

    out = run(config, "--resume", "auto")
    text = out.stdout + out.stderr
    assert "Resumed from" not in text and "already finished" in text and str(first) in text
    second = [p for p in model_dirs(tmp_path) if p != first]
    assert len(second) == 1
    meta = json.loads((second[0] / "metadata.json").read_text())
    assert resumed_from(meta) is None and meta["training"]["optimizer_steps"] == 4


def test_ctrl_c_during_the_final_evaluation_saves_the_last_step_and_resume_finishes(tmp_path, tiny_model,
                                                                                     reference):
    config = make_run(tmp_path, tiny_model)
    # With evaluation on, the model folder is staged for the whole final evaluation: a wide window.
    proc = subprocess.Popen(command(config, evaluate=True), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(), cwd=REPO)
    models = tmp_path / "models"
    wait_for(proc, lambda: models.is_dir() and any(p.name.startswith(".staging-") for p in models.iterdir()),
             "the staged model folder")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the final save finished before the signal arrived")
    assert proc.returncode == 130, out[-3000:]
    assert f"Interrupted at step {MAX_STEPS}" in out and "--resume auto" in out, out[-3000:]
    from hafs.training.checkpoint import verify

    saved = list((tmp_path / "checkpoints").glob(f"*/checkpoint-{MAX_STEPS}"))
    assert len(saved) == 1 and verify(saved[0]) == ""
    assert list(models.iterdir()) == []  # no model, no staging folder left behind

    out = run(config, "--resume", "auto")
    meta = assert_same_result(tmp_path, reference)
    assert Path(resumed_from(meta)).name == f"checkpoint-{MAX_STEPS}"
    assert f"Resumed from {saved[0]} at step {MAX_STEPS}" in out.stdout + out.stderr


def test_a_resumed_run_reports_the_evaluation_its_first_part_made_before_training(tmp_path, tiny_model):
    config = make_run(tmp_path, tiny_model)
    proc = start(config, evaluate=True)
    wait_for(proc, complete_checkpoint(tmp_path, 2), "checkpoint-2")
    proc.send_signal(signal.SIGTERM)
    first, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, first[-3000:]
    printed = [line for line in first.splitlines() if line.startswith("eval before:")]
    assert len(printed) == 1, first[-3000:]
    step = int(first.split("Interrupted at step ")[1].split()[0])
    (saved,) = (tmp_path / "checkpoints").glob(f"*/checkpoint-{step}")
    stored = json.loads((saved / "state.json").read_text())["evaluation_before"]  # read before rotation drops it

    out = run(config, "--resume", "auto", evaluate=True)
    # Evaluated again after resuming, "before" would describe half-trained weights.
    assert "eval before:" not in out.stdout + out.stderr
    (model,) = model_dirs(tmp_path)
    results = json.loads((model / "eval" / "results.json").read_text())
    from hafs.training.evaluate import describe

    assert results["before"] == stored and describe(results["before"], "before") == printed[0]
    assert results["before"]["generations"] and results["after"]["generations"]
    assert results["comparison"]["val"]["loss_before"] == stored["val"]["loss"]
    meta = json.loads((model / "metadata.json").read_text())
    assert meta["evaluation"]["before"]["val"] == stored["val"]
    lines = [json.loads(line) for line in (model / "eval" / "generations.jsonl").read_text().splitlines()]
    assert [g["generated"] for g in lines if g["when"] == "before"] == [g["generated"] for g in stored["generations"]]


def test_a_file_in_place_of_the_checkpoints_folder_mid_run_loses_nothing(tmp_path, tiny_model, reference):
    config = make_run(tmp_path, tiny_model)
    proc = start(config)
    wait_for(proc, complete_checkpoint(tmp_path, 2), "checkpoint-2")
    checkpoints, rescued = tmp_path / "checkpoints", tmp_path / "checkpoints-rescued"
    proc.send_signal(signal.SIGSTOP)  # no save can recreate the folder between the move and the file
    try:
        os.rename(checkpoints, tmp_path / "moved-away")
        checkpoints.write_text("a file where the folder was\n")
    finally:
        proc.send_signal(signal.SIGCONT)
    wait_for(proc, lambda: list(rescued.glob("*/checkpoint-*/manifest.json")), "a rescued checkpoint")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "Traceback" not in out and f"{checkpoints} (a parent of" in out and "is a file, not a folder" in out
    (run_dir,) = rescued.iterdir()
    step = int(out.split("Interrupted at step ")[1].split()[0])
    from hafs.training.checkpoint import verify

    assert verify(run_dir / f"checkpoint-{step}") == ""
    # auto would not find it while the file is there (preflight refuses the folder): name it.
    assert f"--resume {run_dir}" in out.split("Interrupted at step")[1], out[-3000:]
    assert checkpoints.read_text() == "a file where the folder was\n" and model_dirs(tmp_path) == []

    checkpoints.unlink()  # what the warning advises
    run(config, "--resume", "auto")
    meta = assert_same_result(tmp_path, reference)
    assert Path(resumed_from(meta)) == run_dir / f"checkpoint-{step}"


def test_resume_with_num_epochs_ending_at_or_before_the_checkpoint_is_refused(tmp_path, tiny_model):
    config = make_run(tmp_path, tiny_model, num_epochs=1)
    killed_after_checkpoint_2(config, tmp_path)
    from hafs.training.checkpoint import checkpoint_step, latest_checkpoint, verify

    last = latest_checkpoint(next((tmp_path / "checkpoints").iterdir()))
    step = checkpoint_step(last)
    per_epoch = json.loads((last / "state.json").read_text())["train_state"]["total_steps"]  # of num_epochs = 1
    assert per_epoch > step + 1

    def resume_with(num_epochs: float) -> subprocess.CompletedProcess:
        return subprocess.run(command(config, "--resume", "auto", "--set", f"num_epochs={num_epochs}"),
                              capture_output=True, text=True, timeout=TIMEOUT, env=env(), cwd=REPO)

    # Ending exactly at the checkpoint counts as past it: it was trained on a schedule that went further.
    for steps in (step, step - 1):
        done = resume_with((steps - 0.5) / per_epoch)
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
        assert "past the end of this run" in done.stderr and f"saved after {step} optimizer steps" in done.stderr
        assert f"takes {steps} in all (the checkpoint's run took {per_epoch})" in done.stderr, done.stderr
        # The value came from --set, so the message blames the option, not the file's line.
        assert "  - --set num_epochs: " in done.stderr and f"{config}:" not in done.stderr
        assert "--set num_epochs=" in done.stderr and "Traceback" not in done.stderr
        assert "Resumed from" not in done.stdout and model_dirs(tmp_path) == [] and verify(last) == ""

    # One step past the checkpoint is a run to finish: the check does not refuse too much.
    done = resume_with((step + 0.5) / per_epoch)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"Resumed from {last} at step {step}" in done.stdout + done.stderr
    assert final_model(tmp_path)[1]["training"]["optimizer_steps"] == step + 1


def test_two_runs_started_in_the_same_second_keep_their_own_checkpoints(tmp_path, tiny_model, monkeypatch, capsys):
    """Same preset, same start second (a frozen clock), other learning rates: neither touches the other's run."""
    import datetime as dt
    from types import SimpleNamespace

    from hafs.training import cli, outputs

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 10, 0, 0)

    monkeypatch.setattr(outputs, "dt", SimpleNamespace(datetime=Frozen))
    config = make_run(tmp_path, tiny_model, max_steps=4)
    for lr in ("0.001", "0.002"):
        assert cli.train_script_main([PRESET, "--config", str(config), "--no-eval", f"--set=learning_rate={lr}"]) == 0
    checkpoints = tmp_path / "checkpoints"
    first, second = checkpoints / f"{PRESET}-20260101-100000", checkpoints / f"{PRESET}-20260101-100000-2"
    assert sorted(checkpoints.iterdir()) == [first, second]
    for run_dir, lr in ((first, 1e-3), (second, 2e-3)):
        saved = sorted(run_dir.glob("checkpoint-*"))
        assert [p.name for p in saved] == ["checkpoint-2"]  # (the last step is saved as the model)
        assert {json.loads((p / "config.json").read_text())["learning_rate"] for p in saved} == {lr}
    recorded = {json.loads((m / "metadata.json").read_text())["run_dir"]
                for m in model_dirs(tmp_path)}
    assert recorded == {str(first), str(second)}

    # A run that writes no checkpoint leaves no empty run folder behind (nor does one that fails).
    capsys.readouterr()
    assert cli.train_script_main([PRESET, "--config", str(config), "--no-eval", "--set", "save_steps=0"]) == 0
    assert cli.train_script_main([PRESET, "--config", str(config), "--no-eval", "--set", "save_steps=0",
                                  "--set", "learning_rate=1e30"]) == 3  # diverges at step 3
    assert sorted(checkpoints.iterdir()) == [first, second]
