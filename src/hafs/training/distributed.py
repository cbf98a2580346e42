"""Data-parallel training over several processes (GPUs, or CPU processes with gloo) via torchrun.

One worker per GPU (`hardware.num_gpus` per node × `num_nodes`). `python scripts/train.py PRESET`
on such a profile re-executes itself under torchrun (`relaunch_command`); `torchrun
--nproc_per_node=N scripts/train.py PRESET` works directly, and then torchrun's WORLD_SIZE wins
over the profile. On a `device = "cpu"` profile `num_gpus` counts CPU processes (gloo backend):
that is how the multi-process path is tested without a GPU.

How a step is split (engine.train): an optimizer step consumes `gradient_accumulation × world`
micro-batches of the epoch's fixed list (batching.plan_batches); rank r takes every world-th of
them, so a step sees exactly the micro-batches of a one-process run with `gradient_accumulation ×
world`. The step's labelled-token count is all-reduced so every rank divides its summed
cross-entropy by the global count, and the trainable gradients are then all-reduced (SUM): the
update is the one-process update, up to float summation order.

Why not torch's DistributedDataParallel wrapper: the loss (loss.py) runs the decoder and a fused
LM head, not `model.forward`, which DDP's reducer needs to see, and a rank may get no micro-batch
in an epoch's last step, where DDP would hang. LoRA gradients are a few MB, so one flattened
all-reduce per step (what DDP does, minus overlapping it with backward) costs little.
`distributed = "fsdp"` shards the frozen base over the workers (models whose weights do not fit one
GPU): `shard_frozen_base` applies torch's FSDP2 `fully_shard` to each decoder layer with the LoRA
parameters as `ignored_params`. Each layer's weights are all-gathered for its forward and backward
and freed again; the adapters stay ordinary replicated tensors, so the optimizer, the gradient
all-reduce above, checkpoints and the saved adapter are the DDP path's, unchanged. Why not FSDP
over everything: with frozen weights there is nothing to reduce-scatter, and sharded adapters would
need distributed checkpoint code for a few MB. Embeddings, final norm and LM head stay replicated
(the fused loss reads the head's weight outside any layer's forward). Every rank must then run the
same number of forward/backward passes: a rank short of micro-batches in an epoch's last step runs
a zero-weighted one, evaluations run on every rank, and generation uses transformers' synced_gpus.

RNG: rank r seeds dropout with `seed + r` (different masks on different data, as DDP runs do).
A checkpoint holds rank 0's generators; on resume every rank restores those and re-offsets by
rank (`reseed_after_resume`), so a resumed run is exact in data, weights and optimizer, but its
dropout masks after the resume differ from an uninterrupted multi-process run's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shlex
import sys
from dataclasses import dataclass

from .errors import ConfigError, Problem

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
TIMEOUT_MINUTES = 60
"""Collective timeout: rank 0 alone evaluates before training, which may take a while."""


@dataclass
class DistContext:
    """Where this process sits among the workers; a single process is rank 0 of 1 (every call a no-op)."""

    rank: int = 0
    """Global rank (0 .. world_size - 1)."""
    local_rank: int = 0
    """Rank on this node (picks the GPU)."""
    world_size: int = 1
    """Number of workers."""
    backend: str = ""
    """torch.distributed backend: nccl (CUDA) or gloo (CPU); '' when not distributed."""
    device: str = "cpu"
    """Device this worker trains on (cuda:LOCAL_RANK under nccl)."""
    fsdp: bool = False
    """The frozen base is sharded over the workers (shard_frozen_base): every rank runs every forward."""
    mesh: object = None
    """fsdp: the 1-D device mesh over all workers, made by every worker together in init()."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the only worker that writes files, logs and tracks."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every worker."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, x):
        """Sum of `x` (a tensor, reduced in place and returned; or a number/list of numbers) over workers."""
        if not self.enabled:
            return x
        import torch
        import torch.distributed as dist

        if isinstance(x, torch.Tensor):
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            return x
        numbers = x if isinstance(x, (list, tuple)) else [x]
        t = torch.tensor([float(v) for v in numbers], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out = [int(v) if isinstance(n, int) else float(v) for v, n in zip(t.tolist(), numbers)]
        return out if isinstance(x, (list, tuple)) else out[0]

    def any(self, flag: bool) -> bool:
        """True on every worker when it is true on any (a stop signal seen by one worker stops all)."""
        return bool(self.all_reduce_sum(int(bool(flag)))) if self.enabled else bool(flag)

    def all_reduce_grads(self, params) -> None:
        """Sum the gradients of `params` over workers in one flattened all-reduce (missing grads count 0)."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def broadcast_params(self, params) -> None:
        """Copy rank 0's values of `params` to every worker (same start, whatever each one loaded)."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable) on every worker."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (filling caches), the others after it: no two writers of one cache."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    @contextlib.contextmanager
    def loading_turn(self):
        """The block that loads the model: rank 0 first (it fills the caches), then the others.

        Under fsdp the workers of a node take turns one by one (local rank order): each holds a whole
        CPU copy of the base model only until shard_frozen_base has moved its share to the device, so
        a node needs one model's worth of RAM, not one per worker. Every worker passes the same
        number of barriers (LOCAL_WORLD_SIZE), before and after its turn.
        """
        if not self.fsdp:
            with self.main_first():
                yield
            return
        turns = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        for _ in range(self.local_rank):
            self.barrier()
        try:
            yield
        finally:
            for _ in range(turns - self.local_rank):
                self.barrier()

    def _comm_device(self) -> str:
        return self.device if self.backend == "nccl" else "cpu"


def env_context(environ=None) -> DistContext:
    """The context torchrun's variables describe (RANK, WORLD_SIZE, LOCAL_RANK), without initialising."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", env.get("RANK", "0")))
    except ValueError:
        raise ConfigError([Problem("RANK / WORLD_SIZE / LOCAL_RANK are not integers", key="environment",
                                   hint="launch with torchrun, which sets them")]) from None
    return DistContext(rank=rank, local_rank=local, world_size=max(world, 1))


def is_main_process() -> bool:
    """Rank 0, or not distributed (readable before init: from the environment)."""
    return env_context().is_main


def init(device: str = "cpu", plan=None) -> DistContext:
    """Join the process group torchrun set up; nccl on CUDA (device cuda:LOCAL_RANK), gloo elsewhere.

    A single process (no WORLD_SIZE, or 1) gets a no-op context on `device`.
    """
    ctx = env_context()
    ctx.device = device
    if not ctx.enabled:
        return ctx
    ctx.fsdp = plan is not None and plan.hardware.distributed == "fsdp"
    import torch
    import torch.distributed as dist

    kind = device.split(":")[0]
    if kind == "cuda":
        ctx.backend, ctx.device = "nccl", f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(ctx.local_rank)
    else:
        ctx.backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(ctx.backend, rank=ctx.rank, world_size=ctx.world_size,
                                timeout=dt.timedelta(minutes=TIMEOUT_MINUTES))
    if ctx.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        ctx.mesh = init_device_mesh(kind if kind == "cuda" else "cpu", (ctx.world_size,))
    return ctx


def load_device(ctx: DistContext) -> str:
    """Where to load the base model: the CPU under FSDP (it may not fit one GPU whole), else the worker's device."""
    return "cpu" if ctx.fsdp else ctx.device


def shard_frozen_base(model, ctx: DistContext):
    """FSDP2-shard each decoder layer's frozen weights over the workers; returns `model` on ctx.device.

    The trainable (LoRA) parameters are `ignored_params`: replicated, and all-reduced by
    `all_reduce_grads` like under ddp. A no-op unless ctx.fsdp.
    """
    if not (ctx.enabled and ctx.fsdp):
        return model
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError([Problem(f"fsdp: {type(base).__name__} has no decoder layers to shard",
                                   key="hardware.distributed", hint='use distributed = "ddp"')])
    for layer in layers:
        fully_shard(layer, mesh=ctx.mesh, reshard_after_forward=True,
                    ignored_params={p for p in layer.parameters() if p.requires_grad})
    # The decoder as the root over the layers (it shards nothing itself: embeddings and final norm
    # stay whole, as the fused loss reads the tied head outside any forward): one root lets FSDP
    # prefetch the next layer's all-gather while the current one computes.
    outside = {p for layer in layers for p in layer.parameters()}
    fully_shard(decoder, mesh=ctx.mesh, ignored_params={p for p in decoder.parameters() if p not in outside})
    # transformers' generate() turns on synced_gpus for FSDP-managed models: ranks that finish early
    # keep stepping, so no rank waits forever on another's all-gather.
    base._is_fsdp_managed_module = True
    return model.to(ctx.device)


def cleanup(ctx: DistContext | None = None) -> None:
    """Leave the process group (safe to call when none was joined)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_if_worker(code: int) -> int:
    """In a torchrun worker: flush and leave at once with `code`; elsewhere return `code`.

    Gloo's worker threads can outlive destroy_process_group while FSDP's device mesh still holds the
    group, and tearing them down during interpreter shutdown aborts the process now and then
    ("terminate called without an active exception"), after a run that finished and saved. That
    turns into a failed torchrun job. The atexit handlers still run (trackers' own shutdown hooks);
    only the C++ teardown after them is skipped, and every file a worker writes is closed by then.
    """
    if env_context().world_size <= 1:
        return code
    import atexit

    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def reseed(seed: int, ctx: DistContext) -> None:
    """Per-rank dropout seed: `seed + rank` (rank 0 of one process: exactly `seed`)."""
    import torch

    torch.manual_seed(seed + ctx.rank)


def reseed_after_resume(ctx: DistContext) -> None:
    """After restoring rank 0's generators on every rank, offset the others so their dropout differs."""
    if ctx.enabled and not ctx.is_main:
        import torch

        torch.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) + ctx.rank)


