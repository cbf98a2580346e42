"""Typed sections of `config/training.toml`: one dataclass per table, a one-line docstring per key.

The TOML stays pure data; these classes say what each key means, its type, its default and its
valid range. `loader.py` turns raw tables into these (checking types generically from the
annotations); each class's `check()` adds the range and enum rules, returning (key, message) pairs
so the loader can report every problem at once with its full key path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .keypaths import nearest_line, split_dotted
from .templates import TEMPLATE_FIELDS, template_problems

DEVICES = ("cpu", "cuda", "mps", "auto")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
EVAL_STRATEGIES = ("no", "steps", "epoch")
BIAS_MODES = ("none", "all", "lora_only")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LONG_SAMPLE_POLICIES = ("truncate", "drop")
BAD_ROW_POLICIES = ("error", "skip")
REPORT_BACKENDS = ("tensorboard", "wandb", "mlflow")
DISTRIBUTED = ("ddp", "fsdp")
NAME_FIELDS = ("name", "role", "base_short", "date", "expert", "preset")

Checks = list[tuple[str, str]]


def _positive(obj, *names: str) -> Checks:
    return [(n, f"must be > 0, got {getattr(obj, n)}") for n in names
            if getattr(obj, n) is not None and getattr(obj, n) <= 0]


def _non_negative(obj, *names: str) -> Checks:
    return [(n, f"must be >= 0, got {getattr(obj, n)}") for n in names
            if getattr(obj, n) is not None and getattr(obj, n) < 0]


def _one_of(obj, name: str, allowed) -> Checks:
    value = getattr(obj, name)
    if value is None or value in allowed:
        return []
    from .errors import did_you_mean

    return [(name, f"unknown value '{value}'{did_you_mean(value, allowed)}; "
                   f"choose one of: {', '.join(allowed)}")]


@dataclass
class MetadataSection:
    """`[metadata]`: about the config file itself."""

    schema_version: int = 1
    """Version of this file's layout; hafs reads version 1."""
    updated: str = ""
    """Free-form date the file was last edited."""

    def check(self) -> Checks:
        return [] if self.schema_version == 1 else [
            ("schema_version", f"hafs reads schema_version 1, this file says {self.schema_version}")]


@dataclass
class HardwareProfile:
    """`[hardware.NAME]`: what a machine can do; presets are checked against it."""

    name: str
    """Human-readable name, shown in listings and metadata."""
    device: str = "auto"
    """Torch device kind: cpu, cuda, mps, or auto (pick what this machine has)."""
    available_memory_gb: float = 8.0
    """Memory training may use, in GiB (GPU memory, unified memory on a Mac, RAM on CPU)."""
    max_batch_size: int = 1
    """Largest per-device batch size a preset may ask for."""
    max_sequence_length: int = 1024
    """Longest sequence_length a preset may ask for."""
    supports_fp16: bool = False
    """Whether fp16 mixed precision works on this device."""
    supports_bf16: bool = False
    """Whether bf16 works on this device (preferred over fp16: no overflow)."""
    supports_gradient_checkpointing: bool = True
    """Whether gradient checkpointing may be used (off on MPS with LoRA)."""
    max_lora_rank: int = 64
    """Largest LoRA rank r a preset may use."""
    recommended_gradient_accumulation: int = 1
    """Gradient accumulation used when a preset does not set one."""
    status: str = "available"
    """'available' to allow training; anything else refuses presets on this profile with `reason`."""
    reason: str = ""
    """Why the profile is not available (shown when a preset is refused)."""
    notes: str = ""
    """Free-form notes."""
    python_path: str = ""
    """Python interpreter to use on that machine (informational; shown by --list-hardware)."""
    cost_per_hour: float | None = None
    """Rental price in USD per hour, used for cost estimates of cloud runs."""
    num_gpus: int = 1
    """GPUs per node; more than 1 launches one worker per GPU (torchrun)."""
    num_nodes: int = 1
    """Machines in a multi-node run."""
    distributed: str = "ddp"
    """Multi-GPU strategy: ddp (a whole model per GPU) or fsdp (frozen layers sharded over the GPUs)."""
    accelerator: str = ""
    """Cloud accelerator name for `hafs launch` (e.g. RTX4090, A100); derived from `name` when empty."""

    def check(self) -> Checks:
        return (_one_of(self, "device", DEVICES) + _one_of(self, "distributed", DISTRIBUTED)
                + _positive(self, "available_memory_gb", "max_batch_size", "max_sequence_length",
                            "max_lora_rank", "recommended_gradient_accumulation", "num_gpus", "num_nodes")
                + _non_negative(self, "cost_per_hour"))


