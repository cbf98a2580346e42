"""The search space of `hafs tune`: a `[tuning.NAME]` table parsed into typed parameters, checked
against the plan they will be applied to (tune.py runs the study)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from .errors import ConfigError, Problem, did_you_mean

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
