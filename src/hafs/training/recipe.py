"""One training run, top to bottom: check → data → model → train → save → evaluate.

Like torchtune's recipes, this file reads as a straight line; each step is a call into the module
that owns it. Everything that can fail because of the user's input or machine fails in step 1,
before a model is downloaded or loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import HardwareError, TrainingError
from .plan import TrainingConfig


@dataclass
class RunOptions:
    """How to run a plan (not what to train: that is the plan)."""

    resume: str | None = None
    """'auto', a checkpoint path, or None for a fresh run."""
    force: bool = False
    """Run despite a memory estimate over the limit or a changed config on resume."""
    evaluate: bool = True
    """Evaluate on val/test before and after training."""
    register: bool | None = None
    """Update the user's model registry (None: when [output] registry is set)."""
    verbose: bool = False
    """More output."""


def run(plan: TrainingConfig, opts: RunOptions, log=print) -> Path:
    from . import checkpoint, data, engine, faults, hardware, memory, model_loading, outputs

    # 1. Fail fast: machine, data and memory are checked before any model is loaded.
    caps = hardware.detect()
    pre = hardware.preflight(plan, caps)
    for note in pre.notes:
        log(f"note: {note}")
    if pre.problems:
        raise HardwareError(pre.problems, title=f"Preset '{plan.preset}' cannot run on this machine:")
    settings = engine.run_settings(plan, caps)
    raw = {split: data.read_split(plan, split) for split in ("train", "val", "test")}
    for split, r in raw.items():
        log(r.stats.summary() if r is not None else f"{split}: no {split} split; skipped")
    estimate = memory.check_plan(plan, settings, force=opts.force, log=log)

    # 2. Where this run lives: a fresh run directory, or the one we resume.
    point = checkpoint.find_resume(plan, opts.resume, force=opts.force, log=log,
                                   dataset_fingerprint=raw["train"].stats.sha256) if opts.resume else None
    run_dir = point.run_dir if point else Path(plan.output.checkpoints_dir) / outputs.run_id(plan)

    # 3. Model, tokenizer, adapter and tokenized data.
    model, tokenizer = model_loading.load_model_and_tokenizer(plan, settings.device, settings.precision)
    prepared = data.prepare_from_raw(raw, plan, tokenizer, log=log)
    model = model_loading.apply_lora(model, plan, settings)
    batches = engine.BatchSource(prepared.train, plan, tokenizer, settings)
    total_steps = plan.total_steps(batches.micro_batches_per_epoch())
    engine.print_plan(plan, settings, prepared, total_steps, estimate, log=log)

    # 4. Optimiser, schedule, state (restored when resuming).
    optimizer = engine.build_optimizer(model, plan)
    scheduler = engine.build_scheduler(optimizer, plan, total_steps)
    state = engine.TrainState(total_steps=total_steps)
    if point:
        state = checkpoint.restore(point, model=model, optimizer=optimizer, scheduler=scheduler)
        log(f"Resumed from {point.path} at step {state.step}")

    # 5. Train, with checkpoints, trackers, evaluation and signal handling around the loop.
    evaluator = _evaluator(plan, prepared, tokenizer, settings, opts)
    before = evaluator.run(model, "before") if evaluator and state.step == 0 else None
    trackers = _trackers(plan, run_dir)
    with faults.SignalGuard() as guard:
        hooks = engine.Hooks(
            on_log=lambda st, m: trackers.log(st.step, m),
            on_save=lambda st: checkpoint.save_checkpoint(run_dir, model=model, optimizer=optimizer,
                                                          scheduler=scheduler, state=st, plan=plan,
                                                          dataset_fingerprint=raw["train"].stats.sha256),
            should_stop=guard.should_stop,
            on_eval=lambda st, m: trackers.log(st.step, m),
        )
        started = time.time()
        try:
            state = engine.train(model, optimizer, scheduler, batches, plan, state, hooks,
                                 eval_fn=evaluator.val_loss if evaluator else None, settings=settings)
        except BaseException as exc:
            trackers.close()
            raise faults.translate(exc, plan, state, run_dir, estimate) from None
        if guard.stopped:
            path = checkpoint.save_checkpoint(run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                              state=state, plan=plan,
                                              dataset_fingerprint=raw["train"].stats.sha256)
            trackers.close()
            raise faults.interrupted(plan, state, path, guard.signal)
        duration = time.time() - started + (point.elapsed if point else 0.0)

    # 6. Save: stage everything, write metadata.json last, rename into place (never overwrite).
    name = outputs.model_dir_name(plan)
    staged = outputs.staging_dir(Path(plan.output.models_dir), name)
    model_loading.save_adapter(model, tokenizer, staged)
    after = evaluator.run(model, "after") if evaluator else None
    evaluation = evaluator.write(staged, before, after) if evaluator else None
    _plot(state, staged, log)
    meta = outputs.build_metadata(
        plan, num_samples=len(prepared.train), duration_seconds=duration,
        hardware_info=caps.summary(settings), extra={
            "training": {"tokens_trained": state.tokens, "optimizer_steps": state.step,
                         "final_loss": state.last_loss(), "precision": settings.precision,
                         "resumed_from": str(point.path) if point else None},
            "dataset_stats": {s: (r.stats.to_dict() if r else None) for s, r in raw.items()},
            "losses": {"train": state.loss_history, "eval": state.eval_history},
            "evaluation": evaluation, "memory_estimate_gb": estimate.total_gb if estimate else None,
            "versions": engine.library_versions(), "run_dir": str(run_dir),
        })
    outputs.atomic_write_json(staged / "metadata.json", meta)
    final = outputs.finalize_dir(staged, Path(plan.output.models_dir), name)
    trackers.summary(meta)
    trackers.close()

    # 7. Tell the user's registry, when asked.
    if opts.register or (opts.register is None and plan.output.registry):
        from .user_registry import register_trained_model

        register_trained_model(plan, final, meta, log=log)
    return final


def _evaluator(plan, prepared, tokenizer, settings, opts):
    if not opts.evaluate:
        return None
    from .evaluate import Evaluator

    return Evaluator(plan, prepared, tokenizer, settings)


def _trackers(plan, run_dir):
    from .trackers import open_trackers

    return open_trackers(plan.report_to, run_name=run_dir.name, log_dir=Path(plan.output.logs_dir) / run_dir.name,
                         config=plan.to_dict())


def _plot(state, staged, log) -> None:
    from .plots import plot_losses

    plot_losses(state.loss_history, state.eval_history, staged / "loss_curve.png", log=log)
