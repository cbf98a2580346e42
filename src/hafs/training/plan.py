"""Resolve a preset into one `TrainingConfig`: the plan everything after this point reads.

Pure Python, no torch: `--dry-run` and `--list-*` stay instant. All options that interact
(profile defaults, precision, hardware limits) are settled here, in one place, so the training
code never reads raw TOML or re-derives a setting.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, Problem, did_you_mean
from .loader import coerce
from .schema import (
    DatasetSection, ExpertSection, HardwareProfile, HyperparameterSection, LoraSection, OutputSection,
    PresetSection, TrainingFile, _one_of, PRECISIONS, REPORT_BACKENDS,
)


@dataclass
class TrainingConfig:
    """Everything one training run needs, resolved from a preset. Edit fields, then `validate()`."""

    preset: str
    """Name of the preset this plan came from."""
    config_path: str
    """The training.toml it was resolved from (relative paths in it are relative to its folder)."""
    expert_name: str
    """Key of the expert in [experts.*]."""
    expert: ExpertSection
    """The expert: base model, role, prompt template."""
    hardware_name: str
    """Key of the hardware profile in [hardware.*]."""
    hardware: HardwareProfile
    """The hardware profile the plan was checked against."""
    dataset_name: str
    """Key of the dataset in [datasets.*]."""
    dataset: DatasetSection
    """The dataset section (splits, filters, bad-row policy)."""
    dataset_dir: str
    """Absolute directory of the dataset's splits."""
    lora_name: str
    """Key of the LoRA config in [lora.*]."""
    lora: LoraSection
    """The LoRA adapter's shape."""
    hyperparameters_name: str
    """Key of the hyperparameter preset in [hyperparameters.*]."""
    output: OutputSection
    """Output settings, with models_dir / logs_dir / checkpoints_dir made absolute."""
    # --- optimisation (from the hyperparameter preset; missing keys take the documented defaults)
    num_epochs: float = 1
    """Passes over the training split (ignored when max_steps is set)."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of total steps when warmup_steps is 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler: str = "linear"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    logging_steps: int = 10
    """Optimizer steps between log lines."""
    save_steps: int = 0
    """Optimizer steps between checkpoints (0: none during training)."""
    save_total_limit: int = 2
    """Checkpoints kept per run."""
    eval_strategy: str = "no"
    """no, steps or epoch."""
    eval_steps: int | None = None
    """Steps between evaluations with eval_strategy = steps."""
    seed: int = 42
    """Seed for data order, dropout and adapter init."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers."""
    # --- shape of the run (from the preset, defaults from the hardware profile)
    sequence_length: int = 1024
    """Max tokens per sample."""
    batch_size: int = 1
    """Samples per device per micro-batch (with packing: rows of sequence_length tokens)."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step."""
    gradient_checkpointing: bool | None = None
    """Recompute activations (None: decided from the memory estimate at run time)."""
    precision: str = "fp32"
    """Resolved compute precision: bf16, fp16 or fp32."""
    packing: bool = True
    """Pack samples into rows of sequence_length without attention across samples."""
    device: str = "auto"
    """Device kind from the profile: cpu, cuda, mps or auto."""

    # Derived numbers are methods (litgpt style) so they never go stale after an edit.
    def effective_batch(self, world_size: int = 1) -> int:
        """Samples (or packed rows) per optimizer step across all workers."""
        return self.batch_size * self.gradient_accumulation * world_size

    def max_tokens_per_step(self, world_size: int = 1) -> int:
        """Upper bound of tokens per optimizer step."""
        return self.effective_batch(world_size) * self.sequence_length

    def total_steps(self, micro_batches_per_epoch: int) -> int:
        """Optimizer steps the run will take, given micro-batches in one epoch."""
        if self.max_steps:
            return self.max_steps
        per_epoch = math.ceil(micro_batches_per_epoch / self.gradient_accumulation)
        return max(1, math.ceil(per_epoch * self.num_epochs))

    def resolved_warmup(self, total_steps: int) -> int:
        """Warm-up steps actually used (warmup_steps, else warmup_ratio of total, capped at total)."""
        steps = self.warmup_steps or int(self.warmup_ratio * total_steps)
        return min(steps, total_steps)

    def world_size(self) -> int:
        """Workers the profile asks for."""
        return self.hardware.num_gpus * self.hardware.num_nodes

    def base_short(self) -> str:
        """Short base-model tag for names: Qwen/Qwen2.5-Coder-1.5B → qwen25-coder-15b."""
        tail = self.expert.base_model.rstrip("/").replace("\\", "/").split("/")[-1]
        return "".join(c for c in tail.lower() if c.isalnum() or c == "-").strip("-") or "model"

    def validate(self) -> "TrainingConfig":
        """Re-check types, ranges and hardware rules (after edits); raises ConfigError with all problems."""
        problems = _type_problems(self) + hardware_problems(self)
        if problems:
            raise ConfigError(problems, title=f"Preset '{self.preset}' cannot run as configured:")
        return self

    def to_dict(self) -> dict:
        """Plain JSON-able dict (for metadata.json, checkpoints and --json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingConfig":
        """Inverse of to_dict (used when resuming)."""
        data = dict(data)
        nested = {"expert": ExpertSection, "hardware": HardwareProfile, "dataset": DatasetSection,
                  "lora": LoraSection}
        for key, section in nested.items():
            data[key] = section(**data[key])
        out = dict(data["output"])
        from .schema import OutputMetadataFlags

        out["metadata"] = OutputMetadataFlags(**out.get("metadata", {}))
        data["output"] = OutputSection(**out)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


HYPERPARAMETER_FIELDS = [f.name for f in dataclasses.fields(HyperparameterSection)]
OVERRIDABLE = [f.name for f in dataclasses.fields(TrainingConfig)
               if f.name not in ("preset", "config_path", "expert_name", "expert", "hardware_name",
                                 "hardware", "dataset_name", "dataset", "dataset_dir", "lora_name",
                                 "hyperparameters_name", "output")]
NESTED_OVERRIDABLE = ("lora", "dataset", "expert", "hardware", "output")


def resolve(cfg: TrainingFile, preset_name: str, overrides: list[str] | dict | None = None,
            *, check_hardware: bool = True) -> TrainingConfig:
    """Turn preset `preset_name` of `cfg` into a validated TrainingConfig; overrides are KEY=VALUE."""
    if preset_name not in cfg.presets:
        available = ", ".join(sorted(cfg.presets)) or "none"
        raise ConfigError([Problem(f"Preset '{preset_name}' not found{did_you_mean(preset_name, cfg.presets)}",
                                   hint=f"available presets: {available} (python scripts/train.py --list-presets)")],
                          title="Error:" if False else "")
    preset: PresetSection = cfg.presets[preset_name]
    hw = cfg.hardware[preset.hardware]
    expert = cfg.experts[preset.expert]
    hp: HyperparameterSection = cfg.hyperparameters[preset.hyperparameters]
    base = Path(cfg.path).resolve().parent if cfg.path and not cfg.path.startswith("<") else Path.cwd()

    sequence_length = preset.sequence_length or min(hw.max_sequence_length, expert.context_window)
    precision = preset.precision
    if precision == "auto":
        # bf16 first: same range as fp32, so no loss scaling and no fp16 overflow (Qwen is known to
        # overflow in fp16); fp16 only where bf16 is missing.
        precision = "bf16" if hw.supports_bf16 else "fp16" if hw.supports_fp16 else "fp32"
    output = copy.deepcopy(cfg.output)
    for key in ("models_dir", "logs_dir", "checkpoints_dir"):
        setattr(output, key, str(resolve_path(getattr(output, key), base)))
    if output.registry:
        output.registry = str(resolve_path(output.registry, base))

    plan = TrainingConfig(
        preset=preset_name, config_path=str(Path(cfg.path).resolve()) if not cfg.path.startswith("<") else cfg.path,
        expert_name=preset.expert, expert=copy.deepcopy(expert),
        hardware_name=preset.hardware, hardware=copy.deepcopy(hw),
        dataset_name=preset.dataset, dataset=copy.deepcopy(cfg.datasets[preset.dataset]),
        dataset_dir=str(resolve_path(cfg.datasets[preset.dataset].path, base)),
        lora_name=preset.lora, lora=copy.deepcopy(cfg.lora[preset.lora]),
        hyperparameters_name=preset.hyperparameters, output=output,
        **{k: copy.deepcopy(getattr(hp, k)) for k in HYPERPARAMETER_FIELDS},
        sequence_length=sequence_length,
        batch_size=preset.batch_size or hw.max_batch_size,
        gradient_accumulation=preset.gradient_accumulation or hw.recommended_gradient_accumulation,
        gradient_checkpointing=preset.gradient_checkpointing,
        precision=precision, packing=preset.packing, device=hw.device,
    )
    if preset.report_to is not None:
        plan.report_to = list(preset.report_to)
    apply_overrides(plan, overrides or [])
    problems = _type_problems(plan) + (hardware_problems(plan) if check_hardware else [])
    if problems:
        raise ConfigError([dataclasses.replace(p, file=p.file or cfg.path) for p in problems],
                          title=f"Preset '{preset_name}' cannot run as configured:")
    return plan


def resolve_path(value: str, base: Path) -> Path:
    """`~` expanded; relative paths taken relative to the config file's folder."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def parse_override(text: str) -> tuple[str, object]:
    """'learning_rate=3e-4' → ('learning_rate', 0.0003); values use TOML syntax, bare words are strings."""
    if "=" not in text:
        raise ConfigError([Problem(f"override '{text}' is not KEY=VALUE", key="--set",
                                   hint="e.g. --set learning_rate=3e-4 --set lora.r=16")])
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare word: a string (cosine, bf16, ...)
    return key, value


