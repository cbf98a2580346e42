"""Checkpoints: atomic write, checksums, rotation, disk faults, exact resume, config-diff refusal.

A tiny Qwen2 + peft LoRA (dropout > 0, so the RNG matters) trained by a small loop of our own whose
micro-batch order is a pure function of (seed, epoch), like the engine's.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from hafs.training import checkpoint, resume  # noqa: E402
from hafs.training.errors import ResumeError, TrainingError  # noqa: E402
from hafs.training.loader import load_config  # noqa: E402
from hafs.training.outputs import run_id  # noqa: E402
from hafs.training.plan import resolve  # noqa: E402

SEED, SAMPLES, SEQ, BATCH, ACCUM, TOTAL_STEPS, VOCAB = 7, 10, 8, 2, 2, 7, 64  # 5 micro-batches = 3 steps per epoch


@dataclass
class TinyState:
    """Stand-in for engine.TrainState: the fields a resume needs."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    tokens: int = 0
    loss_history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "micro_batch": self.micro_batch, "tokens": self.tokens,
                "loss_history": list(self.loss_history)}

    @classmethod
    def from_dict(cls, d: dict) -> TinyState:
        return cls(**d)


@pytest.fixture(scope="module")
def shipped():
    return load_config("config/training.toml")


@pytest.fixture
def plan(shipped, tmp_path):
    return resolve(shipped, "demo", {"output.checkpoints_dir": str(tmp_path / "ckpt"),
                                     "output.models_dir": str(tmp_path / "models"), "save_total_limit": 3})


