"""`hafs tune PRESET --trials N`: Optuna search over a space declared in the TOML, minimising val loss.

A space is a `[tuning.NAME]` table whose keys are `--set` keys of the plan and whose values say how
to sample them:

    [tuning.demo]
    learning_rate = {type = "loguniform", low = 1e-4, high = 3e-3}
    "lora.r" = {type = "categorical", choices = [4, 8, 16]}
    warmup_steps = {type = "int", low = 0, high = 10}          # optional: step = 2
    weight_decay = {type = "uniform", low = 0.0, high = 0.1}

Each trial is an ordinary run of the recipe with those overrides. The objective is the validation
loss of the trial's last evaluation (the plan's eval_strategy, switched to "steps" when it is
"no"); every evaluation is reported to Optuna and the MedianPruner stops trials that are worse than
the median of earlier ones at the same step. The study lives in SQLite under `logs_dir/tuning/`, so
running the command again continues it: `--trials` is the total of finished (complete or pruned)
trials wanted. A Ctrl-C / SIGTERM ends the whole search (exit 130 / 143): the trial it stopped is
recorded as failed, which the sampler, the pruner and the best trial ignore and `--trials` does not
count, so running the same command again continues the search with a new trial in its place. A study is tied to the
settings the space leaves fixed (the resolved plan after `--set`): its name ends in a short hash of
them, so other `--set` values or an edited preset start a separate study instead of ranking trials
that trained differently against each other. The results are printed as a table and the best trial
is written as ready `[hyperparameters.*]`, `[lora.*]` and `[presets.PRESET-tuned]` tables
(`PRESET-SPACE-HASH.best.toml` beside the study) to paste into the config, from the overrides that
trial itself ran with.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import shutil
import signal
import tempfile
from dataclasses import fields
from pathlib import Path

from .errors import ConfigError, HafsError, Problem, TrainingError
from .tune_space import PRESET_FIELDS, Param, load_space, space_name


def study_path(plan, space: str) -> Path:
    """The SQLite file of the studies for (preset, space), one study per set of fixed settings."""
    from .outputs import safe_component

    return Path(plan.output.logs_dir) / "tuning" / f"{safe_component(plan.preset)}-{safe_component(space)}.db"


def best_path(plan, space: str, digest: str) -> Path:
    """The best-trial TOML of one study: per study, so another study's best never overwrites it."""
    db = study_path(plan, space)
    return db.with_name(f"{db.stem}-{digest}.best.toml")


NOT_FIXED = ("report_to", "save_steps", "save_total_limit")
"""Plan fields that do not change what a trial learns, so changing them keeps the study."""


def fixed_settings(plan, params: list[Param]) -> dict:
    """What every trial of the study trains with besides the sampled keys (JSON values)."""
    from .plan import HYPERPARAMETER_FIELDS

    tuned = {p.key for p in params}
    settings = {"expert": plan.expert_name, "base_model": plan.expert.base_model, "dataset": plan.dataset_name,
                "hardware": plan.hardware_name}
    for key in (*HYPERPARAMETER_FIELDS, *PRESET_FIELDS, "device"):
        if key not in NOT_FIXED and key not in tuned:
            settings[key] = getattr(plan, key)
    for f in fields(plan.lora):
        if f"lora.{f.name}" not in tuned:
            settings[f"lora.{f.name}"] = getattr(plan.lora, f.name)
    return json.loads(json.dumps(settings, default=str))


