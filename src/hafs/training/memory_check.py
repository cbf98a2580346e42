"""The memory gate of a plan: its estimate against the profile's budget, before any model loads.

`check_plan` is what the trainer calls (and `check_memory` what --dry-run and the preset ranking
call): it estimates with the run's own settings (memory.estimate_memory), turns gradient
checkpointing on, on the fewest layers that fit, when the plan leaves it to memory and only that
makes it fit, and otherwise refuses with the largest settings that would fit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .distributed import planned_world_size
from .errors import ConfigError, HardwareError
from .memory import ATTN_IMPLS, CPU_ALLOCATORS, MemoryEstimate, estimate_memory, gib
from .memory_fit import FitSuggestions, over_limit_problem, suggestions
from .model_config import load_model_config, target_problems


@dataclass(frozen=True)
class MemoryVerdict:
    """The memory check of one plan: the estimate, the budget, and what to do when it does not fit."""

    estimate: MemoryEstimate
    """The estimate for the settings that will run (gradient checkpointing as decided)."""
    available_gb: float
    """The budget: the profile's available_memory_gb, or less when the device has less."""
    fits: bool
    """The estimate is within the budget."""
    gradient_checkpointing: bool
    """Checkpointing to use: the plan's choice, or decided here when the plan leaves it to memory (None)."""
    suggestions: FitSuggestions | None = None
    """Settings that would fit, when the plan does not."""
    packed_weights: bool = False
    """packed_linear's weight copies: the settings' choice, dropped here when the run would not fit with them."""
    checkpointed_layers: int | None = None
    """With checkpointing decided here: how many decoder layers, the first ones (None: all)."""
    problems: list = field(default_factory=list)
    """Problems that refuse the run (empty with --force or when it fits)."""
    notes: list = field(default_factory=list)
    """Things the user should know (checkpointing turned on, budget lowered to the device's memory)."""

    def render(self) -> str:
        """Breakdown plus the verdict line, for --dry-run."""
        verdict = "fits" if self.fits else "does NOT fit"
        lines = [self.estimate.render(),
                 f"  verdict: {self.estimate.total_gb:.1f} GiB of {gib(self.available_gb)} GiB available: {verdict}"]
        if self.suggestions and not self.fits:
            lines.append(f"  {self.suggestions.hint()}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def estimate_for_plan(plan, model_config: dict | None = None, *, settings=None, caps=None,
                      gradient_checkpointing: bool | None = None, **overrides) -> MemoryEstimate:
    """The estimate for a resolved TrainingConfig.

    `model_config` defaults to load_model_config(base_model) (may raise HardwareError). `settings` (the
    run's RunSettings) supplies device, precision, attention and loss chunk; without it the plan's device
    is used (`auto`: caps.best_device(), else cpu) and attention is sdpa.
    """
    if model_config is None:
        model_config = load_model_config(plan.expert.base_model, plan.expert.trust_remote_code)
    kwargs = _plan_kwargs(plan, settings, caps)
    gc = kwargs.pop("gradient_checkpointing")
    gc = gc if gradient_checkpointing is None else gradient_checkpointing
    return estimate_memory(model_config, **{**kwargs, **overrides}, gradient_checkpointing=bool(gc))


def settings_kwargs(settings) -> dict:
    """estimate_memory arguments that a run's RunSettings (precision.run_settings) decides."""
    device = str(settings.device).split(":")[0]
    autocast = bool(getattr(settings, "autocast_dtype", None))
    attn = getattr(settings, "attn_implementation", "sdpa")
    allocator = getattr(settings, "cpu_allocator", "glibc")
    lean = bool(getattr(settings, "lean_kernels", False))
    return {"device_kind": device, "precision": settings.precision, "attn_impl": attn if attn in ATTN_IMPLS else "sdpa",
                "gradient_checkpointing": bool(getattr(settings, "gradient_checkpointing", False)),
                "checkpointed_layers": getattr(settings, "checkpointed_layers", None),
                "loss_chunk_tokens": getattr(settings, "loss_chunk_size", None), "autocast": autocast,
                "lora_input_cast": not autocast,  # model_loading.prepare_for_training: no fp32 copy under autocast
                "dropout_mask_bytes": 1 if getattr(settings, "fast_dropout", False) else None,
                # Liger's RMSNorm (CUDA) keeps its input as is and an fp32 rstd, as kernels.rms_norm_forward does.
                "lean_kernels": lean, "lean_rms_norm": lean and bool(getattr(settings, "lean_rms_norm", False)
                                                             or getattr(settings, "liger", False)),
                "cpu_allocator": allocator if allocator in CPU_ALLOCATORS else "glibc",
                "packed_weights": bool(getattr(settings, "packed_weights", False)),
                "primitive_cache_entries": getattr(settings, "onednn_cache_capacity", None)}


