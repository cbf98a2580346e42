"""Resuming a run: find the checkpoint `--resume` means, refuse a changed config, restore it exactly.

`find_resume` picks and checks a checkpoint (see checkpoint.py for what one holds); `restore` puts
weights, optimizer, scheduler, scaler and every RNG back and returns the TrainState, whose
(epoch, micro_batch) tells the engine where in the epoch's fixed order to continue.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import (
    MANIFEST,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    newest_checkpoint,
    rescue_root,
    run_folders,
    set_rng_state,
    verify,
)
from .errors import Problem, ResumeError
from .keypaths import dotted
from .outputs import new_run_dir, run_id, safe_component

# A run folder's name after its preset (outputs.new_run_dir): start time, and -2, -3... when two runs of the
# preset started in the same second.
_RUN_TIME = r"-(\d{8})-(\d{6})(?:-(\d+))?$"

# Settings that decide what a saved state means: resuming with another value is refused (the
# weights would not fit, or the data order / positions would be another run's).
RESUME_KEYS = (
    "expert.base_model", "expert.prompt_template", "dataset_dir", "dataset.train_split",
    "dataset.quality_threshold", "dataset.domains", "dataset.long_samples",
    "lora.r", "lora.lora_alpha", "lora.target_modules", "lora.lora_dropout", "lora.bias",
    "sequence_length", "batch_size", "gradient_accumulation", "packing", "seed",
    "hardware.num_gpus", "hardware.num_nodes",
)
# Settings a user may change on resume (e.g. bf16 after an fp16 overflow, a longer run): they take
# effect from the resumed step on (`restore` re-applies the optimizer's), and are recorded in metadata.json.
NOTED_KEYS = ("preset", "learning_rate", "num_epochs", "max_steps", "lr_scheduler", "warmup_steps",
              "warmup_ratio", "weight_decay", "max_grad_norm", "precision", "gradient_checkpointing")


@dataclass
class ResumePoint:
    """A verified checkpoint to continue from, and what it was made with."""

    path: Path
    """The checkpoint folder."""
    run_dir: Path
    """Where the resumed run writes: the checkpoint's run folder, or a new one when going back to an older step."""
    step: int
    """Optimizer steps done when it was saved."""
    state: dict
    """TrainState.to_dict() as saved."""
    saved_plan: dict
    """The plan it was made with (TrainingConfig.to_dict())."""
    dataset_fingerprint: str = ""
    """sha256 of the train split it was made with ('' when unknown)."""
    elapsed: float = 0.0
    """Training seconds already spent (added to the resumed run's duration)."""
    differences: list[str] = field(default_factory=list)
    """Every setting that differs from the checkpoint's, as 'key: saved → now'."""
    forced: list[str] = field(default_factory=list)
    """Those of `differences` that are refused unless --force, which overrode them."""
    evaluation_before: dict | None = None
    """The run's evaluation before training (evaluate_model's result); None when it made none, or its
    checkpoint comes from a hafs that did not save it."""

    def to_metadata(self) -> dict:
        """The `resume` entry of metadata.json."""
        return {"from_checkpoint": str(self.path), "from_step": self.step, "forced": bool(self.forced),
                "differences": list(self.differences), "forced_differences": list(self.forced)}


