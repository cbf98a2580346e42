"""What the benchmark measures besides time: the machine, its bf16 matmul and copy rates, the useful
FLOPs of a hafs epoch, and the torch.profiler table of the hafs row (--profile).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def bf16_matmul_rate(device: str, threads: int) -> float:
    """Best bf16 matmul FLOP/s over a few shapes (the hardware limit we compare against)."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    shapes = [(2048, 2048, 2048), (4096, 512, 1536), (4096, 1536, 512)] if device == "cpu" else [(8192, 8192, 8192)]
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        b = torch.randn(k, n, dtype=torch.bfloat16, device=device)
        for _ in range(3):
            a @ b
        reps = 10
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


def copy_rate(device: str, numel: int, reps: int) -> float:
    """Bytes/s read + written by copying a bf16 tensor of `numel` elements (memory or cache bandwidth).

    Printed beside the matmul probe because the hafs row spends a third of its time in memory passes
    around its GEMMs. (On 2026-11-26 neither probe followed the machine's drift: bench/README.md.)"""
    import torch

    x = torch.ones(numel, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return 4 * numel * reps / (time.perf_counter() - t0)


def torch_profiler(device: str, on: bool):
    """torch.profiler over the hafs row's training (--profile), else nothing."""
    import contextlib

    if not on:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else []))


GEMM_OPS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::addmm_",
            "aten::addbmm")
"""The profiler's names for the CPU ops that are matrix products (their self time is the GEMM kernels')."""


def write_profile(prof, device: str, seconds: float, steps: int, flops: float) -> None:
    """Where a step's time goes: ops by self CPU time, kernels by device time, and how busy the device was.

    On a CPU also the GEMM ceiling: the FLOP/s the run would reach if everything but its matrix products
    took no time, the most that faster glue (norms, softmax, copies, Python) could give against the probe."""
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    busy = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) for e in events)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e6
    ceiling = (f"; GEMMs {gemm:.2f} s ({100 * gemm / seconds:.0f}%): with nothing else taking time "
               f"{flops / gemm / 1e9:,.0f} GFLOP/s" if device == "cpu" and gemm else "")
    text = (f"{steps} steps in {seconds:.2f} s ({1e3 * seconds / max(steps, 1):.1f} ms/step); device busy "
            f"{busy / 1e6:.2f} s ({100 * busy / 1e6 / seconds:.0f}%); kernel launches {launches} "
            f"({launches / max(steps, 1):.0f}/step){ceiling}\n\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=70) + "\n\n"
            + events.table(sort_by=sort, row_limit=30))  # "self_cuda_time_total" is accepted by torch 2.4-2.13
    out = Path(os.environ.get("OUT") or ".")
    (out / "profile_hafs.txt").write_text(text)
    print(text.split("\n")[0], file=sys.stderr)


def useful_flops(config, split, plan) -> float:
    """Forward + backward-to-activations of the frozen matmuls, adapter forward/backward, each
    example's causal attention, and the LM head on labelled positions. No padding, no recompute."""
    import numpy as np

    h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    hd = h // heads
    kv = config.num_key_value_heads * hd
    linear = layers * (h * h + 2 * h * kv + h * h + 3 * h * config.intermediate_size)
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
    lora = layers * sum(plan.lora.r * (i + o) for i, o in (dims[t] for t in plan.lora.target_modules))
    lengths = split.lengths.astype(np.float64)
    tokens = lengths.sum()
    labelled = float(split.label_mask.sum())
    # QK^T and PV over the causal half (2 L^2 hd flops per head forward), backward twice that.
    attention = layers * 6.0 * heads * hd * float((lengths ** 2).sum())
    return tokens * (4.0 * linear + 6.0 * lora) + attention + labelled * 4.0 * h * config.vocab_size



def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (else what platform knows)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def machine(device: str) -> str:
    """The machine the rates were measured on, for the table's first line."""
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