# --------------------------------------------------------------------------- launching


def planned_world_size(plan, environ=None) -> int:
    """Workers of this run: torchrun's WORLD_SIZE when started by it (it wins), else the profile's count."""
    env = os.environ if environ is None else environ
    return env_context(env).world_size if "WORLD_SIZE" in env else plan.world_size()


def needs_launch(plan, environ=None) -> bool:
    """The plan asks for several workers and this process was not started by torchrun."""
    env = os.environ if environ is None else environ
    return plan.world_size() > 1 and "WORLD_SIZE" not in env


def torchrun_args(plan) -> list[str]:
    """torchrun's options for the plan's profile (single node: --standalone picks a free port)."""
    hw = plan.hardware
    if hw.num_nodes <= 1:
        return ["--standalone", f"--nproc_per_node={hw.num_gpus}"]
    return [f"--nnodes={hw.num_nodes}", f"--nproc_per_node={hw.num_gpus}", "--node_rank=${NODE_RANK}",
            "--rdzv_backend=c10d", "--rdzv_endpoint=${MASTER_ADDR}:${MASTER_PORT:-29500}"]


def script_args(argv: list[str] | None = None) -> list[str]:
    """How this program was called, as torchrun's script and arguments (`hafs train` → the module)."""
    argv = list(sys.argv if argv is None else argv)
    head = argv[0] if argv else ""
    if head.endswith(".py"):
        return [head, *argv[1:]]
    # The `hafs` console script: run the same CLI as a module under torchrun.
    return ["-m", "hafs.training.distributed", *argv[1:]]