def settings_hash(settings: dict) -> str:
    """Short, stable id of fixed settings: the last part of the study name."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def check_evaluates(cfg, plan, params: list[Param], base: dict, space: str) -> None:
    """A ConfigError when a trial could end before its first evaluation and so have nothing to minimise.

    Checked on the worst corner of the space (fewest steps, widest eval interval), before trial 0, because
    otherwise the first trial trains to the end and only then finds out.
    """
    from .overrides import apply_overrides

    tuned = {p.key: p for p in params}
    corner = {}
    if "max_steps" in tuned:
        corner["max_steps"] = min(tuned["max_steps"].samples())
    for key in ("eval_steps", "logging_steps"):
        if key in tuned:
            corner[key] = max(tuned[key].samples())
    worst = copy.deepcopy(plan)
    apply_overrides(worst, corner)
    if worst.eval_strategy != "steps" or not worst.max_steps:
        return  # epoch-based lengths depend on the data: the trial itself reports a missing val loss
    what = "eval_steps" if worst.eval_steps else "logging_steps"
    every = worst.eval_steps or worst.logging_steps
    if every <= worst.max_steps:
        return

    def source(key: str) -> tuple[str, int | None]:
        if key in tuned:
            return f"tuning.{space}.{key}", cfg.line_of(["tuning", space, key])
        if key in base:
            return f"--set {key}", None
        path = ["hyperparameters", plan.hyperparameters_name, key]
        return ".".join(path), cfg.line_of(path)

    key, line = source(what)
    steps_from = source("max_steps")[0]
    smallest = " (the smallest of the search space)" if "max_steps" in tuned else ""
    default = " (eval_steps unset: it defaults to logging_steps)" if what == "logging_steps" else ""
    raise ConfigError([Problem(
        f"{what} {every}{default} is above max_steps {worst.max_steps}{smallest} from {steps_from}: a trial would "
        "end before its first evaluation, with no val loss to minimise", key=key, file=cfg.path if line else "",
        line=line, hint=f"use --set eval_steps={max(1, worst.max_steps // 2)} (any value <= {worst.max_steps}), "
                        "or a larger max_steps")], title="Cannot tune:")


def check_outputs(plan, keep_models: bool) -> None:
    """A ConfigError when a folder the search writes is unusable, before trial 0 (or the study) is made.

    The study always goes to logs_dir, which a training run's preflight checks only for trackers; the
    trials' models and checkpoints go to the configured folders only with --keep-models (else to scratch).
    """
    from .preflight import output_problems

    keys = ("logs_dir",) + (("models_dir", "checkpoints_dir") if keep_models else ())
    problems = output_problems(plan, keys)
    if problems:
        raise ConfigError(problems, title="Cannot tune:")


class _ReportedFailures(logging.Filter):
    """Drops Optuna's 'Trial N failed' warnings (with traceback) for trials that hafs reports itself."""

    def __init__(self):
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        match = re.match(r"Trial (\d+) failed", record.getMessage())
        return not (match and int(match.group(1)) in self.numbers)