def apply_overrides(plan: TrainingConfig, overrides: list[str] | dict) -> None:
    """Apply KEY=VALUE overrides (dotted keys reach nested sections), type-checked like the file."""
    items = list(overrides.items()) if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    problems = []
    for key, value in items:
        target, name = plan, key
        if "." in key:
            head, name = key.split(".", 1)
            if head not in NESTED_OVERRIDABLE:
                problems.append(Problem(f"unknown section '{head}'{did_you_mean(head, NESTED_OVERRIDABLE)}",
                                        key=f"--set {key}"))
                continue
            target = getattr(plan, head)
        allowed = [f.name for f in dataclasses.fields(target)] if target is not plan else OVERRIDABLE
        if name not in allowed:
            problems.append(Problem(f"unknown setting{did_you_mean(name, allowed)}", key=f"--set {key}",
                                    hint="settings: " + ", ".join(allowed)))
            continue
        if value == "none" and name in ("max_steps", "gradient_checkpointing", "eval_steps"):
            setattr(target, name, None)
            continue
        tp = typing.get_type_hints(type(target))[name]
        converted, error = coerce(value, tp, [key])
        if error:
            problems.append(Problem(error, key=f"--set {key}"))
        else:
            setattr(target, name, converted)
    if problems:
        raise ConfigError(problems, title="Invalid --set override:")