def build(init_seed: int = 0):
    """Base weights from a fixed seed (they are frozen, as when loaded from disk); LoRA init from init_seed."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.optimization import get_scheduler

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    base = Qwen2ForCausalLM(cfg)
    torch.manual_seed(init_seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                            target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.01)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=TOTAL_STEPS)
    return model, opt, sched


DATA = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(3))


def order(epoch: int) -> list[int]:
    return torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(SEED * 1000 + epoch)).tolist()


def train(model, opt, sched, state, until: int, on_save=None):
    """Our loop: optimizer steps at accumulation boundaries (and at the end of an epoch)."""
    per_epoch = SAMPLES // BATCH
    while state.step < until:
        perm = order(state.epoch)
        while state.micro_batch < per_epoch and state.step < until:
            ids = DATA[perm[state.micro_batch * BATCH:(state.micro_batch + 1) * BATCH]]
            loss = model(input_ids=ids, labels=ids).loss / ACCUM
            loss.backward()
            state.micro_batch += 1
            state.tokens += ids.numel()
            if state.micro_batch % ACCUM == 0 or state.micro_batch == per_epoch:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                state.step += 1
                state.loss_history.append(round(loss.item() * ACCUM, 8))
                if on_save:
                    on_save(state)
        if state.micro_batch >= per_epoch:
            state.epoch, state.micro_batch = state.epoch + 1, 0
    return state


def adapter(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def save(run_dir, model, opt, sched, state, plan, **kw):
    return checkpoint.save_checkpoint(run_dir, model=model, optimizer=opt, scheduler=sched, state=state,
                                      plan=plan, **kw)


def scramble_rng():
    random.seed(12345), np.random.seed(12345), torch.manual_seed(12345)


# --------------------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def uninterrupted():
    """Adapter and state of a run of TOTAL_STEPS without a stop."""
    model, opt, sched = build()
    state = train(model, opt, sched, TinyState(), TOTAL_STEPS)
    return state, adapter(model)


@pytest.mark.parametrize("k", [2, 4])  # 2: an epoch boundary is ahead; 4: mid-epoch (epoch 1, micro-batch 2)
def test_resume_in_a_fresh_model_ends_identical(tmp_path, plan, k, uninterrupted):
    full, expected = uninterrupted
    expected_loss = full.loss_history

    model, opt, sched = build()
    state = train(model, opt, sched, TinyState(), k)
    path = save(tmp_path / "run", model, opt, sched, state, plan)
    del model, opt, sched
    scramble_rng()  # a new process: every generator somewhere else

    model, opt, sched = build(init_seed=99)  # other LoRA init: restore must overwrite it
    point = resume.load_point(path)
    resumed = resume.restore(point, model=model, optimizer=opt, scheduler=sched, state_cls=TinyState)
    assert (resumed.step, resumed.epoch, resumed.micro_batch) == (state.step, state.epoch, state.micro_batch)
    resumed = train(model, opt, sched, resumed, TOTAL_STEPS)

    assert max_diff(adapter(model), expected) <= 1e-6
    assert resumed.loss_history == expected_loss
    assert resumed.tokens == full.tokens


def test_resume_without_rng_state_would_diverge(tmp_path, plan, monkeypatch, uninterrupted):
    """The exactness test above can fail: skip the RNG restore and dropout draws other masks."""
    expected = uninterrupted[1]
    model, opt, sched = build()
    path = save(tmp_path / "run", model, opt, sched, train(model, opt, sched, TinyState(), 4), plan)
    scramble_rng()
    monkeypatch.setattr(checkpoint, "set_rng_state", lambda saved: None)
    monkeypatch.setattr("hafs.training.resume.set_rng_state", lambda saved: None)
    model, opt, sched = build()
    state = resume.restore(resume.load_point(path), model=model, optimizer=opt, scheduler=sched,
                               state_cls=TinyState)
    train(model, opt, sched, state, TOTAL_STEPS)
    assert max_diff(adapter(model), expected) > 1e-4


def test_round_trip_restores_weights_optimizer_scheduler_and_every_rng(tmp_path, plan):
    model, opt, sched = build()
    state = train(model, opt, sched, TinyState(), 3)
    weights, opt_state, sched_state = adapter(model), copy.deepcopy(opt.state_dict()), sched.state_dict()
    path = save(tmp_path / "run", model, opt, sched, state, plan)
    draws = (random.random(), float(np.random.rand()), torch.rand(3).tolist())

    train(model, opt, sched, state, 5)  # move everything on
    scramble_rng()
    resume.restore(resume.load_point(path), model=model, optimizer=opt, scheduler=sched,
                       state_cls=TinyState)
    assert max_diff(adapter(model), weights) == 0
    assert (random.random(), float(np.random.rand()), torch.rand(3).tolist()) == draws
    assert sched.state_dict()["last_epoch"] == sched_state["last_epoch"] == 3
    assert sched.get_last_lr() == sched_state["_last_lr"]
    restored = opt.state_dict()
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            assert torch.equal(restored["state"][idx][key], value), key


def test_checkpoint_layout_and_manifest(tmp_path, plan):
    model, opt, sched = build()
    state = train(model, opt, sched, TinyState(), 2)
    path = save(tmp_path / "run", model, opt, sched, state, plan, dataset_fingerprint="ab" * 32)
    assert path.name == "checkpoint-2"
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(["adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json",
                            "config.json", "manifest.json"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    record = json.loads((path / "state.json").read_text())
    assert record["data_position"] == {"epoch": 0, "micro_batch": 4} and record["dataset_fingerprint"] == "ab" * 32
    assert json.loads((path / "config.json").read_text())["preset"] == "demo"
    from safetensors.torch import load_file

    saved = load_file(str(path / "adapter.safetensors"))
    assert saved.keys() == adapter(model).keys() and all("lora_" in k for k in saved)  # only trainable params
    assert not list((tmp_path / "run").glob(".tmp-*"))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup",
                                  "cosine_with_restarts", "polynomial"])
def test_every_scheduler_and_the_scaler_load_with_weights_only(tmp_path, plan, kind):
    from transformers.optimization import get_scheduler

    model, opt, _ = build()
    sched = get_scheduler(kind, opt, num_warmup_steps=1, num_training_steps=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = train(model, opt, sched, TinyState(), 1)
    path = save(tmp_path / "run", model, opt, sched, state, plan, scaler=scaler)
    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng.pt"):
        torch.load(path / name, weights_only=True)
    assert torch.load(path / "scaler.pt", weights_only=True)["scale"] == 1024.0


def test_the_evaluation_before_training_is_kept_and_old_checkpoints_load_without_it(tmp_path, plan):
    model, opt, sched = build()
    state = train(model, opt, sched, TinyState(), 1)
    before = {"val": {"loss": 4.25, "perplexity": float("inf"), "tokens": 10, "examples": 2}, "test": None,
              "generations": [{"split": "val", "prompt": "LDA", "reference": "é", "generated": "", "rouge_l": 0.0}],
              "generation_scores": {"rouge_l": 0.0, "count": 1}, "skipped": {"test": "no test split"}}
    path = save(tmp_path / "run", model, opt, sched, state, plan, evaluation_before=before)
    assert resume.load_point(path).evaluation_before == before
    assert resume.load_point(save(tmp_path / "other", model, opt, sched, state, plan)).evaluation_before is None

    record = json.loads((path / "state.json").read_text())
    del record["evaluation_before"]  # as an earlier hafs wrote state.json
    (path / "state.json").write_text(json.dumps(record))
    _refresh_manifest(path)
    point = resume.load_point(path)
    assert point.evaluation_before is None and point.step == 1
    assert resume.restore(point, model=model, optimizer=opt, scheduler=sched, state_cls=TinyState).step == 1


def test_restore_returns_the_engines_train_state(tmp_path, plan):
    engine = pytest.importorskip("hafs.training.engine")
    model, opt, sched = build()
    state = engine.TrainState(step=3, total_steps=9, epoch=1, micro_batch=2, tokens=40, lr=1e-3,
                              loss_history=[[1, 2.5], [2, 2.25], [3, 2.0]], elapsed_seconds=12.5)
    point = resume.load_point(save(tmp_path / "run", model, opt, sched, state, plan))
    assert point.elapsed == 12.5 and point.step == 3
    restored = resume.restore(point, model=model, optimizer=opt, scheduler=sched)
    assert isinstance(restored, engine.TrainState) and restored == state


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, plan, monkeypatch):
    model, opt, sched = build()
    path = save(tmp_path / "run", model, opt, sched, train(model, opt, sched, TinyState(), 1), plan)
    torch.save({"state": {}, "param_groups": [], "x": _Evil()}, path / "optimizer.pt")
    _refresh_manifest(path)  # a crafted checkpoint: checksums match, contents hostile
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ResumeError, match="cannot load optimizer.pt"):
        resume.restore(resume.load_point(path), model=model, optimizer=opt, scheduler=sched,
                           state_cls=TinyState)
    assert not (tmp_path / "PWNED").exists()


def _refresh_manifest(path):
    import hashlib

    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_restore_into_another_lora_shape_is_a_resume_error(tmp_path, plan):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, opt, sched = build()
    path = save(tmp_path / "run", model, opt, sched, train(model, opt, sched, TinyState(), 1), plan)
    other = get_peft_model(Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=2, num_attention_heads=2,
                                                        num_key_value_heads=1)),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ResumeError, match="shape"):
        resume.restore(resume.load_point(path), model=other, optimizer=opt, scheduler=sched,
                           state_cls=TinyState)


# --------------------------------------------------------------------------- corruption, rotation, faults


@pytest.fixture
def three_checkpoints(tmp_path, plan):
    model, opt, sched = build()
    run = tmp_path / "run"
    train(model, opt, sched, TinyState(), 3, on_save=lambda st: save(run, model, opt, sched, st, plan))
    return run


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "bad-manifest", "missing-file"])
def test_a_broken_latest_checkpoint_falls_back_to_the_previous_with_a_warning(three_checkpoints, damage):
    newest = three_checkpoints / "checkpoint-3"
    target = newest / "optimizer.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "no-manifest":
        (newest / "manifest.json").unlink()
    elif damage == "bad-manifest":
        (newest / "manifest.json").write_text('{"format": 1, "files": ')
    else:
        (newest / "rng.pt").unlink()
    warnings = []
    assert checkpoint.latest_checkpoint(three_checkpoints, log=warnings.append) == three_checkpoints / "checkpoint-2"
    assert len(warnings) == 1 and "checkpoint-3" in warnings[0]
    assert checkpoint.verify(three_checkpoints / "checkpoint-2") == ""


def test_rotation_keeps_save_total_limit_and_cleans_stale_temp_dirs(tmp_path, plan):
    plan.save_total_limit = 2
    model, opt, sched = build()
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".tmp-checkpoint-9-999999999"  # left by a killed process (no such pid)
    stale.mkdir()
    train(model, opt, sched, TinyState(), 5, on_save=lambda st: save(run, model, opt, sched, st, plan))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4", "checkpoint-5"]


def test_saving_after_resuming_past_a_broken_later_checkpoint_replaces_it(three_checkpoints, plan):
    (three_checkpoints / "checkpoint-3" / "state.json").write_text("garbage")
    model, opt, sched = build()
    point = resume.load_point(checkpoint.latest_checkpoint(three_checkpoints, log=lambda m: None))
    state = resume.restore(point, model=model, optimizer=opt, scheduler=sched, state_cls=TinyState)
    train(model, opt, sched, state, 3, on_save=lambda st: save(three_checkpoints, model, opt, sched, st, plan))
    assert checkpoint.verify(three_checkpoints / "checkpoint-3") == ""
    assert checkpoint.latest_checkpoint(three_checkpoints) == three_checkpoints / "checkpoint-3"


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                        (errno.EACCES, "permission denied")])
def test_a_failed_write_leaves_previous_checkpoints_intact(three_checkpoints, plan, monkeypatch, code, words):
    before = {p.name: p.read_bytes() for p in (three_checkpoints / "checkpoint-3").iterdir()}
    real, calls = checkpoint._write_file, []

    def failing(path, data):
        calls.append(path.name)
        if len(calls) == 3:  # half-written third file, as when the disk fills mid-save
            path.write_bytes(data[: len(data) // 2])
            raise OSError(code, os.strerror(code), str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "_write_file", failing)
    model, opt, sched = build()
    with pytest.raises(TrainingError, match=words) as info:
        save(three_checkpoints, model, opt, sched, TinyState(step=4), plan)
    assert "left intact" in info.value.render()
    assert sorted(p.name for p in three_checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert {p.name: p.read_bytes() for p in (three_checkpoints / "checkpoint-3").iterdir()} == before
    assert checkpoint.latest_checkpoint(three_checkpoints) == three_checkpoints / "checkpoint-3"


@pytest.mark.parametrize("blocked", ["checkpoints_dir", "run folder"])
def test_a_file_in_place_of_a_checkpoint_folder_is_named_in_the_error_and_left_alone(plan, blocked):
    model, opt, sched = build()
    run = _run_with_checkpoint(plan, model, opt, sched, 1, when=1).parent
    victim = run.parent if blocked == "checkpoints_dir" else run
    shutil.rmtree(victim)  # as when the user moves the folder away mid-run and something writes a file there
    victim.write_text("not hafs's\n")
    with pytest.raises(TrainingError) as info:
        save(run, model, opt, sched, TinyState(step=2), plan)
    text = info.value.render()
    culprit = f"{victim} is a file" if victim == run else f"{victim} (a parent of {run}) is a file"
    assert culprit in text and "cannot save checkpoint-2" in text and "checkpoints_dir" in text, text
    assert victim.read_text() == "not hafs's\n"


def test_rescue_dir_is_beside_checkpoints_dir_and_auto_resumes_from_it(plan):
    model, opt, sched = build()
    first = _run_with_checkpoint(plan, model, opt, sched, 2, when=1)
    rescue = checkpoint.rescue_dir(first.parent)
    assert rescue == checkpoint.Path(plan.output.checkpoints_dir + "-rescued") / first.parent.name
    rescued = save(rescue, model, opt, sched, TinyState(step=4), plan, dataset_fingerprint="f" * 64)
    # The namesake under checkpoints_dir holds the older steps: the rescued folder is where the run went on.
    assert resume.find_resume(plan, "auto", log=lambda m: None).path == rescued
    shutil.rmtree(first.parent.parent)
    point = resume.find_resume(plan, "auto", log=lambda m: None)
    assert point.path == rescued and point.run_dir == rescue


def test_resuming_an_older_step_of_a_rescued_run_starts_a_new_folder_that_auto_then_prefers(plan):
    model, opt, sched = build()
    older = _run_with_checkpoint(plan, model, opt, sched, 2, when=1)
    rescue = checkpoint.rescue_dir(older.parent)
    newer = save(rescue, model, opt, sched, TinyState(step=4), plan, dataset_fingerprint="f" * 64)
    log = []
    point = resume.find_resume(plan, str(older), log=log.append, dataset_fingerprint="f" * 64)
    # Continuing in checkpoints/R would leave step 4 of its namesake ahead of this run's steps.
    assert point.path == older and point.run_dir not in (older.parent, rescue)
    assert point.run_dir.parent == older.parent.parent and f"({newer} is)" in log[0]
    went_on = save(point.run_dir, model, opt, sched, TinyState(step=3), plan, dataset_fingerprint="f" * 64)
    assert resume.find_resume(plan, "auto", log=lambda m: None).path == went_on
    # Its newest checkpoint is in the rescue folder: an explicit resume of it goes on there, in no new folder.
    assert resume.find_resume(plan, str(newer), log=lambda m: None).run_dir == rescue
    assert checkpoint.newest_checkpoint(checkpoint.run_folders(plan.output.checkpoints_dir, rescue.name)) == newer


def test_a_run_resumed_from_its_rescue_folder_is_rescued_back_into_its_own_not_a_second_hop(plan):
    model, opt, sched = build()
    root = checkpoint.Path(plan.output.checkpoints_dir)
    own = _run_with_checkpoint(plan, model, opt, sched, 2, when=1).parent
    rescued = checkpoint.rescue_for(root, own)
    assert rescued == checkpoint.rescue_dir(own) == root.with_name(root.name + "-rescued") / own.name
    save(rescued, model, opt, sched, TinyState(step=4), plan, dataset_fingerprint="f" * 64)
    point = resume.find_resume(plan, "auto", log=lambda m: None)
    assert point.run_dir == rescued  # it goes on there; when that folder fails too, recipe.run saves to:
    again = checkpoint.rescue_for(root, point.run_dir)
    assert again == own  # (rescue_dir(rescued) was checkpoints-rescued-rescued/, which auto never searched)
    latest = save(again, model, opt, sched, TinyState(step=6), plan, dataset_fingerprint="f" * 64)
    assert resume.find_resume(plan, "auto", log=lambda m: None).path == latest


def test_an_interrupt_during_save_leaves_no_partial_folder(tmp_path, plan, monkeypatch):
    def interrupt(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write_file", interrupt)
    model, opt, sched = build()
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "run", model, opt, sched, TinyState(step=1), plan)
    assert list((tmp_path / "run").iterdir()) == []


# --------------------------------------------------------------------------- find_resume


def _run_with_checkpoint(plan, model, opt, sched, step, when, fingerprint="f" * 64):
    import datetime as dt

    run = checkpoint.Path(plan.output.checkpoints_dir) / run_id(plan, dt.datetime(2026, 1, 1, 10, when))
    return save(run, model, opt, sched, TinyState(step=step), plan, dataset_fingerprint=fingerprint)


def test_auto_picks_the_newest_run_of_the_same_preset(plan, shipped):
    model, opt, sched = build()
    old = _run_with_checkpoint(plan, model, opt, sched, 5, when=1)
    new = _run_with_checkpoint(plan, model, opt, sched, 2, when=2)
    other = resolve(shipped, "oracle-rauru-mac", {"output.checkpoints_dir": plan.output.checkpoints_dir})
    _run_with_checkpoint(other, model, opt, sched, 9, when=3)
    log = []
    point = resume.find_resume(plan, "auto", force=False, log=log.append, dataset_fingerprint="f" * 64)
    assert point.path == new and point.run_dir == new.parent and point.step == 2
    shutil.rmtree(new.parent)  # newest run gone: the older one is next
    assert resume.find_resume(plan, "auto", log=log.append).path == old


def _frozen_clock(monkeypatch, minute: int, second: int = 0):
    """Every run_id of the test is this minute of 2026-01-01 10:00, as for runs started in the same second."""
    import datetime as dt
    from types import SimpleNamespace

    from hafs.training import outputs

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 10, minute, second)

    monkeypatch.setattr(outputs, "dt", SimpleNamespace(datetime=Frozen))


def test_runs_started_in_the_same_second_get_folders_of_their_own_that_auto_finds(plan, monkeypatch):
    from hafs.training.outputs import new_run_dir

    model, opt, sched = build()
    _frozen_clock(monkeypatch, 1)
    root = checkpoint.Path(plan.output.checkpoints_dir)
    (root / "demo-20260101-100100-3").parent.mkdir(parents=True)
    (root / "demo-20260101-100100-3").write_text("a file of the user's: never taken, never replaced\n")
    runs = [new_run_dir(plan) for _ in range(11)]
    names = [r.name for r in runs]
    assert names[:3] == ["demo-20260101-100100", "demo-20260101-100100-2", "demo-20260101-100100-4"]
    assert len(set(names)) == 11 and names[-1] == "demo-20260101-100100-12" and all(r.is_dir() for r in runs)
    assert (root / "demo-20260101-100100-3").read_text().startswith("a file of the user's")
    steps = {runs[0]: 5, runs[1]: 3, runs[8]: 1, runs[9]: 2}  # -11 and -10 are newer than -2 (not by text)
    saved = {run: save(run, model, opt, sched, TinyState(step=step), plan) for run, step in steps.items()}
    _run_with_checkpoint(plan, model, opt, sched, 9, when=0)  # an earlier second, without suffix
    assert resume.find_resume(plan, "auto", log=lambda m: None).path == saved[runs[9]]
    shutil.rmtree(runs[9])
    shutil.rmtree(runs[10])
    assert resume.find_resume(plan, "auto", log=lambda m: None).path == saved[runs[8]]
    for run in runs[2:9]:
        shutil.rmtree(run)
    assert resume.find_resume(plan, "auto", log=lambda m: None).path == saved[runs[1]]


def test_a_resume_into_a_new_folder_never_takes_a_run_folder_of_the_same_second(plan, shipped, monkeypatch):
    model, opt, sched = build()
    first = _run_with_checkpoint(plan, model, opt, sched, 2, when=1)
    save(first.parent, model, opt, sched, TinyState(step=4), plan)
    _frozen_clock(monkeypatch, 1)  # the resumed run starts in the second that named `first`
    point = resume.find_resume(plan, str(first), log=lambda m: None)  # an older step: a new run folder
    assert point.run_dir == first.parent.with_name(first.parent.name + "-2") and point.run_dir.is_dir()
    assert [p.name for p in checkpoint.list_checkpoints(first.parent)] == ["checkpoint-4", "checkpoint-2"]
    shorter = resolve(shipped, "demo", {
        "output.checkpoints_dir": plan.output.checkpoints_dir, "output.models_dir": plan.output.models_dir,
        "max_steps": 1})
    with pytest.raises(ResumeError):  # refused: no folder is made for it
        resume.find_resume(shorter, str(first), log=lambda m: None)
    assert sorted(p.name for p in first.parent.parent.iterdir()) == [first.parent.name, point.run_dir.name]


def test_auto_skips_a_run_whose_only_checkpoint_is_broken(plan):
    model, opt, sched = build()
    old = _run_with_checkpoint(plan, model, opt, sched, 5, when=1)
    new = _run_with_checkpoint(plan, model, opt, sched, 2, when=2)
    (new / "adapter.safetensors").write_bytes(b"x")
    log = []
    assert resume.find_resume(plan, "auto", log=log.append).path == old
    assert any("checkpoint-2" in m and "warning" in m for m in log)


def test_auto_with_nothing_to_resume_starts_fresh_with_a_notice(plan):
    log = []
    assert resume.find_resume(plan, "auto", log=log.append) is None
    assert "starting from scratch" in log[0] and "demo" in log[0]


def test_explicit_paths(plan, tmp_path):
    model, opt, sched = build()
    first = _run_with_checkpoint(plan, model, opt, sched, 2, when=1)
    second = save(first.parent, model, opt, sched, TinyState(step=4), plan)
    assert resume.find_resume(plan, str(first.parent), log=lambda m: None).path == second
    log = []
    point = resume.find_resume(plan, str(first), log=log.append)  # going back: a new run folder
    assert point.path == first and point.run_dir != first.parent and "not the newest" in log[0]
    (second / "rng.pt").write_bytes(b"")
    with pytest.raises(ResumeError, match="not usable") as info:
        resume.find_resume(plan, str(second), log=lambda m: None)
    assert "checkpoint-2" in info.value.render()
    with pytest.raises(ResumeError, match="no such checkpoint"):
        resume.find_resume(plan, str(tmp_path / "nope"))


def test_a_changed_config_is_refused_with_each_difference_unless_forced(plan, shipped):
    model, opt, sched = build()
    _run_with_checkpoint(plan, model, opt, sched, 2, when=1)
    changed = resolve(shipped, "demo", {"output.checkpoints_dir": plan.output.checkpoints_dir,
                                        "output.models_dir": plan.output.models_dir,
                                        "lora.r": 16, "sequence_length": 256, "learning_rate": 1e-4})
    with pytest.raises(ResumeError) as info:
        resume.find_resume(changed, "auto", force=False, log=lambda m: None, dataset_fingerprint="e" * 64)
    text = info.value.render()
    assert "lora.r: 8 → 16" in text and "sequence_length: 512 → 256" in text
    assert "train split sha256: \"ffffffffffff\" → \"eeeeeeeeeeee\"" in text and "--force" in text
    assert "learning_rate" not in text  # allowed to change: only noted
    log = []
    point = resume.find_resume(changed, "auto", force=True, log=log.append, dataset_fingerprint="e" * 64)
    assert len(point.forced) == 3 and point.to_metadata()["forced"] is True
    assert "learning_rate: 0.001 → 0.0001" in point.to_metadata()["differences"]
    assert any("learning_rate: 0.001 → 0.0001" in m for m in log)


def _saved_base_model(path, value):
    """Rewrite checkpoint `path`'s config.json with `value` as expert.base_model, as an older hafs saved it."""
    saved = json.loads((path / "config.json").read_text())
    saved["expert"]["base_model"] = value
    (path / "config.json").write_text(json.dumps(saved))
    _refresh_manifest(path)


