"""What a run prints: the header of derived numbers before training, and the progress lines during it."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .precision import RunSettings

if TYPE_CHECKING:
    from .engine import TrainState


class ProgressPrinter:
    """step/total, loss, tokens/s and ETA: one `\\r`-updated line on a terminal, log lines otherwise."""

    def __init__(self, total_steps: int, logging_steps: int = 10, stream=None, tty: bool | None = None):
        self.total, self.logging_steps = total_steps, max(1, logging_steps)
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._open = False

    def line(self, state: TrainState, metrics: dict, seconds: float) -> str:
        done = max(state.step - getattr(self, "_first_step", state.step - 1), 1)
        eta = (state.total_steps - state.step) * seconds / done
        return (f"step {state.step}/{state.total_steps} | epoch {metrics['epoch']:.2f} | loss {metrics['loss']:.4f} | "
                f"lr {metrics['lr']:.2e} | {metrics['tokens_per_second']:,.0f} tok/s | "
                f"elapsed {_clock(state.elapsed_seconds)} | ETA {_clock(eta)}")

    def update(self, state: TrainState, metrics: dict, seconds: float) -> None:
        """Every step: rewrite the terminal line (no output when not on a terminal)."""
        if not hasattr(self, "_first_step"):
            self._first_step = state.step - 1
        if self.tty:
            self.stream.write("\r\033[K" + self.line(state, metrics, seconds))
            self.stream.flush()
            self._open = True

    def log(self, state: TrainState, metrics: dict, seconds: float) -> None:
        """Every logging_steps: a permanent line (loss averaged over the window)."""
        self.note(self.line(state, metrics, seconds))

    def note(self, text: str) -> None:
        if self._open:
            self.stream.write("\r\033[K")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def print_plan(plan, settings: RunSettings, prepared, total_steps: int, estimate=None, log=print, model=None) -> None:
    """The derived numbers, before training starts (nanoGPT style)."""
    train = prepared.train
    log(f"Run settings: {settings.describe()}")
    for note in settings.notes:
        log(f"note: {note}")
    stats = train.stats
    log(f"Data: {len(train)} training samples, {stats.tokens:,} tokens ({stats.response_tokens:,} trained on)")
    end_to_end = ", laid end to end without padding" if settings.padding_free else ""
    shape = (f"{plan.batch_size} rows of up to {plan.sequence_length} packed tokens{end_to_end}" if settings.packing
             else f"{plan.batch_size} samples (length-grouped{end_to_end})")
    log(f"Batch: {shape} x {plan.gradient_accumulation} accumulation = "
        f"{plan.effective_batch()} per optimizer step; {total_steps} steps, "
        f"warm-up {plan.resolved_warmup(total_steps)}, lr {plan.learning_rate:g} ({plan.lr_scheduler})")
    if model is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        every = sum(p.numel() for p in model.parameters())
        log(f"Parameters: {trainable:,} trainable of {every:,} ({100 * trainable / max(every, 1):.2f}%)")
    if estimate is not None and hasattr(estimate, "total_gb"):
        log(f"Memory estimate: {estimate.total_gb:.2f} GiB")


def library_versions() -> dict:
    """Versions of the libraries that shape the result (for metadata.json)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("hafs", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out
