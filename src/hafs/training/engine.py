"""The training loop: optimizer, schedule, gradient accumulation, evaluation (progress lines: progress.py).

State lives in one serialisable `TrainState` (step, data position, losses, time), so a checkpoint
is that dict plus the adapter, optimizer and RNG; side effects (logging, checkpoints, trackers,
signals) are `Hooks` the caller passes in. The data position is (epoch, micro_batch): an epoch's
micro-batches are a pure function of (seed, epoch) (`batching.plan_batches`), so resuming needs
no sampler state.

Loss normalisation: the summed cross-entropy of every micro-batch is divided by the number of
labelled tokens in the whole optimizer step (not averaged per micro-batch), so gradient
accumulation gives the same gradient as one big batch, whatever the micro-batches' token counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .errors import Problem, TrainingError
from .loss import IGNORE_INDEX, causal_lm_loss, count_labelled, plain_head
from .packed_linear import limit_primitive_cache, packed_weights
from .precision import RunSettings, run_settings
from .progress import ProgressPrinter


@dataclass
class TrainState:
    """Where training is; everything a resumed run needs besides weights, optimizer and RNG."""

    step: int = 0
    """Optimizer steps taken."""
    total_steps: int = 0
    """Optimizer steps the run will take."""
    epoch: int = 0
    """Current epoch (0-based)."""
    micro_batch: int = 0
    """Index of the next micro-batch within the epoch."""
    tokens: int = 0
    """Dataset tokens trained on (prompt + response, no padding)."""
    loss_history: list = field(default_factory=list)
    """[step, mean training loss per response token] for every step."""
    eval_history: list = field(default_factory=list)
    """[step, validation loss] for every evaluation."""
    lr: float = 0.0
    """Learning rate of the last step."""
    elapsed_seconds: float = 0.0
    """Wall time spent in train(), summed over resumed sessions."""
    stop_reason: str = ""
    """'' while running; 'completed' or 'stopped' (should_stop) after."""

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        """Inverse of to_dict; unknown keys (from newer versions) are ignored."""
        names = set(cls.__dataclass_fields__)
        state = cls(**{k: v for k, v in data.items() if k in names})
        state.loss_history = [list(x) for x in state.loss_history]
        state.eval_history = [list(x) for x in state.eval_history]
        return state

    def last_loss(self) -> float | None:
        """Training loss of the last step, None before the first."""
        return self.loss_history[-1][1] if self.loss_history else None

    def best_eval(self) -> float | None:
        """Lowest validation loss so far."""
        return min((v for _, v in self.eval_history), default=None)


@dataclass
class Hooks:
    """Callbacks around the loop; all optional."""

    on_step: Callable | None = None
    """on_step(state, metrics) after every optimizer step."""
    on_log: Callable | None = None
    """on_log(state, metrics) every logging_steps."""
    on_eval: Callable | None = None
    """on_eval(state, metrics) after each evaluation."""
    on_save: Callable | None = None
    """on_save(state) every save_steps (the caller writes the checkpoint)."""
    should_stop: Callable | None = None
    """should_stop() -> bool, asked after every step (signals, time limits)."""

    def call(self, name: str, *args) -> None:
        fn = getattr(self, name)
        if fn is not None:
            fn(*args)


# --------------------------------------------------------------------------- data

class BatchSource:
    """An epoch's micro-batches from a tokenized split: `source(epoch)` is a lazily collated sequence."""

    def __init__(self, split, plan, tokenizer=None, settings: RunSettings | None = None, pad_id: int | None = None):
        self.split, self.plan = split, plan
        self.lengths = split.lengths
        self.pad_id = pad_id if pad_id is not None else tokenizer.pad_token_id
        self.packing = settings.packing if settings is not None else plan.packing
        self.padding_free = settings is not None and settings.padding_free
        self._rows: tuple[int, list] | None = None

    def rows(self, epoch: int) -> list:
        """batching.plan_batches for `epoch` (cached for the current epoch)."""
        if self._rows is None or self._rows[0] != epoch:
            from .batching import plan_batches

            self._rows = (epoch, plan_batches(self.lengths, batch_size=self.plan.batch_size,
                                              sequence_length=self.plan.sequence_length, packing=self.packing,
                                              seed=self.plan.seed, epoch=epoch))
        return self._rows[1]

    def micro_batches_per_epoch(self) -> int:
        return len(self.rows(0))

    def trained(self, state: TrainState) -> tuple[int, float]:
        """(distinct samples trained on, epochs completed as a fraction) at `state`'s data position.

        Worked out from the position rather than counted in the loop, so a run resumed from any
        checkpoint, older ones included, reports the whole run. Every epoch holds every sample once.
        """
        rows = self.rows(state.epoch)
        done = min(state.micro_batch, len(rows))
        epochs = state.epoch + done / max(1, len(rows))
        if state.epoch:
            return len(self.lengths), epochs
        return sum(len(row) for batch in rows[:done] for row in batch), epochs

    def __call__(self, epoch: int) -> EpochBatches:
        return EpochBatches(self, self.rows(epoch))