def test_a_checkpoint_with_the_old_relative_base_model_resumes(plan, tmp_path, monkeypatch):
    # A relative base_model is now made absolute from the config file's folder; checkpoints saved before
    # hold it as typed, which the older hafs loaded from the working directory.
    config_dir = checkpoint.Path(plan.config_path).parent
    plan.expert.base_model = str(config_dir / "models" / "base")
    model, opt, sched = build()
    saved = _run_with_checkpoint(plan, model, opt, sched, 2, when=1)
    _saved_base_model(saved, "./models/base")
    log = []
    point = resume.find_resume(plan, "auto", log=log.append, dataset_fingerprint="f" * 64)
    assert point.path == saved and point.differences == [] and log == []
    monkeypatch.chdir(tmp_path)  # the working directory's reading of it counts too (config fixed to "../x")
    plan.expert.base_model = str(tmp_path / "models" / "base")
    assert resume.find_resume(plan, str(saved), log=log.append).differences == []
    _saved_base_model(saved, "./models/other")  # another model is still refused
    with pytest.raises(ResumeError) as info:
        resume.find_resume(plan, str(saved), log=log.append)
    assert 'expert.base_model: "./models/other" → ' in info.value.render()


def test_an_unchanged_config_resumes_without_notes(plan):
    model, opt, sched = build()
    _run_with_checkpoint(plan, model, opt, sched, 2, when=1)
    log = []
    point = resume.find_resume(plan, "auto", log=log.append, dataset_fingerprint="f" * 64)
    assert point.differences == [] and log == []
    assert point.to_metadata() == {"from_checkpoint": str(point.path), "from_step": 2, "forced": False,
                                   "differences": [], "forced_differences": []}