def _type_problems(plan: TrainingConfig) -> list[Problem]:
    """Types and ranges of every field, via the same section checks the loader uses."""
    problems = []
    hints = typing.get_type_hints(TrainingConfig)
    for f in dataclasses.fields(TrainingConfig):
        value = getattr(plan, f.name)
        if value is None and "None" in str(hints[f.name]):
            continue
        _, error = coerce(value, hints[f.name], [f.name])
        if error:
            problems.append(Problem(error, key=f.name))
    if problems:
        return problems
    hp = HyperparameterSection(**{k: getattr(plan, k) for k in HYPERPARAMETER_FIELDS})
    checks = [("", c) for c in hp.check()]
    checks += [("lora.", c) for c in plan.lora.check()] + [("dataset.", c) for c in plan.dataset.check()]
    checks += [("expert.", c) for c in plan.expert.check()]
    for name in ("sequence_length", "batch_size", "gradient_accumulation"):
        if getattr(plan, name) <= 0:
            checks.append(("", (name, f"must be > 0, got {getattr(plan, name)}")))
    checks += [("", c) for c in _one_of(plan, "precision", [p for p in PRECISIONS if p != "auto"])]
    for prefix, (key, message) in checks:
        problems.append(Problem(message, key=prefix + key))
    for backend in plan.report_to:
        if backend not in REPORT_BACKENDS:
            problems.append(Problem(f"unknown tracker '{backend}'", key="report_to"))
    return problems


def hardware_problems(plan: TrainingConfig) -> list[Problem]:
    """The profile's limits, applied to the plan; each message says what to change."""
    hw, p = plan.hardware, f"presets.{plan.preset}"
    out = []
    if hw.status != "available":
        out.append(Problem(f"Hardware {hw.name} is unsupported: {hw.reason or 'status = ' + repr(hw.status)}",
                           key=f"hardware.{plan.hardware_name}.status",
                           hint="pick a preset on another hardware profile (--list-presets)"))
    if plan.batch_size > hw.max_batch_size:
        out.append(Problem(f"batch_size {plan.batch_size} exceeds {plan.hardware_name}'s max_batch_size "
                           f"{hw.max_batch_size}", key=f"{p}.batch_size",
                           hint=f"use batch_size <= {hw.max_batch_size} and raise gradient_accumulation instead"))
    if plan.sequence_length > hw.max_sequence_length:
        out.append(Problem(f"sequence_length {plan.sequence_length} exceeds {plan.hardware_name}'s "
                           f"max_sequence_length {hw.max_sequence_length}", key=f"{p}.sequence_length",
                           hint=f"use sequence_length <= {hw.max_sequence_length}, or a profile with more memory"))
    if plan.sequence_length > plan.expert.context_window:
        out.append(Problem(f"sequence_length {plan.sequence_length} exceeds expert {plan.expert_name}'s "
                           f"context_window {plan.expert.context_window}", key=f"{p}.sequence_length"))
    if plan.lora.r > hw.max_lora_rank:
        out.append(Problem(f"LoRA rank r={plan.lora.r} (lora.{plan.lora_name}) exceeds {plan.hardware_name}'s "
                           f"max_lora_rank {hw.max_lora_rank}", key=f"{p}.lora",
                           hint=f"use a [lora.*] config with r <= {hw.max_lora_rank}"))
    if plan.gradient_checkpointing and not hw.supports_gradient_checkpointing:
        out.append(Problem(f"gradient checkpointing is not supported on {hw.name}",
                           key=f"{p}.gradient_checkpointing", hint="set gradient_checkpointing = false"))
    if plan.precision == "bf16" and not hw.supports_bf16:
        out.append(Problem(f"bf16 is not supported on {hw.name} (supports_bf16 = false)", key=f"{p}.precision",
                           hint="use precision = \"auto\", \"fp16\" or \"fp32\""))
    if plan.precision == "fp16" and not hw.supports_fp16:
        out.append(Problem(f"fp16 is not supported on {hw.name} (supports_fp16 = false)", key=f"{p}.precision"))
    return out
