"""One training run, top to bottom: check → data → model → train → save → evaluate → register.

Like torchtune's recipes, this file reads as a straight line; each step is a call into the module
that owns it. Everything that can fail because of the user's input or machine fails in step 1,
before a model is downloaded or loaded.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TrainingError
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
    overrides: list[str] = field(default_factory=list)
    """The --set overrides, repeated in the printed resume command."""
    on_eval: Callable | None = None
    """Extra on_eval(state, metrics) after each evaluation during training (hafs tune reports to Optuna)."""


def run(plan: TrainingConfig, opts: RunOptions, log=print) -> Path:
    """Train `plan`; returns the saved model's folder."""
    created: list[Path] = []  # the run folder _run made, when it did
    try:
        return _run(plan, opts, log, created)
    finally:
        # A run that ended before its first checkpoint (or saves none) leaves no empty folder behind;
        # rmdir removes nothing else, and a folder someone else filled stays.
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError:
                pass


def _run(plan: TrainingConfig, opts: RunOptions, log, created: list[Path]) -> Path:
    from . import (
        checkpoint,
        data,
        distributed,
        engine,
        faults,
        hardware,
        memory_check,
        model_loading,
        outputs,
        preflight,
        progress,
        resume,
        tokenize,
    )

    # 1. Fail fast: machine, data and memory are checked before any model is loaded.
    caps = hardware.detect()
    pre = preflight.preflight(plan, caps, register=opts.register, hub=True)
    for note in pre.notes:
        log(f"note: {note}")
    pre.raise_for_problems(plan.preset)
    settings = engine.run_settings(plan, caps)
    engine.limit_primitive_cache(settings.onednn_cache_capacity)  # before the first matmul (packed_linear)
    # Under torchrun: join the workers; only rank 0 prints, writes and tracks (see distributed.py).
    ctx = distributed.init(settings.device, plan)
    settings.device = ctx.device
    if not ctx.is_main:
        log = _quiet
    train_raw = data.read_split(plan, "train")  # bad rows / missing files are reported here
    fingerprint = train_raw.stats.sha256
    estimate = memory_check.check_plan(plan, settings, force=opts.force, log=log, caps=caps)

    # 2. Where this run lives: a run folder of its own (created now, so no other run can take it), or
    #    the one we resume. Only rank 0 writes checkpoints, so only it creates one.
    point = resume.find_resume(plan, opts.resume, force=opts.force, log=log, dataset_fingerprint=fingerprint,
                               claim=ctx.is_main) if opts.resume else None
    if point is None:
        run_dir = outputs.new_run_dir(plan) if ctx.is_main else Path(plan.output.checkpoints_dir) / outputs.run_id(plan)
    else:
        run_dir = point.run_dir
    if ctx.is_main and (point is None or run_dir != point.path.parent):
        created.append(run_dir)
    # The other workers' guess has their own clock and lacks rank 0's -2 suffix: their error messages
    # (faults.translate names the last checkpoint) must look in the folder rank 0 writes.
    run_dir = Path(ctx.broadcast_object(str(run_dir)))
    first_run_dir = run_dir  # save() moves run_dir when it has to rescue a checkpoint

    # 3. Model, tokenizer, tokenized data, adapter (rank 0 first: it fills the model and token caches).
    with ctx.loading_turn():
        model, tokenizer = model_loading.load_model_and_tokenizer(plan, distributed.load_device(ctx),
                                                                 settings.precision, settings, log=log)
        prepared = tokenize.prepare_data(plan, tokenizer, log=log)
        # Checkpointing was decided for rows of sequence_length; this data's may all be shorter.
        estimate = memory_check.relax_for_data(plan, settings, prepared.train.stats.max, estimate, log=log, caps=caps)
        model = model_loading.apply_lora(model, plan, settings)
        model = distributed.shard_frozen_base(model, ctx)  # fsdp only: each worker keeps 1/world of the layers
    ctx.broadcast_params([p for p in model.parameters() if p.requires_grad])
    batches = engine.BatchSource(prepared.train, plan, tokenizer, settings)
    total_steps = plan.total_steps(-(-batches.micro_batches_per_epoch() // ctx.world_size))
    if point:
        resume.check_total_steps(point, total_steps, plan)
    progress.print_plan(plan, settings, prepared, total_steps, estimate, log=log, model=model)
    if ctx.enabled:
        log(f"Distributed: {ctx.world_size} workers ({ctx.backend}); global batch = {plan.batch_size} x "
            f"{plan.gradient_accumulation} x {ctx.world_size} = {plan.effective_batch(ctx.world_size)} per step")

    # 4. Optimiser, schedule, state (restored when resuming).
    optimizer = engine.build_optimizer(model, plan, settings)
    scheduler = engine.build_scheduler(optimizer, plan, total_steps)
    state = engine.TrainState(total_steps=total_steps)
    if point:
        state = resume.restore(point, model=model, optimizer=optimizer, scheduler=scheduler)
        state.total_steps = total_steps  # a resume may raise max_steps
        distributed.reseed_after_resume(ctx)
        log(f"Resumed from {point.path} at step {state.step}")

    # 5. Train, with checkpoints, trackers, evaluation and signal handling around the loop.
    from .evaluate import Evaluator

    evaluator = Evaluator(plan, prepared, tokenizer, settings, log=log)
    # Under fsdp every forward needs every worker, so all of them evaluate (rank 0 reports).
    evaluates = opts.evaluate and (ctx.is_main or ctx.fsdp)
    # A resumed run reports the evaluation its first part made (saved with each checkpoint); one
    # resumed from a checkpoint of an earlier hafs, which did not save it, reports none.
    before = point.evaluation_before if point else None
    if before is None and evaluates and state.step == 0:
        before = evaluator.run(model, "before")
    trackers = _trackers(plan, run_dir, log) if ctx.is_main else _null_trackers()

    def save(st, stopping: bool = False):
        """Checkpoint `st`; None when none could be written (a warning says why).

        A checkpoint that cannot be written where it belongs (a file put where the folder was, a full
        or read-only disk) is tried in its namesake (checkpoint.rescue_for), and training goes on either way:
        ending the run over a checkpoint would lose all of it, the model included.
        """
        nonlocal run_dir
        if not ctx.is_main:
            return None
        kw = dict(model=model, optimizer=optimizer, scheduler=scheduler, state=st, plan=plan,
                  dataset_fingerprint=fingerprint, evaluation_before=before)
        try:
            return checkpoint.save_checkpoint(run_dir, **kw)
        except TrainingError as exc:
            failed = "warning: " + exc.render().replace("\n", "\n  ")
        lost = f"checkpoint-{st.step} is not saved" + ("" if stopping else "; training goes on")
        rescue = checkpoint.rescue_for(plan.output.checkpoints_dir, first_run_dir)
        if rescue == run_dir:  # the rescue folder is what just failed
            log(f"{failed}\n  {lost}")
            return None
        try:
            path = checkpoint.save_checkpoint(rescue, **kw)
        except TrainingError as exc:
            log(f"{failed}\n  nor could it be saved to {rescue}: {exc.problems[0].message}\n  {lost}")
            return None
        log(f"{failed}\n  saved checkpoint-{st.step} to {path} instead; this run's next checkpoints go there too "
            f"(resume it with --resume {rescue})")
        run_dir = rescue
        return path

    slow = faults.slow_step_seconds()  # tests slow steps down to kill a run mid-way
    name = ""
    # Entered before the loop's guard, which hands signals back to it when the loop ends: from the
    # last step until the model is renamed into place, a first Ctrl-C / SIGTERM interrupts at once.
    with faults.StopOnSignal(log) as after_training:
        with faults.SignalGuard(log=log) as guard:
            hooks = engine.Hooks(on_step=(lambda st, m: time.sleep(slow)) if slow else None,
                                 on_log=lambda st, m: trackers.log(st.step, m),
                                 on_eval=lambda st, m: (trackers.log(st.step, m), opts.on_eval and opts.on_eval(st, m)),
                                 on_save=save if plan.save_steps else None,
                                 should_stop=lambda: ctx.any(guard.should_stop()))
            try:
                state = engine.train(model, optimizer, scheduler, batches, plan, state, hooks,
                                     eval_fn=evaluator.val_loss, settings=settings,
                                     progress=None if ctx.is_main else False, dist=ctx)
            except BaseException as exc:
                trackers.close(failed=True)
                raise faults.translate(exc, plan, state, run_dir, estimate) from None
            if guard.stopped:
                path = save(state, stopping=True)
                trackers.close(failed=True)
                raise faults.interrupted(plan, state, path, guard.signal, overrides=opts.overrides,
                                         resume=_resume_spec(run_dir, first_run_dir), flags=faults.run_flags(opts))
        after_training.arm()

        # 6. Save: stage everything, write metadata.json last, rename into place (never overwrite). The
        #    adapter is staged before the final evaluation, so a failing evaluation cannot lose it.
        try:
            if ctx.is_main:
                name = outputs.model_dir_name(plan)
                staged = outputs.staging_dir(Path(plan.output.models_dir), name)
                model_loading.save_adapter(model, tokenizer, staged)
            after = evaluator.run(model, "after") if evaluates else None
            if not ctx.is_main:  # rank 0 alone writes the model directory; the others learn its path
                final = Path(ctx.broadcast_object(None))
                distributed.cleanup(ctx)
                return final
            evaluation = evaluator.write(staged, before, after) if opts.evaluate else None
            _plot(state, staged, plan, log)
            samples, epochs = batches.trained(state)
            meta = outputs.build_metadata(
                plan, num_samples=samples, num_epochs=round(epochs, 4), duration_seconds=state.elapsed_seconds,
                hardware_info=caps.summary(settings), extra={
                    "training": {"dataset_samples": len(prepared.train),
                                 "tokens_trained": state.tokens, "optimizer_steps": state.step,
                                 "world_size": ctx.world_size, "final_loss": state.last_loss(),
                                 "best_eval_loss": state.best_eval(), "precision": settings.precision,
                                 "resumed_from": str(point.path) if point else None},
                    "resume": point.to_metadata() if point else None,
                    "run_settings": settings.to_dict(),
                    "dataset_stats": prepared.stats() if plan.output.metadata.include_dataset_stats else None,
                    "losses": {"train": state.loss_history, "eval": state.eval_history},
                    "evaluation": evaluation, "memory_estimate_gb": round(estimate.total_gb, 3) if estimate else None,
                    "versions": progress.library_versions(), "run_dir": str(run_dir),
                })
            outputs.atomic_write_json(staged / "metadata.json", meta)
            with after_training.deferred():  # a signal mid-rename takes effect once the model is in place
                final = outputs.finalize_dir(staged, Path(plan.output.models_dir), name)
        except faults.Stopped as stop:
            # Training is done but its model is not saved: keep the last step as a checkpoint instead.
            after_training.disarm()
            if name:  # staging_dir's folder, which the signal may have hit before it returned
                shutil.rmtree(outputs.staging_path(Path(plan.output.models_dir), name), ignore_errors=True)
            with faults.SignalGuard(log=log):  # a second signal aborts the save (which leaves no half folder)
                path = save(state, stopping=True)
            trackers.close(failed=True)
            raise faults.interrupted(plan, state, path, stop.signum, overrides=opts.overrides,
                                     flags=faults.run_flags(opts),
                                     resume=_resume_spec(run_dir, first_run_dir)) from None
        except BaseException:
            trackers.close(failed=True)  # the run shows as failed in W&B / MLflow, not as still running
            raise
    trackers.summary(meta)
    if opts.register is not False:  # --no-register (and hafs tune's throwaway trials): no registry at all
        evaluated = ((evaluation or {}).get("after") or {}).get("val") or {}
        trackers.model(final, plan.expert_name, {"preset": plan.preset, "base_model": plan.expert.base_model,
                                                 "model_dir": str(final), "eval_loss": evaluated.get("loss")})
    trackers.close()

    # 7. Tell the user's registry, when asked.
    if opts.register or (opts.register is None and plan.output.registry):
        from .user_registry import register_after_save

        register_after_save(plan, final, meta, log=log)  # the model is saved: a failure here only warns
    ctx.broadcast_object(str(final))
    distributed.cleanup(ctx)
    return final


def _resume_spec(run_dir: Path, first_run_dir: Path) -> str:
    """--resume for the message of an interrupted run: `auto`, unless its checkpoints were rescued elsewhere."""
    return "auto" if run_dir == first_run_dir else str(run_dir)


def _quiet(*args, **kwargs) -> None:
    """The log of workers other than rank 0."""


def _null_trackers():
    from .trackers import Tracker

    return Tracker([])


def _trackers(plan, run_dir: Path, log):
    from .trackers import open_trackers

    logs = Path(plan.output.logs_dir)
    return open_trackers(plan.report_to, run_name=run_dir.name, log_dir=logs / run_dir.name,
                         config=plan.to_dict(), mlflow_uri=f"sqlite:///{logs.resolve() / 'mlflow.db'}", log=log)


def _plot(state, staged: Path, plan, log) -> None:
    from .plots import plot_losses

    plot_losses(state.loss_history, state.eval_history, staged / "loss_curve.png",
                title=f"{plan.preset}: {plan.expert.display_name}", log=log)
