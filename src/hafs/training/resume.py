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

from .checkpoint import MANIFEST, checkpoint_step, latest_checkpoint, list_checkpoints, set_rng_state, verify
from .errors import Problem, ResumeError
from .outputs import run_id, safe_component

_RUN_TIME = r"-\d{8}-\d{6}(?:-\d+)?$"

# Settings that decide what a saved state means: resuming with another value is refused (the
# weights would not fit, or the data order / positions would be another run's).
RESUME_KEYS = (
    "expert.base_model", "expert.prompt_template", "dataset_dir", "dataset.train_split",
    "dataset.quality_threshold", "dataset.domains", "dataset.long_samples",
    "lora.r", "lora.lora_alpha", "lora.target_modules", "lora.lora_dropout", "lora.bias",
    "sequence_length", "batch_size", "gradient_accumulation", "packing", "seed",
    "hardware.num_gpus", "hardware.num_nodes",
)
# Settings a user may change on resume (e.g. bf16 after an fp16 overflow, a longer run); noted.
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
    """Refused differences that --force overrode, as 'key: saved → now'."""

    def to_metadata(self) -> dict:
        """The `resume` entry of metadata.json."""
        return {"from_checkpoint": str(self.path), "from_step": self.step, "forced": bool(self.differences),
                "differences": list(self.differences)}


def find_resume(plan, spec: str, *, force: bool = False, log=print,
                dataset_fingerprint: str = "") -> ResumePoint | None:
    """The checkpoint `--resume spec` means, checked against `plan`.

    spec "auto": the newest verified checkpoint of the newest run of the same preset under
    `[output] checkpoints_dir`; when there is none, a notice and None (the run starts fresh, so
    scripts may always pass `--resume auto`). Any other spec is a checkpoint or run folder; a
    missing or broken one raises ResumeError. A checkpoint made with other settings (RESUME_KEYS,
    the train split's hash) raises ResumeError listing them, unless `force`.
    """
    if spec == "auto":
        path = _auto_checkpoint(plan, log)
        if path is None:
            log(f"No checkpoint of preset '{plan.preset}' under {plan.output.checkpoints_dir}: "
                "starting from scratch.")
            return None
    else:
        path = _explicit_checkpoint(Path(spec).expanduser(), log)
    point = load_point(path)
    newest = latest_checkpoint(point.run_dir, log=lambda m: None)
    if newest != path:
        # Going back to an older step: continue in a new run folder so the later checkpoints survive.
        point.run_dir = Path(plan.output.checkpoints_dir) / run_id(plan)
        log(f"note: {path.name} is not the newest checkpoint of {path.parent.name}; "
            f"the resumed run writes to {point.run_dir}")
    refused, noted = compare(point, plan, dataset_fingerprint)
    if refused and not force:
        raise ResumeError([Problem(d.split(": ", 1)[1], key=d.split(": ", 1)[0]) for d in refused] + [
            Problem("these settings differ from the ones the checkpoint was made with",
                    hint="resume with the original settings, start a new run without --resume, "
                         "or add --force to resume anyway (the run will differ from an uninterrupted one)")],
            title=f"Cannot resume from {path}: the configuration changed:")
    if refused:
        log("warning: resuming despite changed settings (--force): " + "; ".join(refused))
    if noted:
        log("note: resuming with changed settings: " + "; ".join(noted))
    point.differences = refused
    return point


def _auto_checkpoint(plan, log) -> Path | None:
    root = Path(plan.output.checkpoints_dir)
    if not root.is_dir():
        return None
    pattern = re.compile(re.escape(safe_component(plan.preset)) + _RUN_TIME)
    runs = sorted((p for p in root.iterdir() if p.is_dir() and pattern.match(p.name)),
                  key=lambda p: _run_sort_key(p.name), reverse=True)
    for run in runs:
        path = latest_checkpoint(run, log=lambda m: log(f"warning: {m}"))
        if path is not None and _saved_preset(path) == plan.preset:
            return path
    return None


def _run_sort_key(name: str) -> tuple:
    m = re.search(r"(\d{8})-(\d{6})(?:-(\d+))?$", name)
    return (m.group(1), m.group(2), int(m.group(3) or 1)) if m else ("", "", 0)


def _saved_preset(path: Path) -> str | None:
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
    return ResumePoint(path=path, run_dir=path.parent, step=step, state=state, saved_plan=saved_plan,
                       dataset_fingerprint=record.get("dataset_fingerprint") or "",
                       elapsed=float(record.get("elapsed_seconds") or 0.0))


def compare(point: ResumePoint, plan, dataset_fingerprint: str = "") -> tuple[list[str], list[str]]:
    """(refused, noted) differences between the checkpoint's plan and `plan`, as 'key: saved → now'."""
    saved, now = point.saved_plan, plan.to_dict()
    refused = [_diff(k, _get(saved, k), _get(now, k)) for k in RESUME_KEYS if _differs(_get(saved, k), _get(now, k))]
    if point.dataset_fingerprint and dataset_fingerprint and point.dataset_fingerprint != dataset_fingerprint:
        refused.append(_diff("train split sha256", point.dataset_fingerprint[:12], dataset_fingerprint[:12]))
    noted = [_diff(k, _get(saved, k), _get(now, k)) for k in NOTED_KEYS if _differs(_get(saved, k), _get(now, k))]
    return refused, noted


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
    and right before training: the generators are restored last.
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

    optimizer.load_state_dict(load("optimizer.pt"))
    if scheduler is not None and (point.path / "scheduler.pt").exists():
        scheduler.load_state_dict(load("scheduler.pt"))
    if scaler is not None and (point.path / "scaler.pt").exists():
        scaler.load_state_dict(load("scaler.pt"))
    set_rng_state(load("rng.pt"))
    if state_cls is None:
        from .engine import TrainState as state_cls
    return state_cls.from_dict(point.state)

