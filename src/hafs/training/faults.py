"""What can stop a run, turned into messages that say what to do: signals, NaN loss, OOM, full disk.

The recipe wraps its training loop in `SignalGuard` (a first Ctrl-C / SIGTERM asks the loop to stop
at the next optimizer step so a checkpoint can be saved; a second one aborts) and passes anything
the loop raises through `translate`, which maps environment failures onto `TrainingError`s and lets
bugs through unchanged. Outside the loop (model loading, the first evaluation, other commands) the CLI's
`terminate_as_interrupt` makes SIGTERM unwind like Ctrl-C, so it too ends with a message.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from .errors import HafsError, Problem, TrainingError

DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO)
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory",
               "failed to allocate memory")


class Interrupted(TrainingError):
    """The run was stopped by a signal after saving a checkpoint; exit status 128 + signal number."""

    kind = "interrupted"

    def __init__(self, problems, *, exit_code: int = 130, title: str = ""):
        super().__init__(problems, title=title)
        self.exit_code = exit_code


class SignalGuard:
    """Turn the first SIGINT/SIGTERM into a stop request the loop polls; the second one aborts.

    Outside the main thread (where handlers cannot be installed) it does nothing.
    """

    entered = 0
    """How many guards this process has entered: the CLI compares it before and after a command to tell
    a stop before training began (nothing saved) from one after (checkpoints, maybe the model)."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM), log=None):
        self.signals = tuple(signals)
        self.signal: int | None = None
        self._previous: dict[int, object] = {}
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))

    @property
    def stopped(self) -> bool:
        """A stop was requested."""
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        """Conventional shell status for the signal received (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(self.signal) if self.signal is not None else 0

    def should_stop(self) -> bool:
        """Polled by the training loop at each optimizer step."""
        return self.stopped

    def __enter__(self) -> SignalGuard:
        SignalGuard.entered += 1
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            self._log(f"\nReceived {name}: stopping after the current step and saving a checkpoint "
                      f"(send {name} again to abort without saving).")
            return
        # Second signal: give the previous handlers back, so a third one is not caught at all.
        self._restore()
        self._log(f"\nReceived {name} again: aborting.")
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


class Stopped(KeyboardInterrupt):
    """A signal arrived after the last optimizer step, before the model was saved."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopOnSignal:
    """SIGINT / SIGTERM handlers for the time between the last step and the saved model.

    Once armed, the first signal raises `Stopped` wherever the run is (the final evaluation can take
    minutes; waiting for it would not be a stop), except inside `deferred()`, which finishes first.
    Unarmed or disarmed, signals act as Python's defaults would. Outside the main thread: no-op.
    """

    def __init__(self, log):
        self._log, self._armed, self._deferring, self._pending = log, False, False, None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def arm(self) -> None:
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    @contextlib.contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending is not None:
            self._armed = False
            self._log(f"\nReceived {signal.Signals(self._pending).name} while the model was being moved into "
                      "place: it is complete; finishing.")

    def _handle(self, signum, frame) -> None:
        if self._armed and self._deferring:
            self._pending = signum
            return
        if self._armed:
            self._armed = False  # a second signal during the checkpoint save aborts it
            self._log(f"\nReceived {signal.Signals(signum).name} after training: saving a checkpoint of the last "
                      "step instead of the model.")
            raise Stopped(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM where no run has handlers of its own (loading the model, the first evaluation, other commands).

    Python's default for SIGTERM ends the process at once: exit 143, no message, no `finally`. Raised like
    SIGINT's KeyboardInterrupt instead, it unwinds the same way and the CLI says what was (not) saved.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def terminate_as_interrupt():
    """While inside, SIGTERM raises `Terminated` (in the main thread; a SIGTERM the parent ignores stays ignored)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) in (signal.SIG_IGN, None):
        yield
        return

    def handle(signum, frame):
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _invocation(argv0: str | None = None) -> list[str]:
    """How the user started this run, so the printed command works where they typed it: `hafs train`
    for the console script (also when torchrun re-ran it as a module), `python PATH/train.py` as typed,
    else (the Python API, tests) the project's `python scripts/train.py`."""
    argv0 = sys.argv[0] if argv0 is None and sys.argv else argv0 or ""
    name = Path(argv0).name
    ours = Path(argv0).resolve().parent == Path(__file__).resolve().parent  # a module of this package
    if name in ("hafs", "hafs.exe") or ours:
        return ["hafs", "train"]
    if name == "train.py" and Path(argv0).is_file():
        return ["python", argv0]
    return ["python", "scripts/train.py"]


def resume_command(plan, overrides=(), resume: str = "auto", flags=()) -> str:
    """The command that continues this run (with the same --config, --set and `run_flags` options).

    `resume`: the --resume value; the run folder when its checkpoints were rescued beside [output]
    checkpoints_dir (`auto` finds them too, but the folder says where they went).
    """
    return train_command(plan.preset, getattr(plan, "config_path", ""), overrides, resume, flags)


def train_command(preset: str, config: str | None = "", overrides=(), resume: str | None = None, flags=()) -> str:
    """The command that trains `preset` with this --config (left out when it is the default), --set options
    and `flags` (see run_flags)."""
    parts = [*_invocation(), preset]
    if config and not config.startswith("<"):
        default = (Path.cwd() / "config" / "training.toml").resolve()
        if Path(config).resolve() != default:
            parts += ["--config", config]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join([*parts, *flags, *(["--resume", resume] if resume else [])])


def run_flags(opts) -> list[str]:
    """--force, --no-eval, --register / --no-register as given, for a printed command to repeat: without
    --force the memory check refuses the run it let through. `opts`: the CLI's args or recipe.RunOptions
    (same names)."""
    return ((["--force"] if opts.force else []) + ([] if opts.evaluate else ["--no-eval"])
            + {True: ["--register"], False: ["--no-register"]}.get(opts.register, []))


def interrupted(plan, state, path: Path | None, signum: int | None, overrides=(), resume: str = "auto",
                flags=()) -> Interrupted:
    """The error that ends a run stopped by a signal, after its checkpoint was saved (or failed to be)."""
    step = int(getattr(state, "step", 0))
    saved = f"checkpoint saved to {path}" if path else "no checkpoint saved, see the warning above"
    code = 128 + int(signum) if signum else 130
    return Interrupted([Problem(f"Interrupted at step {step} ({saved}). Resume with: "
                                f"{resume_command(plan, overrides, resume, flags)}")], exit_code=code)


# --------------------------------------------------------------------------- out of memory


def is_oom(exc: BaseException) -> bool:
    """True for CUDA / MPS / CPU allocation failures, whatever class torch raised them as."""
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(marker in text for marker in OOM_MARKERS)
    return False


def translate_oom(exc: BaseException, plan, estimate=None, step: int | None = None) -> TrainingError | None:
    """A TrainingError with the settings in use and smaller ones to try; None when `exc` is no OOM."""
    if not is_oom(exc):
        return None
    where = f" at step {step}" if step is not None else ""
    device = _oom_device(exc, plan)
    checkpointing = _checkpointing(plan, estimate)
    used = (f"batch_size={plan.batch_size}, gradient_accumulation={plan.gradient_accumulation}, "
            f"sequence_length={plan.sequence_length}, gradient_checkpointing="
            f"{'auto' if checkpointing is None else str(checkpointing).lower()}, "
            f"precision={plan.precision}, lora.r={plan.lora.r}")
    if estimate is not None and getattr(estimate, "total_gb", None) is not None:
        used += (f" (estimated {estimate.total_gb:.1f} GiB of the profile's "
                 f"{plan.hardware.available_memory_gb:g} GiB)")
    problems = [Problem(f"settings in use: {used}", key=f"presets.{plan.preset}")]
    problems += [Problem(f"try: {text}") for text in oom_suggestions(plan, estimate)]
    problems.append(Problem("completed checkpoints are intact; gradient_checkpointing and precision may "
                            "change on --resume, batch and sequence settings need a new run (or --force)"))
    return TrainingError(problems, title=f"Training ran out of memory ({device}){where}:")


def _oom_device(exc: BaseException, plan) -> str:
    """Which memory ran out, from the message (the plan's device may be 'auto')."""
    text = str(exc)
    if "CUDA" in text or (type(exc).__name__ == "OutOfMemoryError" and "MPS" not in text):
        return "CUDA GPU memory"
    if "MPS" in text:
        return "MPS unified memory"
    if isinstance(exc, MemoryError) or "alloc" in text.lower():
        return "CPU RAM"
    return plan.device


def _checkpointing(plan, estimate) -> bool | None:
    """Gradient checkpointing as run: the plan's setting, or what the estimate decided for 'auto'."""
    if plan.gradient_checkpointing is not None:
        return plan.gradient_checkpointing
    settings = getattr(estimate, "settings", None) or {}
    return settings.get("gradient_checkpointing")


def _some_layers_checkpointed(estimate) -> int | None:
    """How many layers 'auto' checkpointed when it chose fewer than all of them (else None)."""
    s = getattr(estimate, "settings", None) or {}
    checked, layers = s.get("checkpointed_layers"), s.get("layers")
    return checked if s.get("gradient_checkpointing") and checked and layers and checked < layers else None


def oom_suggestions(plan, estimate=None) -> list[str]:
    """Concrete smaller settings, as --set options, the most effective first."""
    out = []
    fit = _fit(plan, estimate)
    if fit:
        out.append(f"{fit}  (fits the memory estimate with 30% headroom)")
    if ((not _checkpointing(plan, estimate) or _some_layers_checkpointed(estimate))
            and plan.hardware.supports_gradient_checkpointing and "gradient_checkpointing" not in fit):
        out.append("--set gradient_checkpointing=true  (recompute the activations of every layer: less memory, "
                   "~30% slower)")
    if plan.batch_size > 1:
        out.append(f"--set batch_size={plan.batch_size // 2} --set gradient_accumulation="
                   f"{plan.gradient_accumulation * 2}  (same effective batch, half the activations)")
    if plan.sequence_length > 128:
        out.append(f"--set sequence_length={max(128, plan.sequence_length // 2)}  "
                   "(longer samples are truncated or dropped per long_samples)")
    if plan.precision == "fp32" and (plan.hardware.supports_bf16 or plan.hardware.supports_fp16):
        out.append(f"--set precision={'bf16' if plan.hardware.supports_bf16 else 'fp16'}  (half the weights)")
    if not out:
        out.append("use a machine with more memory or a smaller base model")
    return out


def _fit(plan, estimate) -> str:
    """--set options that `memory_fit.fit_suggestions` says fit 70% of what ran out, or ''."""
    if estimate is None or not getattr(estimate, "settings", None):
        return ""
    try:
        from . import memory_fit
        from .model_config import load_model_config

        s = estimate.settings
        budget = 0.7 * min(plan.hardware.available_memory_gb, estimate.total_gb)
        fit = memory_fit.fit_suggestions(
            load_model_config(plan.expert.base_model), available_memory_gb=budget,
            sequence_length=plan.sequence_length, batch_size=plan.batch_size,
            gradient_checkpointing=bool(s.get("gradient_checkpointing")),
            checkpointed_layers=_some_layers_checkpointed(estimate), lora_r=plan.lora.r,
            lora_targets=plan.lora.target_modules, precision=s.get("precision", plan.precision),
            packing=plan.packing, attn_impl=s.get("attn_impl", "sdpa"), device_kind=s.get("device_kind", "cpu"),
            weight_shards=s.get("weight_shards", 1))
    except Exception:  # noqa: BLE001 - a better hint is optional; the OOM message must still come out
        return ""
    if fit.gradient_checkpointing_fits and plan.hardware.supports_gradient_checkpointing:
        return "--set gradient_checkpointing=true"
    if fit.max_batch_size and fit.max_batch_size < plan.batch_size:
        accumulation = math.ceil(plan.batch_size * plan.gradient_accumulation / fit.max_batch_size)
        return f"--set batch_size={fit.max_batch_size} --set gradient_accumulation={accumulation}"
    if fit.max_sequence_length and fit.max_sequence_length < plan.sequence_length:
        return f"--set sequence_length={fit.max_sequence_length}"
    return ""


# --------------------------------------------------------------------------- NaN, disk, dispatch


class NonFiniteLoss(TrainingError):
    """The loss (or gradient norm) became NaN/Inf; carries where, so `translate` can add the checkpoint."""

    def __init__(self, problems, *, step: int, loss: float, title: str = "", details: dict | None = None):
        super().__init__(problems, title=title)
        self.step, self.loss = step, loss
        self.details = dict(details or {})
        """nan_error's keyword arguments (what, precision, where), to re-render with a checkpoint."""


def nan_error(step: int, loss: float, plan, last_checkpoint: Path | None, *, what: str = "loss",
              precision: str | None = None, where: str = "") -> NonFiniteLoss:
    """Why the loss turned NaN/Inf and what to change; the run writes no model.

    `precision` is the one actually run (the plan's may have fallen back); `where` e.g. "epoch 0, micro-batch 12".
    """
    causes = []
    if (precision or plan.precision) == "fp16":
        better = "bf16" if plan.hardware.supports_bf16 else "fp32"
        causes.append(f"fp16 overflow (Qwen models are known to overflow in fp16): --set precision={better}")
    causes.append(f"learning rate too high ({plan.learning_rate:g}): try --set learning_rate="
                  f"{plan.learning_rate / 3:.2g}, or more warmup_steps")
    if not plan.max_grad_norm:
        causes.append("gradient clipping is off (max_grad_norm = 0): --set max_grad_norm=1.0")
    causes.append("a broken or extreme row in the dataset: check it with --dry-run")
    if last_checkpoint:
        resume = (f"last good checkpoint: {last_checkpoint}; after changing the cause, continue from it "
                  f"with --resume {last_checkpoint}")
    else:
        resume = "no checkpoint was saved before it (save_steps = 0 or too large)"
    at = f"at step {step}" + (f" ({where})" if where else "")
    problems = [Problem(f"{what} became {loss} {at}; training stopped before the update and no model was written")]
    problems.append(Problem(resume))
    problems += [Problem(f"likely cause: {c}") for c in causes]
    return NonFiniteLoss(problems, step=step, loss=loss, title="Training diverged:",
                         details={"what": what, "precision": precision, "where": where})


def translate(exc: BaseException, plan, state, run_dir: Path | None, estimate=None) -> BaseException:
    """The exception to raise for what the training loop raised: user-facing for faults, else itself."""
    step = getattr(state, "step", None)
    if isinstance(exc, NonFiniteLoss) and run_dir is not None:
        from .checkpoint import latest_checkpoint

        last = latest_checkpoint(run_dir, log=lambda m: None)
        return nan_error(exc.step, exc.loss, plan, last, **exc.details) if last else exc
    if isinstance(exc, (HafsError, KeyboardInterrupt, SystemExit)):
        return exc
    oom = translate_oom(exc, plan, estimate, step=step)
    if oom is not None:
        return oom
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        from .outputs import disk_error

        return disk_error(exc, Path(exc.filename or run_dir or "."))
    if isinstance(exc, FloatingPointError):
        from .checkpoint import latest_checkpoint

        last = latest_checkpoint(run_dir, log=lambda m: None) if run_dir else None
        return nan_error(getattr(exc, "step", step), getattr(exc, "loss", float("nan")), plan, last)
    return exc


def slow_step_seconds() -> float:
    """HAFS_TEST_SLOW_STEP_MS as seconds: tests slow each optimizer step so a kill lands mid-run."""
    try:
        return max(0.0, float(os.environ.get("HAFS_TEST_SLOW_STEP_MS", "0")) / 1000)
    except ValueError:
        return 0.0