def _plan_kwargs(plan, settings=None, caps=None, sequence_length: int | None = None) -> dict:
    """estimate_memory arguments for a plan, from its RunSettings when there are some."""
    if settings is not None:
        run = settings_kwargs(settings)
        run["gradient_checkpointing"] = run["gradient_checkpointing"] or bool(plan.gradient_checkpointing)
    else:
        device = plan.device if plan.device != "auto" else (caps.best_device() if caps is not None else "cpu")
        run = {"device_kind": device, "precision": plan.precision,
               "gradient_checkpointing": bool(plan.gradient_checkpointing)}
    shards = planned_world_size(plan) if plan.hardware.distributed == "fsdp" else 1
    return dict(sequence_length=sequence_length or plan.sequence_length, batch_size=plan.batch_size, lora_r=plan.lora.r,
                lora_targets=list(plan.lora.target_modules), lora_dropout=plan.lora.lora_dropout,
                packing=plan.packing, weight_shards=shards, **run)


def check_memory(plan, model_config: dict, *, settings=None, caps=None, force: bool = False,
                 sequence_length: int | None = None) -> MemoryVerdict:
    """Compare the plan's estimate with its profile's available_memory_gb (or the device's, when smaller).

    A plan that leaves gradient_checkpointing unset (None) gets it only when it is needed to fit and the
    profile allows it. Over budget: a Problem naming the largest settings that fit, or a note with --force.
    `sequence_length`: the longest row the run will really have (default: the plan's).
    """
    hw, notes = plan.hardware, []
    kwargs = _plan_kwargs(plan, settings, caps, sequence_length)
    budget = hw.available_memory_gb
    device_gb = caps.device_memory_gb(kwargs["device_kind"]) if caps is not None else 0.0
    if 0 < device_gb < budget:
        notes.append(f"{plan.hardware_name} declares {gib(budget)} GiB but this device has {device_gb:.1f} GiB: "
                     "checking against the device")
        budget = device_gb
    est = estimate_memory(model_config, **kwargs)
    unpack_note = None
    if est.total_gb > budget and kwargs.get("packed_weights"):
        # The packed copies only buy speed (3-5%): the first thing to give up.
        kwargs["packed_weights"] = False
        unpacked = estimate_memory(model_config, **kwargs)
        unpack_note = (f"frozen weights not pre-packed: with the packed copies the run needs ~{est.total_gb:.1f} "
                       f"GiB of {gib(budget)}, without ~{unpacked.total_gb:.1f}")
        est = unpacked
    if est.total_gb > budget and plan.gradient_checkpointing is None and not kwargs["gradient_checkpointing"] \
            and hw.supports_gradient_checkpointing:
        with_gc = estimate_memory(model_config, **{**kwargs, "gradient_checkpointing": True})
        if with_gc.total_gb <= budget:
            if unpack_note:  # checkpointing frees memory: the packed copies may fit again
                repacked = {**kwargs, "packed_weights": True}
                packed_gc = estimate_memory(model_config, **{**repacked, "gradient_checkpointing": True})
                if packed_gc.total_gb <= budget:
                    kwargs, with_gc, unpack_note = repacked, packed_gc, None
            fewest = fewest_checkpointed(model_config, kwargs, budget)
            layers, checked = fewest.settings["layers"], fewest.settings["checkpointed_layers"]
            some = "" if checked == layers else (f" on the first {checked} of {layers} layers (the fewest that fit; "
                                                 f"all {layers}: ~{with_gc.total_gb:.1f} GiB)")
            notes.append(f"gradient checkpointing turned on{some}: without it the run needs ~{est.total_gb:.1f} GiB "
                         f"of {gib(budget)}, with it ~{fewest.total_gb:.1f}")
            est = fewest
    if unpack_note:
        notes.insert(0, unpack_note)
    gc, packed = est.settings["gradient_checkpointing"], est.settings["packed_weights"]
    checked = est.settings["checkpointed_layers"]
    layers = None if not gc or checked >= est.settings["layers"] else checked
    if est.total_gb <= budget:
        return MemoryVerdict(est, budget, True, gc, notes=notes, packed_weights=packed, checkpointed_layers=layers)
    problem = over_limit_problem(est, plan, budget)
    sugg = suggestions(est, budget)
    if force:
        notes.append(problem.message + " (continuing: --force)")
        return MemoryVerdict(est, budget, False, gc, sugg, packed, notes=notes, checkpointed_layers=layers)
    return MemoryVerdict(est, budget, False, gc, sugg, packed, problems=[problem], notes=notes,
                         checkpointed_layers=layers)


