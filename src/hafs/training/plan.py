"""Resolve a preset into one `TrainingConfig`: the plan everything after this point reads.

Pure Python, no torch: `--dry-run` and `--list-*` stay instant. All options that interact
(profile defaults, precision, hardware limits) are settled here, in one place, so the training
code never reads raw TOML or re-derives a setting.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, Problem, did_you_mean
from .loader import REFERENCES, _dotted, build_section, coerce_at
from .schema import (
    DEVICES,
    PRECISIONS,
    DatasetSection,
    ExpertSection,
    HardwareProfile,
    HyperparameterSection,
    LoraSection,
    OutputSection,
    PresetSection,
    TrainingFile,
    _one_of,
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
    """Absolute directory of the dataset's splits, derived from dataset.path (validate() re-derives it after an
    edit of dataset.path; edit that, not this)."""
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
    _derived_from: tuple | None = field(default=None, repr=False, compare=False)
    """(dataset.path, dataset_dir) when dataset_dir was last derived: tells validate() which of them an edit changed."""
    _overridden: dict = field(default_factory=dict, repr=False, compare=False)
    """{plan field: key as typed} of the --set overrides resolve() applied, so later problems can blame them."""

    # Derived numbers are methods (litgpt style) so they never go stale after an edit.
    def effective_batch(self, world_size: int = 1) -> int:
        """Samples (or packed rows) per optimizer step across all workers."""
        return self.batch_size * self.gradient_accumulation * world_size

    def max_tokens_per_step(self, world_size: int = 1) -> int:
        """Upper bound of tokens per optimizer step."""
        return self.effective_batch(world_size) * self.sequence_length

    def steps_per_epoch(self, micro_batches_per_epoch: int) -> int:
        """Optimizer steps in one epoch (the last one may accumulate fewer micro-batches)."""
        return max(1, math.ceil(micro_batches_per_epoch / self.gradient_accumulation))

    def total_steps(self, micro_batches_per_epoch: int) -> int:
        """Optimizer steps the run will take, given micro-batches in one epoch."""
        if self.max_steps:
            return self.max_steps
        return max(1, math.ceil(self.steps_per_epoch(micro_batches_per_epoch) * self.num_epochs))

    def resolved_warmup(self, total_steps: int) -> int:
        """Warm-up steps actually used (warmup_steps, else warmup_ratio of total, capped at total)."""
        steps = self.warmup_steps or int(self.warmup_ratio * total_steps)
        return min(steps, total_steps)

    def config_file(self) -> str:
        """config_path for messages; '' for a config not read from a file ('<string>'): nothing to point at."""
        return self.config_path if self.config_path and not self.config_path.startswith("<") else ""

    def world_size(self) -> int:
        """Workers the profile asks for."""
        return self.hardware.num_gpus * self.hardware.num_nodes

    def base_short(self) -> str:
        """Short base-model tag for names: Qwen/Qwen2.5-Coder-1.5B → qwen25-coder-15b."""
        tail = self.expert.base_model.rstrip("/").replace("\\", "/").split("/")[-1]
        return "".join(c for c in tail.lower() if c.isalnum() or c == "-").strip("-") or "model"

    def validate(self) -> TrainingConfig:
        """Re-check types, ranges and hardware rules (after edits); raises ConfigError with all problems.

        Also normalises what it checked: whole-number floats become ints, ints become floats where
        a float is expected, and precision "auto" becomes what the profile supports.
        """
        problems = _section_problems(self)
        if not problems:
            problems = self._rederive() or hardware_problems(self)
        if problems:
            raise ConfigError(problems, title=f"Preset '{self.preset}' cannot run as configured:")
        return self

    def line_of(self, keypath) -> int | None:
        """Line of `keypath` in the config file (its nearest enclosing table's when absent); None without one.

        Read again when asked: errors found after resolve() (loading the model, a resume) are rare, and
        the plan holds no TrainingFile to ask."""
        from .keypaths import key_lines, nearest_line

        path = self.config_file()
        if not path:
            return None
        try:
            return nearest_line(key_lines(Path(path).read_text(encoding="utf-8-sig")), keypath)
        except Exception:  # noqa: BLE001 - the file changed or went away since: the key alone still says where
            return None

    def config_dir(self) -> Path:
        """Folder that relative paths of the plan are relative to: the config file's, else the working directory."""
        return Path(self.config_file()).parent if self.config_file() else Path.cwd()

    def _rederive(self) -> list[Problem]:
        """Make the derived paths follow edits of the plan (README: edit it, then train_with_config).

        Why: dataset_dir and the absolute output folders were computed once by resolve(); an edit of
        dataset.path or a relative output folder would otherwise be ignored without a word."""
        base = self.config_dir()
        for key in ("models_dir", "logs_dir", "checkpoints_dir", "registry"):
            value = getattr(self.output, key)
            if value:
                setattr(self.output, key, str(resolve_path(value, base)))
        derived = str(resolve_path(self.dataset.path, base))
        if self._derived_from is None:  # built by hand: nothing to compare with, the plan is taken as given
            self._derived_from = (self.dataset.path, self.dataset_dir)
        old_path, old_dir = self._derived_from
        if self.dataset_dir != old_dir and self.dataset_dir != derived:
            return [Problem(f"dataset_dir was changed to '{self.dataset_dir}' but dataset.path is "
                            f"'{self.dataset.path}': dataset_dir is derived from dataset.path", key="dataset_dir",
                            hint="set dataset.path instead (relative paths are relative to the config file's "
                                 "folder) and leave dataset_dir as it was")]
        if self.dataset.path != old_path:
            self.dataset_dir = derived
        self._derived_from = (self.dataset.path, self.dataset_dir)
        return []

    def to_dict(self) -> dict:
        """Plain JSON-able dict (for metadata.json, checkpoints and --json)."""
        out = dataclasses.asdict(self)
        for key in [k for k in out if k.startswith("_")]:  # bookkeeping of this object, not part of the plan
            del out[key]
        return out

    def blame_overrides(self, problems: list[Problem]) -> list[Problem]:
        """`problems` with those about a file key that a --set override replaced put on the override.

        Why: checks after resolve() (dataset files, output folders) name the file's key, e.g.
        `datasets.mine.path`, though the value they found came from `--set dataset.path`."""
        if not self._overridden:
            return problems
        prefixes = {_dotted([section, getattr(self, f"{name}_name")]) + ".": name + "."
                    for name, section in SECTION_OF.items()}
        prefixes[_dotted(["presets", self.preset]) + "."] = ""
        prefixes[_dotted(["hyperparameters", self.hyperparameters_name]) + "."] = ""
        prefixes["output."] = "output."
        out = []
        for problem in problems:
            field_key = next((to + problem.key[len(src):] for src, to in prefixes.items()
                              if problem.key.startswith(src)), None)
            typed = self._overridden.get((field_key or "").split("[")[0])
            out.append(dataclasses.replace(problem, key=f"--set {typed}", file="", line=None) if typed else problem)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        """Inverse of to_dict (used when resuming); keys this version does not know are ignored.

        Types and ranges are checked (ConfigError); hardware rules are not: call validate() for those.
        """
        problems: list[Problem] = []

        def report(keypath, message, hint=""):
            problems.append(Problem(message, key=_dotted(keypath), hint=hint))

        if not isinstance(data, dict):
            raise ConfigError([Problem(f"a saved plan must be a table, got {type(data).__name__}")])
        plan = build_section(cls, _known_keys(cls, data), [], report)
        if problems or plan is None:
            raise ConfigError(problems, title="Saved training plan is invalid:")
        plan._derived_from = (plan.dataset.path, plan.dataset_dir)  # as saved: consistent by construction
        return plan


def _known_keys(cls, data: dict) -> dict:
    """`data` without keys `cls` (and its nested sections) does not have: older or newer plans."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
                value = _known_keys(hints[f.name], value)
            out[f.name] = value
    return out


HYPERPARAMETER_FIELDS = [f.name for f in dataclasses.fields(HyperparameterSection)]
SECTION_OF = {"lora": "lora", "expert": "experts", "dataset": "datasets", "hardware": "hardware"}
"""Nested plan field → the [section.*] of the file it was copied from."""


def resolve(cfg: TrainingFile, preset_name: str, overrides: list[str] | dict | None = None,
            *, check_hardware: bool = True) -> TrainingConfig:
    """Turn preset `preset_name` of `cfg` into a validated TrainingConfig; overrides are KEY=VALUE."""
    if preset_name not in cfg.presets:
        available = ", ".join(sorted(cfg.presets)) or "none"
        raise ConfigError([Problem(f"Preset '{preset_name}' not found{did_you_mean(preset_name, cfg.presets)}",
                                   hint=f"available presets: {available} (python scripts/train.py --list-presets)")])
    preset: PresetSection = cfg.presets[preset_name]
    # load_config guarantees these; a TrainingFile built or edited in Python may not.
    missing = [Problem(f"{key} '{getattr(preset, key)}' is not defined"
                       f"{did_you_mean(getattr(preset, key), getattr(cfg, section))}",
                       key=_dotted(["presets", preset_name, key]),
                       file=cfg.path, line=cfg.line_of(["presets", preset_name, key]),
                       hint=f"[{section}.*] has: {', '.join(sorted(getattr(cfg, section))) or 'none defined'}")
               for key, section in REFERENCES.items() if getattr(preset, key) not in getattr(cfg, section)]
    if missing:
        raise ConfigError(missing, title=f"Preset '{preset_name}' cannot run as configured:")
    hw = cfg.hardware[preset.hardware]
    expert = cfg.experts[preset.expert]
    hp: HyperparameterSection = cfg.hyperparameters[preset.hyperparameters]
    from_file = bool(cfg.path) and not cfg.path.startswith("<")
    base = Path(cfg.path).resolve().parent if from_file else Path.cwd()

    output = copy.deepcopy(cfg.output)
    for key in ("models_dir", "logs_dir", "checkpoints_dir"):
        setattr(output, key, str(resolve_path(getattr(output, key), base)))
    if output.registry:
        output.registry = str(resolve_path(output.registry, base))

    plan = TrainingConfig(
        preset=preset_name, config_path=str(Path(cfg.path).resolve()) if from_file else cfg.path,
        expert_name=preset.expert, expert=copy.deepcopy(expert),
        hardware_name=preset.hardware, hardware=copy.deepcopy(hw),
        dataset_name=preset.dataset, dataset=copy.deepcopy(cfg.datasets[preset.dataset]),
        dataset_dir=str(resolve_path(cfg.datasets[preset.dataset].path, base)),
        lora_name=preset.lora, lora=copy.deepcopy(cfg.lora[preset.lora]),
        hyperparameters_name=preset.hyperparameters, output=output,
        **{k: copy.deepcopy(getattr(hp, k)) for k in HYPERPARAMETER_FIELDS},
        sequence_length=preset.sequence_length or min(hw.max_sequence_length, expert.context_window),
        batch_size=preset.batch_size or hw.max_batch_size,
        gradient_accumulation=preset.gradient_accumulation or hw.recommended_gradient_accumulation,
        gradient_checkpointing=preset.gradient_checkpointing,
        precision=_auto_precision(hw) if preset.precision == "auto" else preset.precision,
        packing=preset.packing, device=hw.device,
    )
    plan.expert.base_model = resolve_base_model_path(expert.base_model, base)
    if preset.report_to is not None:
        plan.report_to = list(preset.report_to)
    from .overrides import apply_overrides  # it builds on this module's TrainingConfig

    overridden = apply_overrides(plan, overrides or [])
    plan._derived_from = (plan.dataset.path, plan.dataset_dir)
    plan._overridden = dict(overridden)

    def place(problem: Problem, fields, file_key: str) -> Problem:
        touched = list(dict.fromkeys(overridden[f] for f in fields if f in overridden))
        if touched:  # the override is to blame, not the file
            return dataclasses.replace(problem, key=", ".join(f"--set {k}" for k in touched), file="", line=None)
        return dataclasses.replace(problem, key=file_key, file=cfg.path, line=cfg.line_of(file_key))

    problems = [place(p, (p.key.split("[")[0],), _file_key(plan, cfg, p.key)) for p in _section_problems(plan)]
    if not problems and check_hardware:
        problems = [place(p, fields, p.key) for p, fields in _hardware_checks(plan)]
    if problems:  # one override can break two rules the same way (hardware.device moves device): say it once
        raise ConfigError(list(dict.fromkeys(problems)), title=f"Preset '{preset_name}' cannot run as configured:")
    return plan


def _auto_precision(hw: HardwareProfile) -> str:
    # bf16 first: same range as fp32, so no loss scaling and no fp16 overflow (Qwen is known to
    # overflow in fp16); fp16 only where bf16 is missing.
    return "bf16" if hw.supports_bf16 else "fp16" if hw.supports_fp16 else "fp32"


def _file_key(plan: TrainingConfig, cfg: TrainingFile, plan_key: str) -> str:
    """Where in the file a plan field came from: 'lora.r' → 'lora.minimal.r', 'seed' → 'hyperparameters.X.seed'."""
    head, _, rest = plan_key.partition(".")
    if head in SECTION_OF:
        return _dotted([SECTION_OF[head], getattr(plan, f"{head}_name")]) + "." + rest
    if head == "output":
        return plan_key
    name = head.split("[")[0]
    if name in HYPERPARAMETER_FIELDS and ("presets", plan.preset, name) not in cfg.locations:
        return _dotted(["hyperparameters", plan.hyperparameters_name]) + "." + plan_key
    return _dotted(["presets", plan.preset]) + "." + plan_key


def resolve_path(value: str, base: Path) -> Path:
    """`~` expanded; relative paths taken relative to the config file's folder."""
    try:
        p = Path(value).expanduser()
    except RuntimeError:  # '~user' that does not exist, or no home directory: keep it literal
        p = Path(value)
    # normpath, not resolve(): '../data' reads cleanly in messages without following symlinks
    return Path(os.path.normpath(p if p.is_absolute() else (base / p)))


def resolve_base_model_path(value: str, base: Path) -> str:
    """A base_model that names a folder relative to `base` (the config file's folder), made absolute.

    Hub ids look like relative paths ('Qwen/Qwen2.5-Coder-1.5B'), so a relative value is a path only when it
    says so (./ or ../) or exists under `base`; anything else stays as written (a hub id, a demo model, or a
    folder of the working directory, which transformers also looks in)."""
    text = value.strip()
    if not text or text.startswith("hafs-demo/") or text.startswith("~") or Path(text).is_absolute():
        return value
    explicit = text.startswith(("./", "../", ".\\", "..\\")) or text in (".", "..")
    if explicit or (base / text).exists():
        return str(resolve_path(text, base))
    return value


def _typecheck(obj, prefix: str, problems: list[Problem]) -> None:
    """Check (and normalise in place) every field of dataclass `obj`, nested sections included."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        converted, where, error = coerce_at(value, hints[f.name], [f.name])
        if error:
            problems.append(Problem(error, key=prefix + f.name + "".join(where)))
        elif dataclasses.is_dataclass(value):
            _typecheck(value, f"{prefix}{f.name}.", problems)
        else:
            setattr(obj, f.name, converted)


def _section_problems(plan: TrainingConfig) -> list[Problem]:
    """Types first (a wrong type would break the range checks), then the same ranges the loader checks."""
    problems: list[Problem] = []
    _typecheck(plan, "", problems)
    if problems:
        return problems
    if plan.precision == "auto":
        plan.precision = _auto_precision(plan.hardware)
    hp = HyperparameterSection(**{k: getattr(plan, k) for k in HYPERPARAMETER_FIELDS})
    checks = [("", c) for c in hp.check()]
    for name in ("lora", "dataset", "expert", "hardware", "output"):
        checks += [(f"{name}.", c) for c in getattr(plan, name).check()]
    for name in ("sequence_length", "batch_size", "gradient_accumulation"):
        if getattr(plan, name) <= 0:
            checks.append(("", (name, f"must be > 0, got {getattr(plan, name)}")))
    checks += [("", c) for c in _one_of(plan, "precision", [p for p in PRECISIONS if p != "auto"])]
    checks += [("", c) for c in _one_of(plan, "device", DEVICES)]
    return [Problem(message, key=prefix + key) for prefix, (key, message) in checks]


def hardware_problems(plan: TrainingConfig) -> list[Problem]:
    """The profile's limits, applied to the plan; each message says what to change."""
    return [problem for problem, _ in _hardware_checks(plan)]


def _hardware_checks(plan: TrainingConfig) -> list[tuple[Problem, tuple[str, ...]]]:
    """Each hardware problem with the plan fields that cause it (to blame an override when one did)."""
    hw, p = plan.hardware, _dotted(["presets", plan.preset])
    out = []
    if hw.status != "available":
        out.append((Problem(f"Hardware {hw.name} is unsupported: {hw.reason or 'status = ' + repr(hw.status)}",
                            key=_dotted(["hardware", plan.hardware_name, "status"]),
                            hint="pick a preset on another hardware profile (--list-presets)"),
                    ("hardware.status", "hardware.reason")))
    if plan.batch_size > hw.max_batch_size:
        out.append((Problem(f"batch_size {plan.batch_size} exceeds {plan.hardware_name}'s max_batch_size "
                            f"{hw.max_batch_size}", key=f"{p}.batch_size",
                            hint=f"use batch_size <= {hw.max_batch_size} and raise gradient_accumulation instead"),
                    ("batch_size", "hardware.max_batch_size")))
    if plan.sequence_length > hw.max_sequence_length:
        out.append((Problem(f"sequence_length {plan.sequence_length} exceeds {plan.hardware_name}'s "
                            f"max_sequence_length {hw.max_sequence_length}", key=f"{p}.sequence_length",
                            hint=f"use sequence_length <= {hw.max_sequence_length}, or a profile with more memory"),
                    ("sequence_length", "hardware.max_sequence_length")))
    if plan.sequence_length > plan.expert.context_window:
        out.append((Problem(f"sequence_length {plan.sequence_length} exceeds expert {plan.expert_name}'s "
                            f"context_window {plan.expert.context_window}", key=f"{p}.sequence_length",
                            hint=f"use sequence_length <= {plan.expert.context_window}"),
                    ("sequence_length", "expert.context_window")))
    if plan.lora.r > hw.max_lora_rank:
        out.append((Problem(f"LoRA rank r={plan.lora.r} (lora.{plan.lora_name}) exceeds {plan.hardware_name}'s "
                            f"max_lora_rank {hw.max_lora_rank}", key=f"{p}.lora",
                            hint=f"use a [lora.*] config with r <= {hw.max_lora_rank}"),
                    ("lora.r", "hardware.max_lora_rank")))
    if plan.gradient_checkpointing and not hw.supports_gradient_checkpointing:
        out.append((Problem(f"gradient checkpointing is not supported on {hw.name}",
                            key=f"{p}.gradient_checkpointing", hint="set gradient_checkpointing = false"),
                    ("gradient_checkpointing", "hardware.supports_gradient_checkpointing")))
    for precision in ("bf16", "fp16"):
        if plan.precision == precision and not getattr(hw, f"supports_{precision}"):
            out.append((Problem(f"{precision} is not supported on {hw.name} (supports_{precision} = false)",
                                key=f"{p}.precision", hint='use precision = "auto" (picks what the profile supports)'),
                        ("precision", f"hardware.supports_{precision}")))
    return out