@dataclass
class ExpertSection:
    """`[experts.NAME]`: a model to specialise: base model, role and prompt template."""

    display_name: str
    """Human-readable name, e.g. 'Oracle: Rauru Assembler'."""
    base_model: str
    """Hub id, hafs-demo/NAME, or a local model folder (relative: to this file's folder if it is there or starts ./)."""
    role: str = "general"
    """Short role tag used in output names (asm, debug, ...)."""
    group: str = ""
    """Group the expert belongs to (e.g. rom-tooling)."""
    context_window: int = 4096
    """The base model's usable context length; sequence_length may not exceed it."""
    specialization: str = ""
    """What the expert is good at; used as the default system prompt."""
    prompt_template: str = ""
    """Format string with {context} {instruction} {input_section} {output}; empty = built-in default."""
    trust_remote_code: bool = False
    """Run code shipped with the model repository. Off unless you trust the repository."""
    system_prompt: str = ""
    """System prompt for chat-format rows and exports; defaults to the specialization."""

    def check(self) -> Checks:
        out = _positive(self, "context_window")
        if not self.base_model.strip():
            out.append(("base_model", "must name a hub model id or a local directory"))
        out += _demo_model_problems(self.base_model)
        if self.prompt_template:
            # Without {instruction} every sample's instruction is silently dropped from what the model sees.
            out += template_problems("prompt_template", self.prompt_template, TEMPLATE_FIELDS, output_last=True,
                                     required={"instruction": "every sample's instruction would be left out of "
                                                              "the prompt"})
        return out


def _demo_model_problems(base_model: str) -> Checks:
    """An unknown `hafs-demo/NAME`: refused here, not minutes later when the run builds it."""
    from .demo import unknown_demo_model

    unknown = unknown_demo_model(base_model)
    return [("base_model", "; ".join(unknown))] if unknown else []


@dataclass
class LoraSection:
    """`[lora.NAME]`: the LoRA adapter's shape."""

    r: int
    """Rank of the low-rank update; more is more capacity and memory."""
    lora_alpha: float = 16
    """Scaling numerator: the update is scaled by lora_alpha / r."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear layers that get adapters."""
    lora_dropout: float = 0.05
    """Dropout on the adapter input, in [0, 1)."""
    bias: str = "none"
    """Which biases train: none, all, or lora_only."""

    def check(self) -> Checks:
        out = _positive(self, "r", "lora_alpha") + _one_of(self, "bias", BIAS_MODES)
        if not 0 <= self.lora_dropout < 1:
            out.append(("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}"))
        if not self.target_modules:
            out.append(("target_modules", "must name at least one module"))
        out += [(f"target_modules[{i}]", "must not be empty") for i, m in enumerate(self.target_modules)
                if not m.strip()]
        return out