def fewest_checkpointed(model_config, kwargs: dict, budget: float) -> MemoryEstimate:
    """The estimate with the fewest checkpointed layers (the first ones) that fits `budget`; call it only
    when checkpointing all layers fits.

    Why not all of them, as other trainers do: every checkpointed layer runs its forward twice, and
    a layer left alone costs only its activations. Given the memory, keeping as many layers as fit
    is the fastest run that fits (transformers' `every_n_layers` only offers every n-th layer).
    """
    def estimate(k: int) -> MemoryEstimate:
        return estimate_memory(model_config, **{**kwargs, "gradient_checkpointing": True, "checkpointed_layers": k})

    lo, hi = 0, estimate(0).settings["layers"]  # estimate(lo) does not fit (0 = no checkpointing), hi fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if estimate(mid).total_gb <= budget else (mid, hi)
    return estimate(hi)


def check_plan(plan, settings=None, *, force: bool = False, log=print, caps=None,
               model_config: dict | None = None) -> MemoryEstimate | None:
    """The trainer's memory gate: estimate, decide checkpointing, refuse when over budget (unless force).

    Sets `settings.gradient_checkpointing` when the plan leaves it to memory and it is needed, and clears
    `settings.packed_weights` when the packed copies would not fit. Returns the
    estimate, or None (with a note) when the model's config.json cannot be read.
    """
    try:
        config = model_config if model_config is not None else load_model_config(
            plan.expert.base_model, plan.expert.trust_remote_code)
        wrong = target_problems(plan, config)
        if wrong:
            raise ConfigError(wrong, title=f"Preset '{plan.preset}' cannot run as configured:")
        verdict = check_memory(plan, config, settings=settings, caps=caps, force=force)
    except HardwareError as exc:
        log(f"note: memory estimate unavailable: {exc.problems[0].message}")
        return None
    for note in verdict.notes:
        log(f"note: {note}")
    if verdict.problems:
        raise HardwareError(verdict.problems, title=f"Preset '{plan.preset}' does not fit in memory:")
    if settings is not None and verdict.gradient_checkpointing:
        settings.gradient_checkpointing = True
        settings.checkpointed_layers = verdict.checkpointed_layers
    if settings is not None and not verdict.packed_weights:
        settings.packed_weights = False
    return verdict.estimate


def relax_for_data(plan, settings, longest: int, estimate=None, *, log=print, caps=None,
                   model_config: dict | None = None):
    """Once the data is tokenized: checkpoint fewer layers when this data's rows cannot be as long as
    sequence_length. Returns the estimate the run goes with.

    check_plan decides before any tokenizing, for rows of sequence_length tokens. Without packing, a
    micro-batch is at most batch_size rows of the longest example (length-grouped batches put the
    longest ones together), and real data is usually far shorter than its limit (the GPU benchmark's
    longest is 1,452 of 2,048 tokens): checkpointing chosen for the limit would recompute layers that
    fit. Only 'auto' checkpointing is relaxed, never an explicit choice, and never turned up.
    """
    from .batching import PAD_MULTIPLE

    width = min(-(-int(longest) // PAD_MULTIPLE) * PAD_MULTIPLE, plan.sequence_length)  # as collate pads rows
    if (settings is None or plan.gradient_checkpointing is not None or plan.packing
            or not getattr(settings, "gradient_checkpointing", False) or not 0 < width < plan.sequence_length):
        return estimate
    try:
        config = model_config if model_config is not None else load_model_config(
            plan.expert.base_model, plan.expert.trust_remote_code)
        probe = copy.copy(settings)
        probe.gradient_checkpointing, probe.checkpointed_layers = False, None
        verdict = check_memory(plan, config, settings=probe, caps=caps, sequence_length=width)
    except HardwareError:
        return estimate
    layers = verdict.estimate.settings["layers"]
    before = getattr(settings, "checkpointed_layers", None) or layers
    after = 0 if not verdict.gradient_checkpointing else verdict.checkpointed_layers or layers
    if not verdict.fits or after >= before:
        return estimate
    now = f"on {after} of {layers} layers instead of {before}" if after else f"off (instead of on {before} layers)"
    log(f"note: this data's longest example has {longest:,} tokens (sequence_length {plan.sequence_length:,}): "
        f"gradient checkpointing {now}, ~{verdict.estimate.total_gb:.1f} GiB of {gib(verdict.available_gb)}")
    settings.gradient_checkpointing = verdict.gradient_checkpointing
    settings.checkpointed_layers = verdict.checkpointed_layers  # None without checkpointing
    return verdict.estimate