class EpochBatches:
    """Sequence of one epoch's micro-batches, collated on access."""

    def __init__(self, source: BatchSource, rows: list):
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        from .batching import collate, end_to_end

        rows = self.rows[i]
        batch = collate(self.source.split, end_to_end(rows) if self.source.padding_free else rows, self.source.pad_id)
        batch["num_tokens"] = int(sum(int(self.source.lengths[j]) for row in rows for j in row))
        return batch


def trim_batch(batch: dict, multiple: int = 1) -> dict:
    """Drop trailing columns after the last labelled position (they cannot affect the loss).

    Keeps the width a multiple of `multiple` (tensor-core friendly on GPUs).
    """
    labels = batch["labels"]
    cols = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    width = int(cols[-1]) + 1 if len(cols) else 1
    width = min(labels.shape[1], -(-width // multiple) * multiple)
    if width == labels.shape[1]:
        return batch
    return {k: (v[:, :width] if hasattr(v, "dim") and v.dim() == 2 else v) for k, v in batch.items()}


def real_tokens(batch: dict) -> int:
    """Dataset tokens in a micro-batch: `num_tokens` when given, else up to each row's last label."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    labelled = batch["labels"] != IGNORE_INDEX
    width = labelled.shape[1]
    last = width - labelled.flip(1).int().argmax(dim=1)
    return int((last * labelled.any(dim=1)).sum())


# --------------------------------------------------------------------------- optimizer and schedule

def build_optimizer(model, plan, settings: RunSettings | None = None):
    """AdamW over the trainable parameters; weight decay on matrices only (not biases or norms)."""
    import torch

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise TrainingError([Problem("the model has no trainable parameters", key="lora",
                                     hint="check lora.target_modules")])
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": plan.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = bool(settings and settings.fused_optimizer)
    # foreach: one kernel per op for all LoRA tensors instead of a loop over ~hundreds of them.
    return torch.optim.AdamW(groups, lr=plan.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             **({"fused": True} if fused else {"foreach": True}))


def build_scheduler(optimizer, plan, total_steps: int):
    """transformers.get_scheduler(plan.lr_scheduler) with plan.resolved_warmup(total_steps) warm-up steps."""
    from transformers import get_scheduler

    warmup = plan.resolved_warmup(total_steps)
    name = plan.lr_scheduler
    if name == "constant" and warmup:
        name = "constant_with_warmup"  # "constant" would silently ignore the warm-up the user asked for
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# --------------------------------------------------------------------------- the loop

def train(model, optimizer, scheduler, batches, plan, state: TrainState | None = None, hooks: Hooks | None = None,
          eval_fn=None, settings: RunSettings | None = None, progress=None, dist=None) -> TrainState:
    """Train until state.total_steps (max_steps, else num_epochs) or hooks.should_stop(); returns the state.

    `batches(epoch)` gives that epoch's micro-batches (dicts of input_ids, labels, position_ids; Long[B, T]).
    `eval_fn(model)` returns the validation loss (float, (loss, tokens) or {"eval_loss": ...}).
    `progress`: a ProgressPrinter (default: one on stdout), or False for none.
    `dist`: a distributed.DistContext: each step takes gradient_accumulation × world micro-batches,
    rank r every world-th of them; token counts and gradients are summed over ranks (see distributed.py).
    """
    import torch

    from .distributed import DistContext

    settings = settings or run_settings(plan)
    dist = dist or DistContext(device=settings.device)
    hooks = hooks or Hooks()
    state = state or TrainState()
    if not state.total_steps:
        state.total_steps = plan.total_steps(-(-len(batches(state.epoch)) // dist.world_size))
    if progress is None:
        progress = ProgressPrinter(state.total_steps, plan.logging_steps)
    if state.step == 0 and state.micro_batch == 0 and state.epoch == 0:
        torch.manual_seed(plan.seed + dist.rank)  # dropout; a resumed run has its RNG restored by the caller
    device = settings.device
    limit_primitive_cache(settings.onednn_cache_capacity)  # no-op after the process's first matmul
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(device.split(":")[0]) if settings.grad_scaler else None
    plain = plain_head(model)
    compute_dtype = settings.torch_dtype(settings.autocast_dtype) if settings.autocast_dtype else None
    multiple = 8 if device.startswith("cuda") else 1
    eval_every = plan.eval_steps or plan.logging_steps
    model.train()
    session_start, eval_seconds, session_tokens = time.perf_counter(), 0.0, 0
    last_mark = session_start
    window: list[float] = []
    epoch_batches = batches(state.epoch)
    # Frozen weights packed for oneDNN for the loop only (packed_linear): freed before anything after
    # training (merge, export) could change the weights under them.
    with packed_weights(model, settings.packed_weights), settings.attention_kernels():
        while state.step < state.total_steps:
            if state.micro_batch >= len(epoch_batches):
                state.epoch, state.micro_batch = state.epoch + 1, 0
                epoch_batches = batches(state.epoch)
                continue
            span = range(state.micro_batch, min(state.micro_batch + plan.gradient_accumulation * dist.world_size,
                                                len(epoch_batches)))
            group = [epoch_batches[i] for i in span[dist.rank::dist.world_size]]
            n_labelled, step_tokens = dist.all_reduce_sum([sum(count_labelled(b["labels"]) for b in group),
                                                           sum(real_tokens(b) for b in group)])
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            real = len(group)
            if dist.fsdp and real < -(-len(span) // dist.world_size):
                # Sharded layers all-gather in every forward and backward: a rank short of micro-batches
                # must still take part, with one that counts for nothing.
                group = group + [epoch_batches[span[0]]]
            for i, b in enumerate(group):
                counts = i < real
                b = {k: v.to(device, non_blocking=True) for k, v in trim_batch(b, multiple).items()
                     if k in ("input_ids", "labels", "position_ids")}
                with settings.autocast():
                    part, _ = causal_lm_loss(model, b, chunk_size=settings.loss_chunk_size,
                                             compute_dtype=compute_dtype, plain=plain,
                                             bf16_softmax=settings.bf16_loss_softmax)
                scaled = part / max(n_labelled, 1) if counts else part * 0.0
                (scaler.scale(scaled) if scaler else scaled).backward()
                if counts:
                    loss_sum += part.detach()
            dist.all_reduce_grads(params)
            dist.all_reduce_sum(loss_sum)
            loss = loss_sum.item() / max(n_labelled, 1)
            if not math.isfinite(loss):
                raise non_finite_loss(loss, state, plan, settings)
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = None
            if plan.max_grad_norm and plan.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm))
                if not math.isfinite(grad_norm) and scaler is None:
                    raise non_finite_loss(grad_norm, state, plan, settings, what="gradient norm")
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            state.lr = float(optimizer.param_groups[0]["lr"])
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.micro_batch += len(span)
            state.tokens += step_tokens
            session_tokens += step_tokens
            state.loss_history.append([state.step, loss])
            window.append(loss)
            end_of_epoch = state.micro_batch >= len(epoch_batches)
            train_seconds = time.perf_counter() - session_start - eval_seconds
            metrics = {"loss": loss, "lr": state.lr, "grad_norm": grad_norm, "epoch": state.epoch + (
                state.micro_batch / max(1, len(epoch_batches))), "tokens": state.tokens,
                "tokens_per_second": session_tokens / max(train_seconds, 1e-9)}
            hooks.call("on_step", state, metrics)
            if progress:
                progress.update(state, metrics, train_seconds)
            if state.step % plan.logging_steps == 0 or state.step == state.total_steps:
                log_metrics = dict(metrics, loss=sum(window) / len(window))
                window = []
                if progress:
                    progress.log(state, log_metrics, train_seconds)
                hooks.call("on_log", state, log_metrics)
            if eval_fn is not None and ((plan.eval_strategy == "steps" and state.step % eval_every == 0)
                                        or (plan.eval_strategy == "epoch" and end_of_epoch)):
                t0 = time.perf_counter()
                value = _eval_value(eval_fn(model))
                model.train()
                eval_seconds += time.perf_counter() - t0
                state.eval_history.append([state.step, value])
                if progress:
                    progress.note(f"step {state.step}: val loss {value:.4f}")
                hooks.call("on_eval", state, {"eval_loss": value, "epoch": metrics["epoch"]})
            now = time.perf_counter()
            state.elapsed_seconds += now - last_mark
            last_mark = now
            if plan.save_steps and state.step % plan.save_steps == 0 and state.step < state.total_steps:
                hooks.call("on_save", state)
            if hooks.should_stop is not None and hooks.should_stop():
                state.stop_reason = "stopped"
                break
    if progress:
        progress.finish()
    if not state.stop_reason:
        state.stop_reason = "completed"
    return state


def _eval_value(result) -> float:
    if isinstance(result, dict):
        return float(result.get("eval_loss", result.get("loss")))
    if isinstance(result, (tuple, list)):
        return float(result[0])
    return float(result)


def non_finite_loss(value: float, state: TrainState, plan, settings: RunSettings, what: str = "loss") -> TrainingError:
    """The error for a NaN/Inf loss: where it happened and what usually causes it."""
    causes = [f"learning rate {plan.learning_rate:g} too high: try {plan.learning_rate / 4:g}"]
    if settings.precision == "fp16":
        causes.insert(0, "fp16 overflow (Qwen models overflow in fp16): use precision = \"bf16\" or \"fp32\"")
    causes.append("a corrupt base model or extreme data (very long repeated tokens)")
    from .faults import NonFiniteLoss  # its type lets faults.translate add the run's last good checkpoint

    where = f"epoch {state.epoch}, micro-batch {state.micro_batch}"
    return NonFiniteLoss([Problem(
        f"{what} became {value} at step {state.step + 1} ({where}); "
        "training stopped before the update, so no NaN weights were written",
        key=f"presets.{plan.preset}", hint="likely causes: " + "; ".join(causes))],
        step=state.step + 1, loss=value, details={"what": what, "precision": settings.precision, "where": where})


def evaluate_loss(model, batches, settings: RunSettings | None = None) -> tuple[float, int]:
    """(mean cross-entropy per labelled token, labelled tokens) over `batches`, without gradients."""
    import torch

    device = settings.device if settings else next(model.parameters()).device.type
    dtype = settings.torch_dtype(settings.autocast_dtype) if settings and settings.autocast_dtype else None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    plain = plain_head(model)
    try:
        with torch.no_grad():
            for b in batches:
                b = {k: v.to(device) for k, v in trim_batch(b).items() if k in ("input_ids", "labels", "position_ids")}
                with (settings.autocast() if settings else _null()):
                    part, n = causal_lm_loss(model, b, chunk_size=settings.loss_chunk_size if settings else None,
                                             compute_dtype=dtype, plain=plain)
                total += float(part)
                count += n
    finally:
        model.train(was_training)
    return (total / count if count else float("nan")), count


def _null():
    import contextlib

    return contextlib.nullcontext()