@dataclass
class HyperparameterSection:
    """`[hyperparameters.NAME]`: optimisation settings; every key is optional."""

    num_epochs: float = 1
    """Passes over the training split (ignored when max_steps is set)."""
    learning_rate: float = 2e-4
    """Peak learning rate of AdamW."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides num_epochs)."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to learning_rate."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of total steps (used when warmup_steps is 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    lr_scheduler: str = "linear"
    """Schedule after warm-up: linear, cosine, constant, constant_with_warmup, cosine_with_restarts, polynomial."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    logging_steps: int = 10
    """Log train loss every this many optimizer steps."""
    save_steps: int = 0
    """Write a resumable checkpoint every this many optimizer steps (0: none during the run; a stop by Ctrl-C
    or SIGTERM still saves one, and the finished model is saved either way)."""
    save_total_limit: int = 2
    """Checkpoints kept per run; older ones are deleted once a newer one is complete."""
    eval_strategy: str = "no"
    """When to compute val loss during training: no, steps (every eval_steps) or epoch."""
    eval_steps: int | None = None
    """Optimizer steps between evaluations with eval_strategy = "steps" (default: logging_steps)."""
    seed: int = 42
    """Seed for data order, dropout and adapter initialisation."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers: any of tensorboard, wandb, mlflow."""

    def check(self) -> Checks:
        out = (_positive(self, "num_epochs", "learning_rate", "max_steps", "logging_steps",
                         "eval_steps", "save_total_limit")
               + _non_negative(self, "warmup_steps", "weight_decay", "max_grad_norm", "save_steps")
               + _one_of(self, "lr_scheduler", SCHEDULERS) + _one_of(self, "eval_strategy", EVAL_STRATEGIES))
        if not 0 <= self.warmup_ratio < 1:
            out.append(("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"))
        return out + _trackers(self.report_to)


def _trackers(report_to: list[str] | None) -> Checks:
    return [(f"report_to[{i}]", m) for i, backend in enumerate(report_to or [])
            for _, m in _one_of(_Value(backend), "v", REPORT_BACKENDS)]


@dataclass
class _Value:
    """Wraps one list item so `_one_of` can check it."""

    v: object


@dataclass
class DatasetSection:
    """`[datasets.NAME]`: a directory of JSONL splits and how to filter them."""

    path: str
    """Directory holding the splits; `~` is expanded, relative paths are relative to the config file."""
    description: str = ""
    """Free-form description."""
    train_split: str = "train.jsonl"
    """Training split file name inside `path`."""
    val_split: str = "val.jsonl"
    """Validation split (optional file: evaluation is skipped with a notice when missing)."""
    test_split: str = "test.jsonl"
    """Test split (optional file), used by evaluation after training."""
    quality_threshold: float | None = None
    """Drop rows whose quality_score is below this (rows without a score are kept)."""
    domains: list[str] = field(default_factory=list)
    """Keep only rows whose domain is listed (empty: all; rows without a domain are kept)."""
    notes: str = ""
    """Free-form notes."""
    on_bad_rows: str = "error"
    """What to do with invalid rows: error (list them) or skip (count and report)."""
    long_samples: str = "truncate"
    """Samples over sequence_length: truncate the response, or drop the sample."""

    def check(self) -> Checks:
        out = _one_of(self, "on_bad_rows", BAD_ROW_POLICIES) + _one_of(self, "long_samples", LONG_SAMPLE_POLICIES)
        if not self.path.strip():
            out.append(("path", "must name the folder holding the splits"))
        if self.quality_threshold is not None and not 0 <= self.quality_threshold <= 1:
            out.append(("quality_threshold", f"must be in [0, 1], got {self.quality_threshold}"))
        if not self.train_split:
            out.append(("train_split", "must name a file"))
        return out


@dataclass
class PresetSection:
    """`[presets.NAME]`: one trainable combination; unset values come from the hardware profile."""

    expert: str
    """Name of an [experts.*] table."""
    hardware: str
    """Name of a [hardware.*] table."""
    dataset: str
    """Name of a [datasets.*] table."""
    lora: str
    """Name of a [lora.*] table."""
    hyperparameters: str = "default"
    """Name of a [hyperparameters.*] table."""
    sequence_length: int | None = None
    """Max tokens per sample (default: the profile's max_sequence_length, capped by the context window)."""
    batch_size: int | None = None
    """Samples per device per step (default: the profile's max_batch_size)."""
    gradient_accumulation: int | None = None
    """Micro-batches per optimizer step (default: the profile's recommended_gradient_accumulation)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations to save memory (default: only if the memory estimate needs it)."""
    precision: str = "auto"
    """auto (bf16 > fp16 > fp32 by what the profile supports), bf16, fp16 or fp32."""
    packing: bool = True
    """Pack several samples per row without cross-attention between them (faster, same loss)."""
    report_to: list[str] | None = None
    """Experiment trackers for this preset (overrides the hyperparameter preset's)."""
    description: str = ""
    """Free-form description shown by --list-presets."""

    def check(self) -> Checks:
        return (_positive(self, "sequence_length", "batch_size", "gradient_accumulation")
                + _one_of(self, "precision", PRECISIONS) + _trackers(self.report_to))