def find_resume(plan, spec: str, *, force: bool = False, log=print,
                dataset_fingerprint: str = "", claim: bool = True) -> ResumePoint | None:
    """The checkpoint `--resume spec` means, checked against `plan`.

    spec "auto": the newest verified checkpoint of the newest run of the same preset under
    `[output] checkpoints_dir`; when there is none, or that run already saved its model (it is
    finished, not interrupted), a notice and None: the run starts fresh, so scripts may always pass
    `--resume auto`. Any other spec is a checkpoint or run folder; a missing or broken one raises
    ResumeError. A checkpoint made with other settings (RESUME_KEYS, the train split's hash) raises
    ResumeError listing them, unless `force`; other changed settings (NOTED_KEYS) are noted.
    With `max_steps` set, a checkpoint at or past it is refused here (see `check_total_steps`).
    A run that continues in a new folder (from a finished run, or an older step) has it created here
    (outputs.new_run_dir), unless not `claim` (workers other than rank 0, which write no checkpoints).
    """
    if spec == "auto":
        path = _auto_checkpoint(plan, log)
        if path is None:
            log(f"No checkpoint of preset '{plan.preset}' under {plan.output.checkpoints_dir}: "
                "starting from scratch.")
            return None
        if isinstance(path, _Finished):
            log(f"The newest run of preset '{plan.preset}' ({path.run_dir}) already finished: its model is "
                f"{path.model}. Nothing to resume: starting a new run from scratch (to train that run further, "
                f"raise num_epochs or max_steps and pass --resume {path.run_dir}).")
            return None
    else:
        path = _explicit_checkpoint(Path(spec).expanduser(), log)
    point = load_point(path)
    # The run's rescued namesake counts too: continuing in one folder behind the other's newer steps would
    # let `auto` later pick those abandoned steps over this run's.
    newest = newest_checkpoint(dict.fromkeys([point.run_dir, *run_folders(plan.output.checkpoints_dir,
                                                                          point.run_dir.name)]), log=lambda m: None)
    behind = checkpoint_step(path) is None or (newest is not None and checkpoint_step(newest) > checkpoint_step(path))
    model = finished_runs(plan.output.models_dir).get(point.run_dir.name)
    refused, noted = compare(point, plan, dataset_fingerprint)
    if refused and not force:
        raise ResumeError([Problem(d.split(": ", 1)[1], key=d.split(": ", 1)[0]) for d in refused] + [
            Problem("these settings differ from the ones the checkpoint was made with",
                    hint="resume with the original settings, start a new run without --resume, "
                         "or add --force to resume anyway (the run will differ from an uninterrupted one)")],
            title=f"Cannot resume from {path}: the configuration changed:")
    if plan.max_steps:  # the total is known before the model loads: fail before loading it
        check_total_steps(point, plan.max_steps, plan)
    # A new run folder is created only once the checkpoint is accepted: a refusal leaves no empty one.
    if model is not None or behind:
        point.run_dir = new_run_dir(plan) if claim else Path(plan.output.checkpoints_dir) / run_id(plan)
    if model is not None:
        # Continuing a finished run is a new run: its own folder, so `auto` can later find it unfinished.
        log(f"note: {path.parent.name} already finished (model {model}); the resumed run writes to "
            f"{point.run_dir} and saves a new model")
    elif behind:
        # Going back to an older step: continue in a new run folder so the later checkpoints survive.
        log(f"note: {path.name} is not the newest checkpoint of {path.parent.name}"
            + (f" ({newest} is)" if newest is not None else "") + f"; the resumed run writes to {point.run_dir}")
    if refused:
        log("warning: resuming despite changed settings (--force): " + "; ".join(refused))
    if noted:
        log("note: resuming with changed settings (they apply from the resumed step on): " + "; ".join(noted))
    point.differences, point.forced = refused + noted, refused
    return point


def check_total_steps(point: ResumePoint, total_steps: int, plan) -> None:
    """Refuse a checkpoint that the run as now configured would not train from.

    A checkpoint past `total_steps`, or at it when the total changed, holds more training than the
    run asks for: resuming would save it under settings it was not trained with. One exactly at an
    unchanged total was saved after training ended (interrupted during the final evaluation or save):
    resuming it only evaluates and saves the model.
    """
    saved_total = point.state.get("total_steps")
    if point.step < total_steps or (point.step == total_steps and saved_total == total_steps):
        return
    name = "max_steps" if plan.max_steps else "num_epochs"
    now = f"max_steps = {plan.max_steps}" if plan.max_steps else f"num_epochs = {plan.num_epochs:g}"
    keypath = ["hyperparameters", getattr(plan, "hyperparameters_name", "") or "default", name]
    file, line = plan.config_file(), plan.line_of(keypath)
    raise ResumeError([Problem(
        f"the checkpoint was saved after {point.step} optimizer steps, but this run ({now}) takes "
        f"{total_steps} in all" + (f" (the checkpoint's run took {saved_total})" if saved_total else ""),
        key=dotted(keypath), file=file, line=line,
        hint=f"resume with {name} giving more than {point.step} steps (--set {name}=...), or start a new run "
             "without --resume")],
        title=f"Cannot resume from {point.path}: it is at or past the end of this run:")


@dataclass
class _Finished:
    """The newest run of a preset saved its model: `auto` has nothing to continue."""

    run_dir: Path
    model: str


