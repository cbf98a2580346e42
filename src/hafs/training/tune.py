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
trials wanted; a trial interrupted mid-run is left as failed and not counted. The results are
printed as a table and the best trial is written as ready `[hyperparameters.*]`, `[lora.*]` and
`[presets.PRESET-tuned]` tables (`best.toml` beside the study) to paste into the config.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ConfigError, Problem, TrainingError, did_you_mean

TYPES = ("loguniform", "uniform", "int", "categorical")
KEYS = {"loguniform": {"low", "high"}, "uniform": {"low", "high"}, "int": {"low", "high", "step"},
        "categorical": {"choices"}}
PRESET_FIELDS = ("sequence_length", "batch_size", "gradient_accumulation", "gradient_checkpointing", "precision",
                 "packing")
"""Plan fields a [presets.*] table carries (the rest of a tuned plan goes to [hyperparameters.*] / [lora.*])."""


@dataclass
class Param:
    """One dimension of the search space."""

    key: str
    """--set key of the plan, e.g. learning_rate or lora.r."""
    type: str
    """loguniform, uniform, int or categorical."""
    low: float | int | None = None
    """Lower bound (numeric types)."""
    high: float | int | None = None
    """Upper bound, inclusive (numeric types)."""
    step: int = 1
    """Step of an int parameter."""
    choices: tuple = ()
    """Values of a categorical parameter."""

    def suggest(self, trial):
        """Sample this parameter for an Optuna trial."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=self.step)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.type == "loguniform")

    def samples(self) -> list:
        """Values that span the parameter (to check each against the plan before any trial runs)."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


# --------------------------------------------------------------------------- the space


def space_name(cfg, preset: str, requested: str | None) -> str:
    """--space, else the preset's own table, else 'default'; a missing table is a ConfigError."""
    name = requested or (preset if preset in cfg.tuning else "default")
    if name not in cfg.tuning:
        have = ", ".join(sorted(cfg.tuning)) or "none"
        raise ConfigError([Problem(f"no [tuning.{name}] search space{did_you_mean(name, cfg.tuning)}",
                                   key=f"tuning.{name}", file=cfg.path,
                                   hint=f"defined: {have}; declare e.g. [tuning.{name}] learning_rate = "
                                        "{type = \"loguniform\", low = 1e-5, high = 1e-3}, or pass --space")])
    return name


def load_space(cfg, name: str, plan) -> list[Param]:
    """The parameters of `[tuning.NAME]`, each checked against `plan`; all problems in one ConfigError."""
    table = cfg.tuning.get(name, {})
    problems: list[Problem] = []

    def report(key: str, message: str, hint: str = "") -> None:
        path = ["tuning", name, key]
        problems.append(Problem(message, key=".".join(["tuning", name, _quote(key)]), file=cfg.path,
                                line=cfg.line_of(path), hint=hint))

    if not table:
        report_key = f"tuning.{name}"
        raise ConfigError([Problem("the search space is empty", key=report_key, file=cfg.path,
                                   line=cfg.line_of(["tuning", name]), hint="add at least one parameter")])
    params = []
    for key, spec in table.items():
        param = _parse(key, spec, report)
        if param is None:
            continue
        problem = _check_against_plan(param, plan)
        if problem:
            report(key, *problem)
            continue
        params.append(param)
    if problems:
        raise ConfigError(problems, title=f"Search space [tuning.{name}] is invalid:")
    return params


def _quote(key: str) -> str:
    return f'"{key}"' if "." in key else key