@dataclass
class OutputMetadataFlags:
    """`[output.metadata]`: which optional sections metadata.json carries."""

    include_dataset_stats: bool = True
    """Kept/dropped counts, token counts and file hashes of the dataset."""
    include_training_duration: bool = True
    """Wall-clock duration of training."""
    include_hardware_info: bool = True
    """Hardware profile and detected device."""
    include_hyperparameters: bool = True
    """The full resolved training configuration."""
    include_git_commit: bool = True
    """The git commit of the working directory, when it is a repository."""


@dataclass
class OutputSection:
    """`[output]`: where runs go and how model directories are named."""

    models_dir: str = "models"
    """Directory receiving one sub-directory per trained model (relative: to the config file)."""
    logs_dir: str = "logs"
    """Directory for training logs and tracker files."""
    checkpoints_dir: str = "checkpoints"
    """Directory for resumable checkpoints, one sub-directory per run."""
    name_template: str = "{expert}-{base_short}-{date}"
    """Model directory name; placeholders: {name} {role} {base_short} {date} {expert} {preset}."""
    date_format: str = "%Y%m%d"
    """strftime format of {date}."""
    registry: str = ""
    """Model registry TOML to update after training (e.g. ~/.context/models/registry.toml); empty: off."""
    metadata: OutputMetadataFlags = field(default_factory=OutputMetadataFlags)
    """Which optional sections metadata.json includes."""

    def check(self) -> Checks:
        if not self.name_template.strip():
            return [("name_template", "must not be empty")]
        out = template_problems("name_template", self.name_template, NAME_FIELDS)
        if any(sep in self.name_template for sep in "/\\"):
            out.append(("name_template", "must be a single folder name (no '/' or '\\')"))
        for key in ("models_dir", "logs_dir", "checkpoints_dir"):
            if not getattr(self, key).strip():
                out.append((key, "must name a directory"))
        return out


@dataclass
class TrainingFile:
    """A whole validated `training.toml`: every table, typed."""

    path: str
    """The file it was read from ('' for inline text)."""
    metadata: MetadataSection = field(default_factory=MetadataSection)
    hardware: dict[str, HardwareProfile] = field(default_factory=dict)
    experts: dict[str, ExpertSection] = field(default_factory=dict)
    lora: dict[str, LoraSection] = field(default_factory=dict)
    hyperparameters: dict[str, HyperparameterSection] = field(default_factory=dict)
    datasets: dict[str, DatasetSection] = field(default_factory=dict)
    presets: dict[str, PresetSection] = field(default_factory=dict)
    output: OutputSection = field(default_factory=OutputSection)
    tuning: dict[str, dict] = field(default_factory=dict)
    """`[tuning.NAME]` search spaces for `hafs tune` (validated by tune.py)."""
    locations: dict[tuple[str, ...], int] = field(default_factory=dict, repr=False, compare=False)
    """Line of each key path in the file (`("presets", "x", "lora")` → 12), for located messages."""

    def line_of(self, keypath) -> int | None:
        """Line of `keypath` (list, tuple or dotted string), else of its nearest enclosing table."""
        if isinstance(keypath, str):
            keypath = split_dotted(keypath)
        return nearest_line(self.locations, keypath)


# Named tables of the file: section name → class of each entry.
NAMED_TABLES = {
    "hardware": HardwareProfile,
    "experts": ExpertSection,
    "lora": LoraSection,
    "hyperparameters": HyperparameterSection,
    "datasets": DatasetSection,
    "presets": PresetSection,
}
SINGLE_TABLES = {"metadata": MetadataSection, "output": OutputSection}
