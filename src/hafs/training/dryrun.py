"""`--dry-run` / `hafs show`: everything hafs can know about a run without loading the model.

Reads the dataset (counts, filters), tokenizes it when a tokenizer is available offline, estimates
memory from the model's config.json and checks the plan against this machine. Problems are
collected, not raised, so the user sees the whole picture at once (nanoGPT prints its derived
numbers before training; we print them before anything heavy is loaded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import DatasetError, HafsError, Problem
from .plan import TrainingConfig, resolve
from .schema import TrainingFile


@dataclass
class DryRunReport:
    """The resolved plan, derived numbers, and every problem found."""

    plan: TrainingConfig
    """The resolved, validated plan."""
    numbers: dict = field(default_factory=dict)
    """Derived figures: samples, steps, tokens per step, ..."""
    dataset: dict = field(default_factory=dict)
    """Per-split summaries."""
    memory: dict | None = None
    """Memory estimate breakdown (GiB), when the model config could be read."""
    memory_text: str = ""
    """Human rendering of the memory estimate."""
    notes: list[str] = field(default_factory=list)
    """Things worth knowing that do not stop the run."""
    problems: list[Problem] = field(default_factory=list)
    """Things that stop the run."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "plan": self.plan.to_dict(), "numbers": self.numbers, "dataset": self.dataset,
                "memory": self.memory, "notes": self.notes,
                "problems": [p.render() for p in self.problems]}

    def render(self) -> str:
        p = self.plan
        lines = [f"Preset {p.preset}  ({p.config_path})",
                 f"  expert      {p.expert_name}: {p.expert.display_name}  base={p.expert.base_model}",
                 f"  hardware    {p.hardware_name}: {p.hardware.name}  device={p.device}  precision={p.precision}",
                 f"  dataset     {p.dataset_name}: {p.dataset_dir}",
                 f"  lora        {p.lora_name}: r={p.lora.r} alpha={p.lora.lora_alpha:g} "
                 f"dropout={p.lora.lora_dropout:g} targets={','.join(p.lora.target_modules)}",
                 f"  optimiser   {p.hyperparameters_name}: lr={p.learning_rate:g} {p.lr_scheduler} "
                 f"warmup={p.warmup_steps or p.warmup_ratio} wd={p.weight_decay:g} "
                 + (f"max_steps={p.max_steps}" if p.max_steps else f"epochs={p.num_epochs:g}"),
                 f"  shape       sequence_length={p.sequence_length} batch_size={p.batch_size} "
                 f"gradient_accumulation={p.gradient_accumulation} packing={'on' if p.packing else 'off'} "
                 f"gradient_checkpointing={'auto' if p.gradient_checkpointing is None else p.gradient_checkpointing}"]
        for _split, summary in self.dataset.items():
            lines.append(f"  data        {summary}")
        if self.numbers:
            lines.append("Derived:")
            lines += [f"  {k:<28} {v}" for k, v in self.numbers.items()]
        if self.memory_text:
            lines.append("Memory estimate:")
            lines += ["  " + line for line in self.memory_text.splitlines()]
        lines += [f"note: {n}" for n in self.notes if n not in self.memory_text]  # the verdict printed its own
        if self.problems:
            lines.append(f"Cannot run ({len(self.problems)} problem{'s' if len(self.problems) > 1 else ''}):")
            lines += ["  - " + pr.render().replace("\n", "\n    ") for pr in self.problems]
        else:
            lines.append("Ready to train.")
        return "\n".join(lines)


def dry_run(cfg: TrainingFile, preset: str, overrides=None, *, force: bool = False, caps=None,
            register: bool | None = None) -> DryRunReport:
    """Resolve `preset` and gather every figure and problem without loading model weights."""
    from .precision import run_settings

    plan = resolve(cfg, preset, overrides or [])  # config errors are fatal: nothing below is meaningful
    report = DryRunReport(plan=plan)
    world = plan.world_size()
    report.numbers["effective batch"] = (f"{plan.effective_batch(world)} "
                                         f"({plan.batch_size} x {plan.gradient_accumulation}"
                                         + (f" x {world} workers)" if world > 1 else ")"))
    report.numbers["max tokens per step"] = plan.max_tokens_per_step(world)
    caps = caps or _detect()
    _preflight(plan, report, caps, register)
    lengths = _dataset(plan, report)
    tokens = _steps(plan, report, lengths) if lengths is not None else None
    settings = run_settings(plan, caps)  # what the run would settle on this machine, for memory and time alike
    verdict = _memory(plan, report, force, caps, settings)
    if tokens is not None:
        _time(plan, report, tokens, caps, settings, None if verdict is None else verdict.gradient_checkpointing)
    report.problems = plan.blame_overrides(report.problems)
    return report


def _detect():
    from .hardware import detect

    return detect()


def _preflight(plan, report, caps, register: bool | None = None) -> None:
    from .preflight import preflight

    result = preflight(plan, caps, hub=True, register=register)  # as the run would (--no-register: no registry)
    report.problems += result.problems
    report.notes += result.notes