def _auto_checkpoint(plan, log) -> Path | _Finished | None:
    root = Path(plan.output.checkpoints_dir)
    # A run that could not write under checkpoints_dir saved its checkpoints beside it (recipe.run's
    # save): a run's checkpoints are those of both namesakes together.
    rescued = rescue_root(root)
    pattern = re.compile(re.escape(safe_component(plan.preset)) + _RUN_TIME)
    names = sorted({p.name for d in (root, rescued) if d.is_dir() for p in d.iterdir()
                    if p.is_dir() and pattern.match(p.name)}, key=_run_sort_key, reverse=True)
    finished = finished_runs(plan.output.models_dir) if names else {}
    for name in names:
        folders = run_folders(root, name)
        model = finished.get(name)
        if model is not None:
            # An older unfinished run was abandoned before this one finished: continuing it now
            # would surprise more than starting afresh.
            return _Finished(next((f for f in folders if f.is_dir()), folders[0]), model)
        path = newest_checkpoint(folders, log=lambda m: log(f"warning: {m}"))
        if path is not None and saved_preset(path) == plan.preset:
            return path
    return None


def finished_runs(models_dir) -> dict[str, str]:
    """{run folder name: model folder} of the runs that saved a model in `models_dir`.

    A run is finished exactly when its model is: metadata.json, which names the run folder, is the
    last file written before the model folder is renamed into place. Staging and broken folders
    (no readable metadata.json) do not count, so their runs stay resumable.
    """
    out: dict[str, str] = {}
    try:
        models = [p for p in Path(models_dir).iterdir() if not p.name.startswith(".") and p.is_dir()]
    except OSError:
        return out
    for model in models:
        try:
            meta = json.loads((model / "metadata.json").read_text())
        except (OSError, ValueError):
            continue
        run = meta.get("run_dir") if isinstance(meta, dict) else None
        if isinstance(run, str) and run:
            out.setdefault(Path(run).name, str(model))
    return out


def _run_sort_key(name: str) -> tuple:
    m = re.search(_RUN_TIME, name)
    return (m.group(1), m.group(2), int(m.group(3) or 1)) if m else ("", "", 0)


def saved_preset(path: Path) -> str | None:
    """The preset a checkpoint folder was made with; None when its config.json is unreadable."""
    try:
        return json.loads((path / "config.json").read_text()).get("preset")
    except (OSError, ValueError, AttributeError):
        return None


def _explicit_checkpoint(path: Path, log) -> Path:
    if not path.exists():
        raise ResumeError([Problem("no such checkpoint or run folder", file=str(path),
                                   hint="use --resume auto, or a checkpoint-<step> folder under [output] "
                                        "checkpoints_dir")])
    if (path / MANIFEST).exists() or checkpoint_step(path) is not None:
        problem = verify(path)
        if problem:
            older = [p for p in list_checkpoints(path.parent) if p != path and not verify(p)]
            hint = f"the previous complete one is {older[0]}" if older else "use --resume auto"
            raise ResumeError([Problem(f"checkpoint is not usable: {problem}", file=str(path), hint=hint)])
        return path
    found = latest_checkpoint(path, log=lambda m: log(f"warning: {m}"))
    if found is None:
        raise ResumeError([Problem("no complete checkpoint in this folder", file=str(path),
                                   hint="start without --resume, or name another run folder")])
    return found