def test_changed_hyperparameters_are_recorded_not_only_printed(plan, shipped):
    model, opt, sched = build()
    _run_with_checkpoint(plan, model, opt, sched, 2, when=1)
    changed = resolve(shipped, "demo", {"output.checkpoints_dir": plan.output.checkpoints_dir,
                                        "output.models_dir": plan.output.models_dir,
                                        "learning_rate": 3e-4, "num_epochs": 5, "lr_scheduler": "linear"})
    log = []
    point = resume.find_resume(changed, "auto", log=log.append, dataset_fingerprint="f" * 64)
    recorded = point.to_metadata()
    assert recorded["forced"] is False and recorded["forced_differences"] == []
    assert {"learning_rate: 0.001 → 0.0003", "num_epochs: 3.0 → 5.0", 'lr_scheduler: "cosine" → "linear"'} <= set(
        recorded["differences"]), recorded["differences"]
    assert any("learning_rate: 0.001 → 0.0003" in m for m in log)


def test_restore_applies_the_plans_learning_rate_and_weight_decay_not_the_checkpoints(tmp_path, plan):
    from transformers.optimization import get_scheduler

    model, opt, sched = build()
    state = train(model, opt, sched, TinyState(), 3)
    saved_lr = opt.param_groups[0]["lr"]
    path = save(tmp_path / "run", model, opt, sched, state, plan)

    model, opt, sched = build()  # the same settings: the very learning rate comes back (exact resume)
    resume.restore(resume.load_point(path), model=model, optimizer=opt, scheduler=sched, state_cls=TinyState)
    assert opt.param_groups[0]["lr"] == saved_lr and sched.get_last_lr() == [saved_lr]

    model, _, _ = build()  # --set learning_rate=1e-4 --set weight_decay=0.5 and a longer schedule
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.5)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=20)
    expected = 1e-4 * sched.lr_lambdas[0](3)
    resume.restore(resume.load_point(path), model=model, optimizer=opt, scheduler=sched, state_cls=TinyState)
    group = opt.param_groups[0]
    assert sched.last_epoch == 3 and group["initial_lr"] == 1e-4 and group["weight_decay"] == 0.5
    assert group["lr"] == pytest.approx(expected) and sched.get_last_lr() == [group["lr"]]
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * sched.lr_lambdas[0](4))