def _dataset(plan, report):
    from .data import read_split

    raw = {}
    for split in ("train", "val", "test"):
        try:
            r = read_split(plan, split)
        except HafsError as exc:
            report.problems += exc.problems
            return None
        if r is None:
            report.notes.append(f"no {split} split ({getattr(plan.dataset, split + '_split')}): "
                                + ("val loss during training and " if split == "val" else "")
                                + "evaluation on it will be skipped")
            continue
        raw[split] = r
        report.dataset[split] = r.stats.summary()
    report.numbers["training samples"] = len(raw["train"].rows)
    return _token_lengths(plan, raw["train"], report)


def _token_lengths(plan, train, report):
    """Exact token counts with the base model's tokenizer when it is available offline, else an estimate."""
    import numpy as np

    try:
        from transformers import AutoTokenizer

        from .model_loading import ensure_pad_token, resolve_base_model
        from .tokenize import tokenize_split

        # Local files only: a dry run never downloads; the hub cache or a local folder is enough.
        tok = AutoTokenizer.from_pretrained(resolve_base_model(plan.expert.base_model), local_files_only=True,
                                            trust_remote_code=plan.expert.trust_remote_code)
        ensure_pad_token(tok)
        lengths = tokenize_split(train, plan, tok).lengths
        report.numbers["training tokens"] = int(lengths.sum())
        return lengths
    except DatasetError as exc:  # the tokenizer is there and the data is at fault: the run would refuse it too
        report.problems += exc.problems
        return None
    except Exception as exc:  # no tokenizer offline: estimate from characters (~3.5 chars per token)
        report.notes.append(f"the base model's tokenizer is not available offline ({type(exc).__name__}): "
                            "token counts and steps are estimates (~3.5 characters per token)")
        chars = np.array([len(s.instruction) + len(s.input) + len(s.output) + len(s.text) + 200
                          + sum(len(str(m.get("content", ""))) for m in (s.messages or [])) for s in train.rows])
        lengths = np.minimum(np.ceil(chars / 3.5).astype(np.int64) + 1, plan.sequence_length)
        report.numbers["training tokens (est.)"] = int(lengths.sum())
        return lengths


def _steps(plan, report, lengths) -> int:
    """Steps and tokens per step into the report; returns the tokens the run trains (epochs or max_steps)."""
    from .batching import plan_batches

    micro = len(plan_batches(lengths, batch_size=plan.batch_size, sequence_length=plan.sequence_length,
                             packing=plan.packing, seed=plan.seed, epoch=0))
    micro = math.ceil(micro / plan.world_size())
    total = plan.total_steps(micro)
    per_epoch = plan.steps_per_epoch(micro)
    report.numbers["micro-batches per epoch"] = micro
    report.numbers["optimizer steps"] = total
    report.numbers["warmup steps"] = plan.resolved_warmup(total)
    report.numbers["tokens per step (avg)"] = int(lengths.sum() / per_epoch)
    if plan.save_steps:
        report.numbers["checkpoints"] = f"every {plan.save_steps} steps, keep {plan.save_total_limit}"
    return int(lengths.sum() * total / per_epoch)


def _time(plan, report, tokens: int, caps, settings, checkpointing: bool | None) -> None:
    """Training time from the newest earlier run of this base model on this device (earlier_runs), with
    gradient checkpointing as the memory check decided it (None: unknown)."""
    from .earlier_runs import describe_estimate, find_earlier_run

    if settings.device.split(":")[0] not in caps.device_kinds():  # a GPU plan dry-run on a laptop: no evidence
        return
    # The device line exactly as a run records it in metadata.json (outputs.build_metadata's hardware info).
    run = find_earlier_run(plan.output.models_dir, base_model=plan.expert.base_model,
                           device=caps.summary(settings)["device"], precision=settings.precision,
                           world_size=plan.world_size(), checkpointing=checkpointing)
    if run is not None:
        report.numbers["training time (est.)"] = describe_estimate(tokens, run)


def _memory(plan, report, force: bool, caps, settings):
    """The memory estimate and its verdict into the report; returns the verdict (None without a model config)."""
    from .memory_check import check_memory
    from .model_config import load_model_config, target_problems

    try:
        config = load_model_config(plan.expert.base_model, plan.expert.trust_remote_code)
    except HafsError as exc:
        from .datacache import CacheDirError

        if isinstance(exc, CacheDirError):  # the demo model cannot be built where it must be stored: no run
            report.problems += exc.problems
        else:
            report.notes.append("memory estimate unavailable: " + exc.problems[0].message)
        return None
    report.problems += target_problems(plan, config)
    try:
        verdict = check_memory(plan, config, settings=settings, caps=caps, force=force)
    except HafsError as exc:  # a config.json the estimate cannot read: the run stops the same way
        report.problems += exc.problems
        return None
    report.memory, report.memory_text = verdict.estimate.to_dict(), verdict.render()
    report.problems += verdict.problems
    report.notes += verdict.notes
    return verdict
