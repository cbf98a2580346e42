"""`--set KEY=VALUE` overrides of a resolved plan: TOML-syntax values, dotted keys into its sections,
type-checked like the file, with "did you mean" for unknown keys (plan.resolve applies them)."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path

from .errors import ConfigError, Problem, did_you_mean
from .loader import coerce
from .plan import TrainingConfig, _auto_precision, resolve_base_model_path, resolve_path

PLAN_IDENTITY = ("preset", "config_path", "expert_name", "expert", "hardware_name", "hardware", "dataset_name",
                 "dataset", "dataset_dir", "lora_name", "lora", "hyperparameters_name", "output")
OVERRIDABLE = [f.name for f in dataclasses.fields(TrainingConfig)
               if f.name not in PLAN_IDENTITY and not f.name.startswith("_")]
NESTED_OVERRIDABLE = ("lora", "dataset", "expert", "hardware", "output")


def parse_override(text: str) -> tuple[str, object]:
    """'learning_rate=3e-4' → ('learning_rate', 0.0003); values use TOML syntax, bare words are strings."""
    if "=" not in text:
        raise ConfigError([Problem(f"override '{text}' is not KEY=VALUE", key="--set",
                                   hint="e.g. --set learning_rate=3e-4 --set lora.r=16")])
    key, raw = (s.strip() for s in text.split("=", 1))
    if "\n" in raw or "\r" in raw:
        return key, raw  # one value, never extra TOML lines smuggled in
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (ValueError, RecursionError):  # TOMLDecodeError is a ValueError
        value = raw  # bare word: a string (cosine, bf16, ...)
    return key, value


def _override_target(plan: TrainingConfig, key: str):
    """(object, attribute) a dotted override key names, or (None, problem message)."""
    parts = key.split(".")
    target = plan
    for part in parts[:-1]:
        sections = (NESTED_OVERRIDABLE if target is plan else
                    [f.name for f in dataclasses.fields(target) if dataclasses.is_dataclass(getattr(target, f.name))])
        if part not in sections:
            return None, f"unknown section '{part}'{did_you_mean(part, sections)}"
        target = getattr(target, part)
    name = parts[-1]
    allowed = (OVERRIDABLE if target is plan else
               [f.name for f in dataclasses.fields(target) if not dataclasses.is_dataclass(getattr(target, f.name))])
    if name in allowed:
        return target, name
    if target is plan and name in NESTED_OVERRIDABLE:
        first = dataclasses.fields(getattr(plan, name))[0].name
        return None, f"'{name}' is a section: set one of its keys, e.g. {name}.{first}"
    suggestion = did_you_mean(name, allowed)
    if not suggestion and target is plan:  # `r=16` → lora.r
        nested = [f"{s}.{f.name}" for s in NESTED_OVERRIDABLE for f in dataclasses.fields(getattr(plan, s))]
        same = [n for n in nested if n.endswith("." + name)]
        suggestion = f" (did you mean '{same[0]}'?)" if same else did_you_mean(name, nested)
    return None, f"unknown setting{suggestion}"


def apply_overrides(plan: TrainingConfig, overrides: list[str] | dict) -> dict[str, str]:
    """Apply KEY=VALUE overrides (dotted keys reach nested sections), type-checked like the file.

    Returns {field path: key as the user typed it} of what was set, so later problems can blame it.
    Paths given on the command line (dataset.path, output.*_dir) are relative to the current directory.
    """
    items = list(overrides.items()) if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    problems, applied = [], {}
    for key, value in items:
        key = str(key).strip()
        target, name = _override_target(plan, key)
        if target is None:
            problems.append(Problem(name, key=f"--set {key}", hint="settings: " + ", ".join(OVERRIDABLE)
                                    + "; nested: " + ", ".join(f"{s}.KEY" for s in NESTED_OVERRIDABLE)))
            continue
        tp = typing.get_type_hints(type(target))[name]
        optional = type(None) in typing.get_args(tp)
        if optional and value in ("none", "None", "null"):
            value = None
        elif typing.get_origin(tp) is list and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]  # report_to=wandb,tensorboard
        converted, error = coerce(value, tp, [key])
        if error:
            problems.append(Problem(error, key=f"--set {key}"))
            continue
        setattr(target, name, converted)
        applied[key] = key
        if target is plan.dataset and name == "path":
            plan.dataset_dir = str(resolve_path(converted, Path.cwd()))
            plan._derived_from = (plan.dataset.path, plan.dataset_dir)  # validate() must not re-derive from the file
        elif target is plan.expert and name == "base_model":
            plan.expert.base_model = resolve_base_model_path(converted, Path.cwd())
        elif target is plan.output and name in ("models_dir", "logs_dir", "checkpoints_dir", "registry") and converted:
            setattr(target, name, str(resolve_path(converted, Path.cwd())))
    if problems:
        raise ConfigError(problems, title="Invalid --set override:")
    if "hardware.device" in applied and "device" not in applied:
        plan.device = plan.hardware.device  # the plan runs where its profile now says (resolve copied it)
        applied["device"] = applied["hardware.device"]  # a bad value is the override's fault, not the file's
    if plan.precision == "auto":
        plan.precision = _auto_precision(plan.hardware)
    return applied