# --------------------------------------------------------------------------- finished runs, total steps


def _saved_model(plan, run_dir, name="demo-model"):
    """A model folder as the recipe leaves it: metadata.json (written last) names the run folder."""
    model = checkpoint.Path(plan.output.models_dir) / name
    model.mkdir(parents=True)
    (model / "metadata.json").write_text(json.dumps({"run_dir": str(run_dir), "training": {}}))
    return model


def test_auto_does_not_resume_a_run_that_saved_its_model(plan):
    model, opt, sched = build()
    older = _run_with_checkpoint(plan, model, opt, sched, 3, when=1)  # interrupted, then superseded
    done = _run_with_checkpoint(plan, model, opt, sched, 2, when=2)
    saved = _saved_model(plan, done.parent)
    log = []
    assert resume.find_resume(plan, "auto", log=log.append, dataset_fingerprint="f" * 64) is None
    assert len(log) == 1 and "already finished" in log[0] and str(saved) in log[0]
    assert "starting a new run from scratch" in log[0] and f"--resume {done.parent}" in log[0]
    assert older.exists()  # kept for an explicit --resume


def test_a_staged_or_broken_model_does_not_finish_its_run(plan):
    model, opt, sched = build()
    done = _run_with_checkpoint(plan, model, opt, sched, 2, when=1)
    _saved_model(plan, done.parent, name=".staging-demo-model-123")  # killed before the rename
    (_saved_model(plan, done.parent, name="demo-broken") / "metadata.json").write_text("{trunc")
    assert resume.find_resume(plan, "auto", log=lambda m: None).path == done


