"""Faults: signal guard, OOM / NaN / disk-full messages, and `translate` dispatch."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
from pathlib import Path

import pytest

from hafs.training import faults
from hafs.training.errors import TrainingError
from hafs.training.loader import load_config
from hafs.training.plan import resolve


@pytest.fixture(scope="module")
def shipped():
    return load_config("config/training.toml")


def make_plan(shipped, preset="demo", **overrides):
    return resolve(shipped, preset, overrides, check_hardware=False)


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_first_signal_sets_the_flag_and_handlers_are_restored(sig, code):
    before = signal.getsignal(sig)
    messages = []
    with faults.SignalGuard(log=messages.append) as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), sig)
        assert guard.should_stop() and guard.stopped and guard.signal == sig and guard.exit_code == code
    assert signal.getsignal(sig) is before
    assert "saving a checkpoint" in messages[0]


def test_second_sigterm_aborts_with_143_and_a_third_is_not_caught():
    with pytest.raises(SystemExit) as info:
        with faults.SignalGuard(log=lambda m: None) as guard:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("second SIGTERM did not abort")
    assert info.value.code == 143 and guard.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not guard._handle


def test_second_sigint_raises_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt):
        with faults.SignalGuard(log=lambda m: None):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


def test_guard_outside_the_main_thread_does_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        with faults.SignalGuard() as guard:
            seen.append((guard.should_stop(), signal.getsignal(signal.SIGTERM)))

    t = threading.Thread(target=body)
    t.start(), t.join()
    assert seen == [(False, before)]


def test_interrupted_message_and_exit_code(shipped, tmp_path):
    plan = make_plan(shipped)
    state = type("S", (), {"step": 17})()
    err = faults.interrupted(plan, state, tmp_path / "checkpoint-17", signal.SIGTERM, overrides=["seed=3"])
    text = err.render()
    assert err.exit_code == 143 and isinstance(err, TrainingError)
    assert "Interrupted at step 17" in text and str(tmp_path / "checkpoint-17") in text
    assert "Resume with: python scripts/train.py demo --set seed=3 --resume auto" in text
    other = make_plan(shipped)
    other.config_path = str(tmp_path / "my config.toml")
    assert f"--config '{tmp_path}/my config.toml'" in faults.resume_command(other)
    assert faults.interrupted(plan, state, None, signal.SIGINT).exit_code == 130


# --------------------------------------------------------------------------- out of memory


def _real_cpu_oom() -> BaseException:
    torch = pytest.importorskip("torch")
    try:
        torch.empty(1 << 60, dtype=torch.uint8)
    except BaseException as exc:  # noqa: BLE001
        return exc
    pytest.skip("the allocator accepted 1 EiB")


def oom_cases():
    torch = pytest.importorskip("torch")
    return [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.6 GiB total)"),
            RuntimeError("MPS backend out of memory (MPS allocated: 17.8 GB, other allocations: 1 GB)"),
            MemoryError(), _real_cpu_oom()]


def test_every_kind_of_oom_is_recognised_and_others_are_not(shipped):
    plan = make_plan(shipped)
    memories = ["CUDA GPU memory", "MPS unified memory", "CPU RAM", "CPU RAM"]
    for exc, memory in zip(oom_cases(), memories):
        assert faults.is_oom(exc), exc
        assert f"Training ran out of memory ({memory})" in faults.translate_oom(exc, plan).render()
    for exc in (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("out of range"),
                KeyError("memory")):
        assert not faults.is_oom(exc) and faults.translate_oom(exc, plan) is None


def test_oom_message_names_settings_and_concrete_smaller_ones(shipped):
    plan = make_plan(shipped, batch_size=4, gradient_accumulation=2, sequence_length=1024,
                     gradient_checkpointing=False, precision="fp32")
    err = faults.translate_oom(_real_cpu_oom(), plan, step=12)
    text = err.render()
    assert "Training ran out of memory (CPU RAM) at step 12" in text
    assert "batch_size=4, gradient_accumulation=2, sequence_length=1024" in text
    assert "--set batch_size=2 --set gradient_accumulation=4" in text
    assert "--set gradient_checkpointing=true" in text
    assert "--set sequence_length=512" in text
    assert "--set precision=bf16" in text
    assert "checkpoints are intact" in text


def test_oom_message_on_a_profile_without_checkpointing_and_at_batch_one(shipped):
    plan = make_plan(shipped, "oracle-rauru-mac", batch_size=1, sequence_length=256)
    text = faults.translate_oom(RuntimeError("MPS backend out of memory"), plan).render()
    assert "gradient_checkpointing=true" not in text  # mac-mps cannot use it with LoRA
    assert "batch_size=0" not in text and "--set sequence_length=128" in text


def test_oom_with_a_memory_estimate_suggests_settings_that_fit(shipped, tmp_path):
    memory = pytest.importorskip("hafs.training.memory")
    model_dir = tmp_path / "qwen"
    model_dir.mkdir()
    config = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
              "tie_word_embeddings": True}
    (model_dir / "config.json").write_text(json.dumps(config))
    plan = make_plan(shipped, "oracle-rauru-cloud", sequence_length=4096, batch_size=4,
                     gradient_checkpointing=True, precision="bf16")
    plan.expert.base_model = str(model_dir)
    estimate = memory.estimate_memory(config, sequence_length=4096, batch_size=4, lora_r=plan.lora.r,
                                      lora_targets=plan.lora.target_modules, precision="bf16",
                                      gradient_checkpointing=True, packing=True, device_kind="cuda")
    text = faults.translate_oom(RuntimeError("CUDA out of memory."), plan, estimate).render()
    assert f"estimated {estimate.total_gb:.1f} GiB of the profile's 24 GiB" in text and "try: " in text
    line = next(ln for ln in text.splitlines() if "fits the memory estimate with 30% headroom" in ln)
    budget = 0.7 * min(24, estimate.total_gb)
    if "batch_size=" in line:
        batch = int(line.split("batch_size=")[1].split()[0])
        assert batch < 4 and memory.estimate_memory(
            config, sequence_length=4096, batch_size=batch, lora_r=plan.lora.r, lora_targets=plan.lora.target_modules,
            precision="bf16", gradient_checkpointing=True, packing=True, device_kind="cuda").total_gb <= budget
    else:
        assert "sequence_length=" in line


# --------------------------------------------------------------------------- NaN, disk, dispatch


def test_nan_message_names_step_checkpoint_and_fp16_cause(shipped, tmp_path):
    plan = make_plan(shipped, "oracle-rauru-cloud", precision="fp16")
    text = faults.nan_error(42, float("nan"), plan, tmp_path / "checkpoint-40").render()
    assert "loss became nan at step 42" in text and "no model was written" in text
    assert isinstance(faults.nan_error(1, 1.0, plan, None), faults.NonFiniteLoss)
    assert f"continue from it with --resume {tmp_path / 'checkpoint-40'}" in text
    assert "fp16 overflow" in text and "--set precision=bf16" in text
    assert "learning_rate=6.7e-05" in text  # 2e-4 / 3
    text = faults.nan_error(3, float("inf"), make_plan(shipped, precision="fp32"), None).render()
    assert "fp16" not in text and "no checkpoint was saved" in text and "loss became inf at step 3" in text


def test_translate_dispatches_each_fault(shipped, tmp_path):
    plan = make_plan(shipped)
    state = type("S", (), {"step": 9})()
    run = tmp_path / "run"
    full = faults.translate(OSError(errno.ENOSPC, "No space left on device", str(run / "x")), plan, state, run)
    assert isinstance(full, TrainingError) and "the disk is full" in full.render()
    oom = faults.translate(MemoryError(), plan, state, run)
    assert isinstance(oom, TrainingError) and "at step 9" in oom.render()
    nan = FloatingPointError("loss is nan")
    nan.step, nan.loss = 9, float("nan")
    assert "at step 9" in faults.translate(nan, plan, state, run).render()
    bug = ZeroDivisionError("a bug")
    assert faults.translate(bug, plan, state, run) is bug
    stop = KeyboardInterrupt()
    assert faults.translate(stop, plan, state, run) is stop


def test_translate_nan_names_the_last_good_checkpoint(shipped, tmp_path, monkeypatch):
    from hafs.training import checkpoint

    plan = make_plan(shipped)
    run = tmp_path / "run"
    good = run / "checkpoint-4"
    good.mkdir(parents=True)
    monkeypatch.setattr(checkpoint, "latest_checkpoint", lambda d, log=None: good if d == run else None)
    text = faults.translate(FloatingPointError("nan"), plan, type("S", (), {"step": 6})(), run).render()
    assert "step 6" in text and f"last good checkpoint: {good}" in text
    # The engine's own error (raised before any checkpoint was known) gets the checkpoint added.
    raised = faults.nan_error(7, float("inf"), plan, None, what="gradient norm", precision="fp16",
                              where="epoch 0, micro-batch 12")
    assert "no checkpoint was saved" in raised.render()
    text = faults.translate(raised, plan, None, run).render()
    assert f"last good checkpoint: {good}" in text and "gradient norm became inf at step 7 (epoch 0, micro-batch 12)" \
        in text and "fp16 overflow" in text


def test_slow_step_env(monkeypatch):
    monkeypatch.setenv("HAFS_TEST_SLOW_STEP_MS", "250")
    assert faults.slow_step_seconds() == 0.25
    monkeypatch.setenv("HAFS_TEST_SLOW_STEP_MS", "fast")
    assert faults.slow_step_seconds() == 0.0


def test_the_resume_command_is_the_one_the_user_typed():
    assert faults._invocation("/venv/bin/hafs") == ["hafs", "train"]
    # torchrun re-runs the `hafs` console script as this module
    assert faults._invocation(str(Path(faults.__file__).with_name("distributed.py"))) == ["hafs", "train"]
    train = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    assert faults._invocation(str(train)) == ["python", str(train)]  # works from wherever it was typed
    assert faults._invocation("/usr/bin/pytest") == ["python", "scripts/train.py"]  # the Python API: the project's


def test_sigterm_outside_a_guard_unwinds_like_ctrl_c_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(faults.Terminated) as caught:
        with faults.terminate_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode
                threading.Event().wait(5)
            finally:
                cleaned.append(True)  # a `finally` runs, where Python's default would end the process
    assert caught.value.signum == signal.SIGTERM and isinstance(caught.value, KeyboardInterrupt)
    assert cleaned == [True] and signal.getsignal(signal.SIGTERM) == before


def test_a_sigterm_the_parent_ignores_stays_ignored():
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with faults.terminate_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_train_command_keeps_config_and_overrides_and_leaves_the_default_config_out():
    assert faults.train_command("t1", "my dir/t.toml", ["lr=1"]).endswith("t1 --config 'my dir/t.toml' --set lr=1")
    assert faults.train_command("demo", "config/training.toml").endswith(" demo")
    assert faults.train_command("demo", None, resume="auto").endswith(" demo --resume auto")