def relaunch_command(plan, argv: list[str] | None = None, *, executable: str | None = None) -> list[str]:
    """`python -m torch.distributed.run OPTIONS SCRIPT ARGS`: this command, once per worker."""
    args = script_args(argv)
    if args[0] == "-m":
        args = ["--module", *args[1:]]
    return [executable or sys.executable, "-m", "torch.distributed.run", *torchrun_args(plan), *args]


def describe_launch(plan, argv: list[str] | None = None) -> str:
    """The exact torchrun and `accelerate launch` commands for a multi-worker plan (for --dry-run)."""
    args = [a for a in script_args(argv) if a != "--dry-run"]
    if args[0] == "-m":
        args = ["--module", *args[1:]]
    hw = plan.hardware
    torchrun = " ".join(["torchrun", *torchrun_args(plan), *map(shlex.quote, args)])
    accel = ["accelerate", "launch", "--multi_gpu", f"--num_processes={hw.num_gpus * hw.num_nodes}",
             f"--num_machines={hw.num_nodes}"]
    if hw.num_nodes > 1:
        accel += ["--machine_rank=${NODE_RANK}", "--main_process_ip=${MASTER_ADDR}",
                  "--main_process_port=${MASTER_PORT:-29500}"]
    accel_cmd = " ".join([*accel, *map(shlex.quote, args)])
    where = "on every node, with NODE_RANK, MASTER_ADDR (and MASTER_PORT) set" if hw.num_nodes > 1 else ""
    return (f"Distributed: {hw.num_gpus} worker(s) x {hw.num_nodes} node(s) = {plan.world_size()} "
            f"({hw.distributed}); global batch {plan.effective_batch(plan.world_size())} per optimizer step\n"
            f"  launch {where or '(train.py does this itself)'}:\n    {torchrun}\n  or:\n    {accel_cmd}")


if __name__ == "__main__":  # `torchrun --module hafs.training.distributed train PRESET ...` (the hafs command)
    from .cli import main

    sys.exit(main())