def test_an_explicit_resume_of_a_finished_run_continues_in_a_new_run_folder(plan):
    model, opt, sched = build()
    done = _run_with_checkpoint(plan, model, opt, sched, 2, when=1)
    _saved_model(plan, done.parent)
    log = []
    point = resume.find_resume(plan, str(done.parent), log=log.append)
    assert point.path == done and point.run_dir != done.parent and "already finished" in log[0]


def _point_at(plan, step, total_steps):
    model, opt, sched = build()
    state = TinyState(step=step)
    record = dict(state.to_dict(), total_steps=total_steps)
    state.to_dict = lambda: record
    return resume.load_point(_run_with_checkpoint_state(plan, model, opt, sched, state))


def _run_with_checkpoint_state(plan, model, opt, sched, state):
    return save(checkpoint.Path(plan.output.checkpoints_dir) / "demo-20260101-100100", model, opt, sched, state,
                plan)


@pytest.mark.parametrize("step,saved_total,total,refused", [
    (60, 66, 44, True),   # fewer epochs than already trained
    (44, 66, 44, True),   # exactly at a lowered total: trained with another schedule
    (66, 66, 66, False),  # saved after the last step (interrupted while saving): only evaluate and save
    (60, 66, 88, False),  # a longer run
    (60, 66, 66, False),
])
def test_a_checkpoint_at_or_past_the_new_total_steps_is_refused(plan, step, saved_total, total, refused):
    point = _point_at(plan, step, saved_total)
    if not refused:
        resume.check_total_steps(point, total, plan)
        return
    with pytest.raises(ResumeError) as info:
        resume.check_total_steps(point, total, plan)
    text = info.value.render()
    assert f"saved after {step} optimizer steps" in text and f"takes {total} in all" in text
    assert "hyperparameters.demo.num_epochs" in text and "config/training.toml:" in text
    assert "--set num_epochs=" in text and "without --resume" in text


def test_a_max_steps_below_the_checkpoint_is_refused_before_the_model_loads(plan, shipped):
    _point_at(plan, 5, 7)
    shorter = resolve(shipped, "demo", {"output.checkpoints_dir": plan.output.checkpoints_dir,
                                        "output.models_dir": plan.output.models_dir, "max_steps": 4})
    with pytest.raises(ResumeError, match="past the end of this run") as info:
        resume.find_resume(shorter, "auto", log=lambda m: None)
    assert "max_steps = 4" in info.value.render() and "--set max_steps=" in info.value.render()