def load_point(path: Path) -> ResumePoint:
    """ResumePoint of a verified checkpoint folder."""
    path = Path(path)
    try:
        record = json.loads((path / "state.json").read_text())
        saved_plan = json.loads((path / "config.json").read_text())
        step = int(record["step"])
        state = dict(record["train_state"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResumeError([Problem(f"checkpoint state is unreadable: {exc}", file=str(path))]) from None
    before = record.get("evaluation_before")
    return ResumePoint(path=path, run_dir=path.parent, step=step, state=state, saved_plan=saved_plan,
                       dataset_fingerprint=record.get("dataset_fingerprint") or "",
                       elapsed=float(record.get("elapsed_seconds") or 0.0),
                       evaluation_before=before if isinstance(before, dict) else None)


def compare(point: ResumePoint, plan, dataset_fingerprint: str = "") -> tuple[list[str], list[str]]:
    """(refused, noted) differences between the checkpoint's plan and `plan`, as 'key: saved → now'."""
    now = plan.to_dict()
    saved = _upgraded(point.saved_plan, now)
    refused = [_diff(k, _get(saved, k), _get(now, k)) for k in RESUME_KEYS if _differs(_get(saved, k), _get(now, k))]
    if point.dataset_fingerprint and dataset_fingerprint and point.dataset_fingerprint != dataset_fingerprint:
        refused.append(_diff("train split sha256", point.dataset_fingerprint[:12], dataset_fingerprint[:12]))
    noted = [_diff(k, _get(saved, k), _get(now, k)) for k in NOTED_KEYS if _differs(_get(saved, k), _get(now, k))]
    return refused, noted


def _upgraded(saved: dict, now: dict) -> dict:
    """The checkpoint's plan with values older hafs versions saved in another form, spelled as `now` spells them.

    A relative `expert.base_model` ('./models/base') is made absolute by plan.resolve_base_model_path since
    hafs took it from the config file's folder; before, it was left relative and loaded from the working
    directory, which the checkpoint does not record. Either reading that names the plan's folder is the same
    model: comparing the raw strings would refuse every such checkpoint as "configuration changed".
    """
    from .plan import resolve_base_model_path

    value, current = _get(saved, "expert.base_model"), _get(now, "expert.base_model")
    if not isinstance(value, str) or not isinstance(current, str) or value == current or Path(value).is_absolute():
        return saved
    config = saved.get("config_path") or ""
    bases = [Path(config).parent] if config and not config.startswith("<") else []
    if any(resolve_base_model_path(value, base) == current for base in [*bases, Path.cwd()]):
        return {**saved, "expert": {**saved["expert"], "base_model": current}}
    return saved


_MISSING = object()


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _differs(a, b) -> bool:
    if a is _MISSING or b is _MISSING:
        return False  # a key this hafs version did not save: nothing to compare
    if isinstance(a, list) and isinstance(b, list):
        return sorted(map(str, a)) != sorted(map(str, b))
    return a != b


def _diff(key: str, a, b) -> str:
    def show(v):
        text = json.dumps(v, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    return f"{key}: {show(a)} → {show(b)}"


def restore(point: ResumePoint, *, model, optimizer, scheduler, scaler=None, state_cls=None):
    """Load weights, optimizer, scheduler, scaler and RNG from `point`; returns its TrainState.

    Call after the model, optimizer and scheduler are built (building them consumes randomness)
    and right before training: the generators are restored last. The checkpoint supplies the
    optimizer's moments and the schedule's position; the hyperparameters (learning rate, weight
    decay, schedule shape) stay those the optimizer and scheduler were built with from the plan.
    """
    import torch
    from safetensors.torch import load_file

    problem = verify(point.path)
    if problem:
        raise ResumeError([Problem(f"checkpoint is not usable: {problem}", file=str(point.path))])
    saved = load_file(str(point.path / "adapter.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ResumeError([Problem(
            f"the checkpoint's weights do not fit this model ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, e.g. {(missing or unexpected)[0]})", file=str(point.path),
            hint="resume with the LoRA settings the checkpoint was made with")])
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != saved[name].shape:
                raise ResumeError([Problem(f"{name} has shape {tuple(saved[name].shape)} in the checkpoint, "
                                           f"{tuple(p.shape)} in this model", file=str(point.path))])
            p.copy_(saved[name])

    def load(name):
        try:
            return torch.load(point.path / name, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - unpickling refused or broken: a bad checkpoint
            raise ResumeError([Problem(f"cannot load {name}: {exc}", file=str(point.path))]) from None

    # load_state_dict would bring back the saved learning rate and weight decay too, silently
    # ignoring a changed one that the plan (and metadata.json) then claims was used.
    planned = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    planned_base = list(getattr(scheduler, "base_lrs", []) or [])
    optimizer.load_state_dict(load("optimizer.pt"))
    if scheduler is not None and (point.path / "scheduler.pt").exists():
        scheduler.load_state_dict(load("scheduler.pt"))
    _apply_planned_hyperparameters(optimizer, scheduler, planned, planned_base)
    if scaler is not None and (point.path / "scaler.pt").exists():
        scaler.load_state_dict(load("scaler.pt"))
    set_rng_state(load("rng.pt"))
    if state_cls is None:
        from .engine import TrainState as state_cls
    return state_cls.from_dict(point.state)


def _apply_planned_hyperparameters(optimizer, scheduler, planned: list[dict], planned_base: list) -> None:
    """Put the plan's hyperparameters back after loading a checkpoint's optimizer and scheduler state.

    The learning rate becomes the plan's schedule at the restored step: for an unchanged plan that is
    the very value the checkpoint held (same expression), so an exact resume stays exact.
    """
    if len(planned) != len(optimizer.param_groups):
        return  # another grouping: restore() has already refused other trainable weights
    for group, fresh in zip(optimizer.param_groups, planned):
        for key, value in fresh.items():
            if key != "lr":
                group[key] = value
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if scheduler is None or not planned_base:
        for group, fresh in zip(optimizer.param_groups, planned):
            group["lr"] = fresh["lr"]
        return
    scheduler.base_lrs = list(planned_base)
    if lambdas is not None and len(lambdas) == len(planned_base):
        lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(lambdas, planned_base)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)