def _parse(key: str, spec, report) -> Param | None:
    if not isinstance(spec, dict):
        report(key, f"must be an inline table like {{type = \"loguniform\", low = 1e-5, high = 1e-3}}, got {spec!r}")
        return None
    kind = spec.get("type")
    if kind not in TYPES:
        report(key, f"type must be one of {', '.join(TYPES)}, got {kind!r}{did_you_mean(str(kind), TYPES)}")
        return None
    unknown = sorted(set(spec) - KEYS[kind] - {"type"})
    if unknown:
        report(key, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for type {kind!r}",
               hint=f"{kind} takes: {', '.join(sorted(KEYS[kind]))}")
        return None
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            report(key, "choices must be a non-empty list")
            return None
        if any(not isinstance(c, (str, int, float, bool)) for c in choices):
            report(key, "choices must be numbers, strings or booleans (Optuna stores them as such)")
            return None
        return Param(key, kind, choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    number = int if kind == "int" else (int, float)
    for field_name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
            report(key, f"{field_name} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
            return None
    if low > high:
        report(key, f"low {low} is above high {high}")
        return None
    if kind == "loguniform" and low <= 0:
        report(key, f"low must be > 0 for a log-uniform range, got {low}", hint="use type = \"uniform\" from 0")
        return None
    step = spec.get("step", 1)
    if kind == "int" and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        report(key, f"step must be a positive integer, got {step!r}")
        return None
    return Param(key, kind, low=low, high=high, step=step)


def _check_against_plan(param: Param, plan) -> tuple[str, str] | None:
    """(message, hint) when the key cannot be tuned or a value of its range does not fit the plan."""
    from .overrides import NESTED_OVERRIDABLE, OVERRIDABLE, apply_overrides

    head = param.key.split(".")[0]
    if "." in param.key and head != "lora":
        return (f"only plan settings and lora.* can be tuned, not {head}.*",
                "e.g. learning_rate, warmup_steps, weight_decay, lora.r, lora.lora_alpha, lora.lora_dropout")
    for value in param.samples():
        trial_plan = copy.deepcopy(plan)
        try:
            apply_overrides(trial_plan, {param.key: value})
            trial_plan.validate()
        except ConfigError as exc:
            first = exc.problems[0]
            message = first.message.removeprefix("unknown setting")
            if first.message.startswith("unknown"):
                return (f"'{param.key}' is not a setting of the plan{message}",
                        "keys are --set keys: " + ", ".join(OVERRIDABLE) + "; "
                        + ", ".join(f"{s}.KEY" for s in NESTED_OVERRIDABLE if s == "lora"))
            return f"value {value!r} does not fit: {first.message}", first.hint
    return None


# --------------------------------------------------------------------------- the search


def study_path(plan, space: str) -> Path:
    """The SQLite file of the study for (preset, space)."""
    from .outputs import safe_component

    return Path(plan.output.logs_dir) / "tuning" / f"{safe_component(plan.preset)}-{safe_component(space)}.db"


def tune(cfg, preset: str, *, trials: int, space: str | None = None, keep_models: bool = False,
         overrides: list[str] | None = None, log=print, quiet_trials: bool = True):
    """Run trials until the study has `trials` finished ones; returns the optuna Study."""
    optuna = _optuna()
    from .overrides import parse_override
    from .plan import resolve
    from .recipe import RunOptions, run

    base = dict(parse_override(o) for o in (overrides or []))
    plan = resolve(cfg, preset, base)
    name = space_name(cfg, preset, space)
    params = load_space(cfg, name, plan)
    if plan.eval_strategy == "no" and "eval_strategy" not in base:
        base["eval_strategy"] = "steps"  # the objective and the pruner need evaluations during training
    path = study_path(plan, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name, storage = f"{preset}:{name}", f"sqlite:///{path}"
    so_far = len(optuna.load_study(study_name=study_name, storage=storage).trials) \
        if _exists(storage, study_name) else 0
    study = optuna.create_study(
        study_name=study_name, storage=storage, direction="minimize", load_if_exists=True,
        # Seeded by the trials so far: a resumed search does not replay the first search's samples.
        sampler=optuna.samplers.TPESampler(seed=plan.seed + so_far),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    done = finished(study)
    todo = max(0, trials - done)
    log(f"Study {study_name} in {path}: {done} finished trial(s), running {todo} more "
        f"({len(params)} parameter(s): {', '.join(p.key for p in params)})")

    def objective(trial) -> float:
        values = {p.key: p.suggest(trial) for p in params}
        trial_overrides = dict(base, **values)
        scratch = None
        if not keep_models:
            scratch = Path(tempfile.mkdtemp(prefix=f"hafs-tune-{trial.number}-"))
            trial_overrides.update({"output.models_dir": str(scratch / "models"),
                                    "output.checkpoints_dir": str(scratch / "checkpoints")})
        trial_plan = resolve(cfg, preset, trial_overrides)
        evals: list[float] = []

        def on_eval(state, metrics) -> None:
            value = float(metrics["eval_loss"])
            evals.append(value)
            trial.report(value, state.step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val loss {value:.4f} at step {state.step}")

        log(f"trial {trial.number}: " + ", ".join(f"{k}={_show(v)}" for k, v in values.items()))
        try:
            out = run(trial_plan, RunOptions(evaluate=False, register=None if keep_models else False,
                                             on_eval=on_eval), log=_quiet if quiet_trials else log)
        except optuna.TrialPruned:
            log(f"trial {trial.number}: pruned at val loss {evals[-1]:.4f}")
            raise
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        if not evals:
            raise ConfigError([Problem("the trial produced no validation loss to minimise",
                                       key=f"datasets.{plan.dataset_name}.val_split",
                                       hint="tuning needs a val split in the dataset folder and evaluations "
                                            "during training (eval_strategy = \"steps\")")])
        trial.set_user_attr("model_dir", str(out) if keep_models else None)
        log(f"trial {trial.number}: val loss {evals[-1]:.4f}")
        return evals[-1]

    if todo:
        # An out-of-memory or NaN trial fails and the search goes on; config errors stop it.
        study.optimize(objective, n_trials=todo, catch=(TrainingError,))
    return study


def _exists(storage: str, study_name: str) -> bool:
    import optuna

    if not Path(storage.removeprefix("sqlite:///")).exists():
        return False
    return study_name in optuna.get_all_study_names(storage=storage)


def finished(study) -> int:
    """Trials that count towards --trials: complete or pruned."""
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)


def _quiet(*args, **kwargs) -> None:
    """The recipe's log during trials (the table at the end says what matters)."""


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
        rows.append(["*" if best is not None and t.number == best.number else "", str(t.number),
                     t.state.name.lower(), value, *(_show(t.params.get(k, "-")) for k in keys)])
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
    from .overrides import parse_override
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
    base = dict(parse_override(o) for o in args.overrides)
    block = best_preset_block(cfg, args.preset, best.params, base)
    plan = resolve(cfg, args.preset, base)
    out = study_path(plan, space_name(cfg, args.preset, args.space)).with_suffix(".best.toml")
    atomic_write_bytes(out, block.encode())
    print(f"\nBest trial {best.number}: val loss {best.value:.4f}. Preset block (also in {out}):\n\n{block}")
    return 0