def tune(cfg, preset: str, *, trials: int, space: str | None = None, keep_models: bool = False,
         overrides: list[str] | None = None, log=print, quiet_trials: bool = True):
    """Run trials until the study has `trials` finished ones; returns the optuna Study."""
    optuna = _optuna()
    from . import faults
    from .overrides import parse_override
    from .plan import resolve
    from .recipe import RunOptions, run

    user = dict(parse_override(o) for o in (overrides or []))
    base = dict(user)
    plan = resolve(cfg, preset, base)
    name = space_name(cfg, preset, space)
    if plan.eval_strategy == "no" and "eval_strategy" not in base:
        base["eval_strategy"] = "steps"  # the objective and the pruner need evaluations during training
        plan = resolve(cfg, preset, base)
    params = load_space(cfg, name, plan)
    check_evaluates(cfg, plan, params, base, name)
    check_outputs(plan, keep_models)
    fixed = fixed_settings(plan, params)
    digest = settings_hash(fixed)
    path = study_path(plan, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name, storage = f"{preset}:{name}:{digest}", f"sqlite:///{path}"
    others = [n for n in _study_names(storage)
              if n != study_name and (n == f"{preset}:{name}" or n.startswith(f"{preset}:{name}:"))]
    so_far = len(optuna.load_study(study_name=study_name, storage=storage).trials) \
        if _exists(storage, study_name) else 0
    study = optuna.create_study(
        study_name=study_name, storage=storage, direction="minimize", load_if_exists=True,
        # Seeded by the trials so far: a resumed search does not replay the first search's samples.
        sampler=optuna.samplers.TPESampler(seed=plan.seed + so_far),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    study.set_user_attr("fixed_settings", fixed)
    study.set_user_attr("overrides", user)
    done = finished(study)
    todo = max(0, trials - done)
    log(f"Study {study_name} in {path}: {done} finished trial(s), running {todo} more "
        f"({len(params)} parameter(s): {', '.join(p.key for p in params)})"
        + (f"; --trials is the study's total: use --trials {done + trials} for {trials} more" if not todo else ""))
    if others and not so_far:
        log(f"  (a new study: {digest} identifies its fixed settings"
            + (f", --set {', '.join(f'{k}={v}' for k, v in user.items())}" if user else "")
            + f"; other studies of {preset}:{name} in the file, trained with other settings: {', '.join(others)})")
    reported = _ReportedFailures()

    def objective(trial) -> float:
        values = {p.key: p.suggest(trial) for p in params}
        # The trial's own settings, so its best-preset block never takes another run's --set values.
        trial.set_user_attr("overrides", user)
        trial_overrides = dict(base, **values)
        scratch = None
        if not keep_models:
            scratch = Path(tempfile.mkdtemp(prefix=f"hafs-tune-{trial.number}-"))
            trial_overrides.update({"output.models_dir": str(scratch / "models"),
                                    "output.checkpoints_dir": str(scratch / "checkpoints")})
        evals: list[float] = []

        def on_eval(state, metrics) -> None:
            value = float(metrics["eval_loss"])
            evals.append(value)
            trial.report(value, state.step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val loss {value:.4f} at step {state.step}")

        log(f"trial {trial.number}: " + ", ".join(f"{k}={_show(v)}" for k, v in values.items()))
        try:
            trial_plan = resolve(cfg, preset, trial_overrides)
            out = run(trial_plan, RunOptions(evaluate=False, register=None if keep_models else False,
                                             on_eval=on_eval), log=_signals_only(log) if quiet_trials else log)
            if not evals:
                raise _no_val_loss(trial_plan)
        except optuna.TrialPruned:
            log(f"trial {trial.number}: pruned at val loss {evals[-1]:.4f}")
            raise
        except (faults.Interrupted, KeyboardInterrupt) as exc:
            # A stop by the user ends the search, not this trial alone: Interrupted is a TrainingError, which
            # catch= below would take for a failed trial and go on. Its message (a checkpoint in the scratch
            # folder, `hafs train --resume`) is not true of a trial, so the trial records only the signal.
            signum = (exc.exit_code - 128 if isinstance(exc, faults.Interrupted)
                      else getattr(exc, "signum", signal.SIGINT))
            trial.set_user_attr("interrupted", signal.Signals(signum).name)
            reported.numbers.add(trial.number)
            raise _Stop(signum, trial.number) from None
        except HafsError as exc:
            trial.set_user_attr("error", exc.render())
            reported.numbers.add(trial.number)
            if isinstance(exc, TrainingError):  # the search goes on, so say here why this trial stopped
                log(f"trial {trial.number}: failed: {exc.render()}")
            raise
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        trial.set_user_attr("model_dir", str(out) if keep_models else None)
        log(f"trial {trial.number}: val loss {evals[-1]:.4f}")
        return evals[-1]

    if todo:
        optuna_log = logging.getLogger("optuna.study._optimize")
        optuna_log.addFilter(reported)
        try:
            # An out-of-memory or NaN trial fails and the search goes on; config errors and signals stop it.
            study.optimize(objective, n_trials=todo, catch=(TrainingError,))
        except KeyboardInterrupt as exc:  # _Stop from a trial, or a signal between trials
            raise _interrupted(study, path, getattr(exc, "signum", signal.SIGINT), getattr(exc, "trial", None)) \
                from None
        finally:
            optuna_log.removeFilter(reported)
    return study


class _Stop(KeyboardInterrupt):
    """A signal stopped trial `trial`: carried out of Optuna (which records the trial as failed) to tune."""

    def __init__(self, signum: int, trial: int):
        super().__init__(signum)
        self.signum, self.trial = signum, trial


def _interrupted(study, path: Path, signum: int, trial: int | None):
    """The error that ends a search stopped by a signal: what the study keeps and how to go on."""
    from .faults import Interrupted

    name = signal.Signals(signum).name
    during = (f" during trial {trial}, which is discarded (recorded as failed: the search ignores it and --trials "
              "does not count it)") if trial is not None else ""
    return Interrupted([Problem(
        f"Interrupted ({name}){during}; the study keeps its {finished(study)} finished trial(s) in {path}",
        hint="run the same hafs tune command again to continue the search")], exit_code=128 + int(signum))


def _no_val_loss(plan) -> ConfigError:
    if plan.eval_strategy == "epoch":
        why = ("eval_strategy = \"epoch\" evaluates at the end of an epoch, which the trial did not reach"
               + (f" in max_steps {plan.max_steps}" if plan.max_steps else ""))
        hint, key = "use eval_strategy = \"steps\" with eval_steps <= max_steps", "eval_strategy"
    else:
        why = (f"the val split of dataset {plan.dataset_name!r} ({plan.dataset_dir}) gave no evaluation "
               f"(eval_strategy = {plan.eval_strategy!r}, every {plan.eval_steps or plan.logging_steps} steps)")
        hint, key = "tuning minimises val loss: add a val split to the dataset folder", \
            f"datasets.{plan.dataset_name}"
    return ConfigError([Problem(f"the trial produced no validation loss to minimise: {why}", key=key, hint=hint)],
                       title="Cannot tune:")


def _study_names(storage: str) -> list[str]:
    import optuna

    if not Path(storage.removeprefix("sqlite:///")).exists():
        return []
    return optuna.get_all_study_names(storage=storage)


def _exists(storage: str, study_name: str) -> bool:
    return study_name in _study_names(storage)


def finished(study) -> int:
    """Trials that count towards --trials: complete or pruned."""
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)


def _signals_only(log):
    """The recipe's log during trials: only its answer to a Ctrl-C (the table at the end says the rest)."""

    def trial_log(message="", *args, **kwargs) -> None:
        # faults.SignalGuard / StopOnSignal saying a stop is on its way (its checkpoint is a trial's: not kept)
        signal_name = re.match(r"\s*Received (SIG\w+):", str(message))
        if signal_name:
            log(f"Received {signal_name.group(1)}: stopping the search (send it again to stop sooner).")

    return trial_log


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError([Problem("hafs tune needs Optuna, which is not installed",
                                   hint="pip install 'hafs[tune]'  (or: pip install optuna)")]) from None
    return optuna


# --------------------------------------------------------------------------- results


def results_table(study) -> str:
    """One line per trial: number, state, val loss, parameters (best marked with *)."""
    from optuna.trial import TrialState

    keys = sorted({k for t in study.trials for k in t.params})
    best = _best(study)
    header = ["", "trial", "state", "val loss", *keys]
    rows = []
    for t in study.trials:
        value = f"{t.value:.4f}" if t.value is not None else (
            f"({t.intermediate_values[max(t.intermediate_values)]:.4f})" if t.intermediate_values else "-")
        state = "interrupted" if t.user_attrs.get("interrupted") else t.state.name.lower()
        rows.append(["*" if best is not None and t.number == best.number else "", str(t.number), state, value,
                     *(_show(t.params.get(k, "-")) for k in keys)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    done = sum(t.state == TrialState.COMPLETE for t in study.trials)
    pruned = sum(t.state == TrialState.PRUNED for t in study.trials)
    lines.append(f"{done} complete, {pruned} pruned, {len(study.trials) - done - pruned} failed or interrupted")
    return "\n".join(lines)


def _best(study):
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def _show(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def best_preset_block(cfg, preset: str, params: dict, overrides: dict | None = None) -> str:
    """TOML for the best trial: [hyperparameters.P-tuned], [lora.P-tuned] (when LoRA was tuned), [presets.P-tuned]."""
    from .plan import HYPERPARAMETER_FIELDS, resolve

    plan = resolve(cfg, preset, dict(overrides or {}, **params))
    tuned = f"{preset}-tuned"
    source = cfg.presets[preset]
    lines = [f"# Best trial of `hafs tune {preset}`: " + ", ".join(f"{k} = {_toml(v)}" for k, v in params.items()),
             f"[hyperparameters.{_table(tuned)}]"]
    lines += [f"{k} = {_toml(getattr(plan, k))}" for k in HYPERPARAMETER_FIELDS if getattr(plan, k) is not None]
    lora_name = plan.lora_name
    if any(k.startswith("lora.") for k in params):
        lora_name = tuned
        lines += ["", f"[lora.{_table(tuned)}]"]
        lines += [f"{f.name} = {_toml(getattr(plan.lora, f.name))}" for f in fields(plan.lora)]
    lines += ["", f"[presets.{_table(tuned)}]",
              f"description = {_toml(f'{preset} with the hyperparameters found by hafs tune')}",
              f"expert = {_toml(plan.expert_name)}", f"hardware = {_toml(plan.hardware_name)}",
              f"dataset = {_toml(plan.dataset_name)}", f"lora = {_toml(lora_name)}",
              f"hyperparameters = {_toml(tuned)}"]
    for key in PRESET_FIELDS:
        value = getattr(plan, key)
        if value is not None and (key in params or getattr(source, key, None) is not None):
            lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _table(name: str) -> str:
    import re

    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


# --------------------------------------------------------------------------- command


def cmd_tune(args) -> int:
    """`hafs tune PRESET --trials N [--space NAME] [--keep-models] [--set K=V]`."""
    from .loader import load_config
    from .outputs import atomic_write_bytes
    from .plan import resolve

    cfg = load_config(args.config)
    if args.trials < 1:
        raise ConfigError([Problem(f"--trials must be >= 1, got {args.trials}", key="--trials")])
    study = tune(cfg, args.preset, trials=args.trials, space=args.space, keep_models=args.keep_models,
                 overrides=args.overrides, quiet_trials=not args.verbose)
    print(results_table(study))
    best = _best(study)
    if best is None:
        print("No trial completed: no best preset to write.")
        return 1
    base = best.user_attrs.get("overrides", study.user_attrs.get("overrides", {}))
    block = best_preset_block(cfg, args.preset, best.params, base)
    plan = resolve(cfg, args.preset, base)
    out = best_path(plan, space_name(cfg, args.preset, args.space), study.study_name.rsplit(":", 1)[-1])
    atomic_write_bytes(out, block.encode())
    print(f"\nBest trial {best.number}: val loss {best.value:.4f}. Preset block (also in {out}):\n\n{block}")
    return 0
