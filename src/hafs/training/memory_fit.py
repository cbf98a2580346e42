"""What fits a memory budget: the largest sequence_length / batch_size, whether checkpointing would, and
the problem a plan over its budget reports. Pure, like memory.py: estimates only, no torch import."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import Problem
from .memory import MemoryEstimate, estimate_memory, gib


def suggestions(estimate: MemoryEstimate, available_memory_gb: float) -> FitSuggestions:
    """The largest settings that fit `available_memory_gb`, varying `estimate`'s inputs."""
    kwargs = {k: v for k, v in estimate.inputs.items() if k not in ("sequence_length", "batch_size")}
    return fit_suggestions(estimate.shape, available_memory_gb=available_memory_gb,
                           sequence_length=estimate.inputs["sequence_length"],
                           batch_size=estimate.inputs["batch_size"], **kwargs)


def over_limit_problem(estimate: MemoryEstimate, plan, available_memory_gb: float | None = None) -> Problem:
    """The problem to report when `estimate` exceeds the plan's budget, with settings that fit."""
    budget = plan.hardware.available_memory_gb if available_memory_gb is None else available_memory_gb
    sugg = suggestions(estimate, budget)
    if not plan.hardware.supports_gradient_checkpointing and sugg.gradient_checkpointing_fits:
        sugg = FitSuggestions(**{**asdict(sugg), "gradient_checkpointing_fits": None})
    hint = sugg.hint()
    world = plan.world_size()
    if world > 1 and estimate.inputs.get("weight_shards", 1) == 1:
        sharded = estimate_memory(estimate.shape, **{**estimate.inputs, "weight_shards": world}).total_gb
        if sharded <= budget:
            hint = (f"distributed = \"fsdp\" in [hardware.{plan.hardware_name}] shards the frozen layers over "
                    f"the {world} workers: ~{sharded:.1f} GiB each; or " + hint)
    return Problem(f"Hardware {plan.hardware.name} is unsupported: training needs about {estimate.total_gb:.1f} "
                   f"GiB, {plan.hardware_name} has {gib(budget)} GiB (sequence_length {plan.sequence_length}, "
                   f"batch_size {plan.batch_size}, {estimate.settings.get('precision')})",
                   key=f"presets.{plan.preset}",
                   file=plan.config_file(), hint=hint)


def fit_suggestions(model_config: dict, *, available_memory_gb: float, sequence_length: int, batch_size: int,
                    gradient_checkpointing: bool, **kwargs) -> FitSuggestions:
    """Largest sequence_length / batch_size that fit `available_memory_gb`, and whether checkpointing would."""
    layers = kwargs.pop("checkpointed_layers", None)

    def total(seq: int, batch: int, gc: bool = gradient_checkpointing, checked: int | None = layers) -> float:
        return estimate_memory(model_config, sequence_length=seq, batch_size=batch, gradient_checkpointing=gc,
                               checkpointed_layers=checked, **kwargs).total_gb

    asked = total(sequence_length, batch_size)
    best_seq = _largest(lambda s: total(s, batch_size) <= available_memory_gb, sequence_length, step=64)
    best_batch = _largest(lambda b: total(sequence_length, b) <= available_memory_gb, batch_size, step=1)
    gc_fits = None
    if not gradient_checkpointing or layers is not None:  # off, or on some layers only: would all of them fit?
        gc_fits = total(sequence_length, batch_size, True, None) <= available_memory_gb
    return FitSuggestions(fits=asked <= available_memory_gb, estimate_gb=asked, available_gb=available_memory_gb,
                          max_sequence_length=best_seq, max_batch_size=best_batch,
                          gradient_checkpointing_fits=gc_fits, sequence_length=sequence_length,
                          batch_size=batch_size)


def _largest(fits, upper: int, step: int) -> int:
    """Largest multiple of `step` in [step, upper] (or `upper` itself) for which fits() holds; 0 if none."""
    if fits(upper):
        return upper
    lo, hi = 0, upper // step  # invariant: lo*step fits (0 = nothing), hi*step does not (or hi == upper//step)
    if not fits(step):
        return 0
    lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step


@dataclass(frozen=True)
class FitSuggestions:
    """Whether a run fits a memory budget, and the nearest settings that would."""

    fits: bool
    """The asked settings fit."""
    estimate_gb: float
    """Estimated total for the asked settings."""
    available_gb: float
    """The budget compared against."""
    max_sequence_length: int
    """Largest sequence_length (multiple of 64) that fits at the asked batch_size; 0: none."""
    max_batch_size: int
    """Largest batch_size that fits at the asked sequence_length; 0: none."""
    gradient_checkpointing_fits: bool | None
    """Whether turning on gradient checkpointing makes the asked settings fit (None: it is already on)."""
    sequence_length: int = 0
    """The asked sequence_length."""
    batch_size: int = 0
    """The asked batch_size."""

    def hint(self) -> str:
        """What to change, in config keys."""
        options = []
        if self.gradient_checkpointing_fits:
            options.append("gradient_checkpointing = true")
        if self.max_batch_size:
            options.append(f"batch_size = {self.max_batch_size} (raise gradient_accumulation to keep the "
                           f"effective batch)")
        if self.max_sequence_length:
            options.append(f"sequence_length = {self.max_sequence_length}")
        if not options:
            return ("even sequence_length = 64 with batch_size = 1 does not fit: use a machine with more memory "
                    "or a smaller model")
        return "fits with " + ", or ".join(options) + " (or --force to try anyway)"
