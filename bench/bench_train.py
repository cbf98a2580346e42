"""hafs vs the usual ways of LoRA fine-tuning, on the same data and machine (issue 4).

    python bench/bench_train.py                  # CPU: issue 4's fixture, rows a-d (~10-15 min on 2 cores)
    python bench/bench_train.py --tiny           # the same at a toy scale (~1 min)
    python bench/bench_train.py --rows hafs,trl  # some rows only
    python bench/bench_train.py --gpu            # CUDA: Qwen2.5-Coder-1.5B's shape, hafs vs TRL (+ Liger)
    python bench/bench_train.py --gpu --shape small   # the GPU mode's code path at a toy shape (any device)

The fixture is built by this script (cached under .cache/bench/): a random-init Qwen2 model, a
byte-level BPE tokenizer trained on the generated text, and Alpaca rows whose token lengths are
long-tailed like real instruction data (median ~120, p90 ~310, max ~1,400 tokens).

Rows (each in its own subprocess, so peak RSS is per row):
  hafs     hafs's engine: the plan resolved from a generated training.toml, hafs data pipeline.
  hafs-fit (GPU) hafs given the trl row's peak memory as its profile's budget: the plan's memory
           check checkpoints the fewest layers that fit it (the same speed-for-memory trade TRL's
           default makes, on as many layers as needed instead of all).
  hafs-gc  (GPU) the same with gradient checkpointing on every layer (memory for time).
  earlier  the user's earlier trainer: transformers Trainer + peft, every sample padded to
           sequence_length, labels on every token (padding too), fp32. Every step costs the same,
           so it is timed on --earlier-steps steps (default 12) and scaled to the epoch.
  trl      TRL SFTTrainer with its defaults (bf16 autocast, gradient checkpointing, padding to the
           longest in the batch, completion-only loss) on a prompt/completion dataset.
  trl-nogc the same without gradient checkpointing.
  trl-liger (GPU) TRL defaults + use_liger_kernel.
Every row: LoRA r=8, alpha=8, dropout 0.05 on q,k,v,o; lr 2e-4 linear, no warm-up; batch 4; one epoch.

Figures: trained tokens/s = dataset tokens (prompt + response + EOS, as hafs tokenizes them) ÷
training wall time, the same numerator for every row; peak RSS (CPU) or max_memory_allocated (CUDA)
at the end of training; val loss = mean cross-entropy per response token on the val split, computed
the same way for every row: the fp32 base model + the row's trained adapter. hafs's achieved FLOP/s
counts the useful work (forward, backward to activations, adapter gradients, causal attention of each
example, LM head on labelled positions; no padding, no recomputation) and is compared with a bf16
matmul rate measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture import ROOT, SPECS, Spec, build_fixture, write_config  # noqa: E402
from peers import adapter_state, train_earlier, train_trl, val_loss  # noqa: E402
from probes import bf16_matmul_rate, copy_rate, machine, torch_profiler, useful_flops, write_profile  # noqa: E402

ROWS_CPU = ["hafs", "earlier", "trl", "trl-nogc"]
# In order of importance (a time budget may cut the tail); hafs-fit needs trl's figure first.
ROWS_GPU = ["hafs", "trl", "hafs-fit", "trl-liger", "hafs-gc"]

# --------------------------------------------------------------------------- workers (one per row)

def worker(row: str, spec: Spec, root: Path, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from hafs.training import tokenize
    from hafs.training.loader import load_config
    from hafs.training.plan import resolve

    plan = resolve(load_config(write_config(spec, root)), "bench", list(args.hafs_set))
    if args.steps:
        plan.max_steps = args.steps
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "model")
    quiet = lambda *a, **k: None
    prepared = tokenize.prepare_data(plan, tok, log=quiet)
    tokens = int(prepared.train.lengths.sum())
    device = "cuda" if torch.cuda.is_available() and spec.name.startswith("gpu") else "cpu"
    st = prepared.train.stats
    result = {"row": row, "dataset_tokens": tokens, "device": device, "lengths": [st.p50, st.p90, st.max]}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if row.startswith("hafs"):
        plan.gradient_checkpointing = True if row == "hafs-gc" else plan.gradient_checkpointing
        if row == "hafs-fit":
            plan.hardware.available_memory_gb = args.fit_gb
        adapter, seconds, extra = train_hafs(plan, prepared, device, args)
    elif row == "earlier":
        epoch_steps = -(-len(prepared.train) // plan.batch_size)
        if args.earlier_steps and not args.steps and args.earlier_steps < epoch_steps:
            plan.max_steps = args.earlier_steps
        adapter, seconds, extra = train_earlier(plan, prepared, tok, root, device)
        if plan.max_steps and not args.steps:
            # Every step costs the same here (every sample is padded to sequence_length), so the
            # epoch's time is exactly steps x time per step; the val loss is after these steps only.
            seconds *= epoch_steps / plan.max_steps
            extra["cpu_seconds"] *= epoch_steps / plan.max_steps
            extra["settings"] += f" (timed on {plan.max_steps} of {epoch_steps} steps; val loss after those)"
    else:
        adapter, seconds, extra = train_trl(plan, spec, root, row, device)
    # A full epoch counts the dataset's tokens (the same numerator for every row); a run cut short
    # by --steps counts the real tokens of the batches each trainer drew.
    trained = extra.pop("tokens_seen") if args.steps else tokens
    result.update(extra, seconds=seconds, tokens_trained=trained, tokens_per_second=trained / seconds,
                  cpu_seconds=extra.pop("cpu_seconds"),
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if device == "cuda":
        result["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    result["val_loss"] = val_loss(plan, prepared, root, adapter, device)
    return result


def train_hafs(plan, prepared, device, args):
    import torch

    from hafs.training import engine, hardware, memory_check, model_loading
    from hafs.training.precision import run_settings

    caps = hardware.detect()
    settings = run_settings(plan, caps)
    engine.limit_primitive_cache(settings.onednn_cache_capacity)  # as recipe.run: before the first matmul (the probe)
    notes = []
    # As the trainer (recipe.run): the memory check decides checkpointing, for this data's longest rows.
    estimate = memory_check.check_plan(plan, settings, log=notes.append, caps=caps)
    memory_check.relax_for_data(plan, settings, prepared.train.stats.max, estimate, log=notes.append, caps=caps)
    from hafs.training.overrides import parse_override

    for option in args.run_set:  # levers measured before they become run_settings' choice (TOML values)
        key, value = parse_override(option)
        setattr(settings, key, None if value in ("none", "None") else value)
    model, tok = model_loading.load_model_and_tokenizer(plan, settings.device, settings.precision, settings,
                                                        log=lambda *a: None)
    model = model_loading.apply_lora(model, plan, settings)
    source = engine.BatchSource(prepared.train, plan, tok, settings)
    total = plan.total_steps(source.micro_batches_per_epoch())
    opt = engine.build_optimizer(model, plan, settings)
    sched = engine.build_scheduler(opt, plan, total)
    if device == "cuda":
        torch.cuda.synchronize()
    # The matmul probe again, in this process right before and after the timed epoch: on a machine whose
    # speed drifts by 10% within minutes, the rate under the row's own conditions (see table()).
    probes = [bf16_matmul_rate(device, torch.get_num_threads())]
    profiler = torch_profiler(device, args.profile)
    t0, c0 = time.perf_counter(), time.process_time()
    with profiler:
        state = engine.train(model, opt, sched, source, plan, engine.TrainState(total_steps=total),
                             settings=settings, progress=engine.ProgressPrinter(total, 10, stream=sys.stderr))
        if device == "cuda":
            torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    probes.append(bf16_matmul_rate(device, torch.get_num_threads()))
    flops = useful_flops(model.get_base_model().config, prepared.train, plan)
    if args.profile:  # the useful work of the steps taken (all of it for a whole epoch)
        write_profile(profiler, device, seconds, state.step, flops * state.tokens / prepared.train.lengths.sum())
    return adapter_state(model), seconds, {"steps": state.step, "settings": settings.describe(), "cpu_seconds": cpu,
                                           "notes": notes,
                                           "tokens_seen": state.tokens,
                                           "flops": flops, "final_train_loss": state.last_loss(),
                                           "matmul_probes": probes}


# --------------------------------------------------------------------------- driver

def run_row(row: str, spec: Spec, root: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", row, "--spec", spec.name, "--threads", str(args.threads),
           "--cache", str(args.cache), "--steps", str(args.steps), "--earlier-steps", str(args.earlier_steps),
           "--fit-gb", str(args.fit_gb)] + [x for o in args.hafs_set for x in ("--hafs-set", o)] + (
               ["--profile"] if args.profile else []) + [x for o in args.run_set for x in ("--run-set", o)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore", HAFS_CACHE_DIR=str(args.cache / "hafs-cache"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"row": row, "error": (proc.stderr or proc.stdout).strip().splitlines()[-12:]}
    return json.loads(lines[-1][len("RESULT "):])


def table(results: list[dict], spec: Spec, peak: float, device: str) -> str:
    memory = "max alloc GB" if device == "cuda" else "peak RSS GB"
    lines = [f"{'row':<10} {'tokens/s':>10} {'tok/cpu-s':>10} {'seconds':>8} {memory:>13} {'val loss':>9}  settings"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['row']:<10} ERROR: " + " | ".join(r["error"][-3:]))
            continue
        mem = r.get("max_memory_allocated_gb") if device == "cuda" else r["peak_rss_gb"]
        lines.append(f"{r['row']:<10} {r['tokens_per_second']:>10,.0f} "
                     f"{r['tokens_trained'] / r['cpu_seconds']:>10,.0f} "
                     f"{r['seconds']:>8.1f} {mem:>13.2f} "
                     f"{r['val_loss']:>9.4f}  {r.get('settings', '')}")
    ok = {r["row"]: r for r in results if "error" not in r}
    for r in ok.values():
        lines += [f"  {r['row']}: {note}" for note in r.get("notes", [])]
    for mine in ("hafs", "hafs-fit"):
        if mine not in ok:
            continue
        h = ok[mine]
        lines.append("")
        for name, r in ok.items():
            if not name.startswith("hafs"):
                mem_h = h.get("max_memory_allocated_gb") if device == "cuda" else h["peak_rss_gb"]
                mem_r = r.get("max_memory_allocated_gb") if device == "cuda" else r["peak_rss_gb"]
                lines.append(f"{mine} vs {name:<9}: {h['tokens_per_second'] / r['tokens_per_second']:.2f}x tokens/s, "
                             f"{mem_h / mem_r:.2f}x memory, val loss {100 * (h['val_loss'] / r['val_loss'] - 1):+.1f}%")
    if "hafs" in ok:
        h = ok["hafs"]
        achieved = h["flops"] * h["tokens_trained"] / h["dataset_tokens"] / h["seconds"]
        lines.append(f"hafs achieved {achieved / 1e9:,.0f} GFLOP/s = {100 * achieved / peak:.0f}% of the measured "
                     f"bf16 matmul rate ({peak / 1e9:,.0f} GFLOP/s, before the rows)")
        around = h.get("matmul_probes") or []
        if around:
            mean = sum(around) / len(around)
            lines.append(f"  = {100 * achieved / mean:.0f}% of the rate measured in the hafs row's process just before "
                         f"and after its epoch ({' / '.join(f'{p / 1e9:,.0f}' for p in around)} GFLOP/s, mean "
                         f"{mean / 1e9:,.0f})")
    first = next(iter(ok.values()), {})
    lengths = "/".join(str(x) for x in first.get("lengths", []))
    lines.append(f"dataset: {spec.train_rows} train rows, {first.get('dataset_tokens', 0):,} tokens, "
                 f"lengths p50/p90/max {lengths}; model hidden {spec.hidden}, {spec.layers} layers, "
                 f"vocab {spec.vocab}, sequence_length {spec.seq}, batch {spec.batch}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy scale, about a minute")
    ap.add_argument("--gpu", action="store_true", help="CUDA benchmark at Qwen2.5-Coder-1.5B's shape")
    ap.add_argument("--shape", choices=["full", "small"], default="full", help="with --gpu: small = toy shape")
    ap.add_argument("--rows", default="", help="comma-separated rows (default: all for the mode)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per row")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--steps", type=int, default=0, help="stop every row after this many optimizer steps")
    ap.add_argument("--earlier-steps", type=int, default=12,
                    help="time the earlier row on this many steps and scale to the epoch (0: the whole epoch)")
    ap.add_argument("--budget", type=float, default=0, help="seconds for the whole run: skip rows that would not fit")
    ap.add_argument("--hafs-set", action="append", default=[], metavar="KEY=VALUE",
                    help="plan override for the hafs row (e.g. packing=true)")
    ap.add_argument("--run-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="RunSettings override for the hafs rows (a lever to measure, e.g. sdpa_cudnn=false)")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over the hafs rows' training: profile_hafs.txt in $OUT (or here)")
    ap.add_argument("--fit-gb", type=float, default=0, help=argparse.SUPPRESS)  # hafs-fit's budget, from trl's peak
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.cache = args.cache.resolve()
    if args.worker:
        spec = SPECS[args.spec]
        result = worker(args.worker, spec, build_fixture(spec, args.cache), args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    spec = SPECS["gpu" if args.gpu and args.shape == "full" else "gpu-small" if args.gpu else
                 "tiny" if args.tiny else "cpu"]
    rows = args.rows.split(",") if args.rows else (ROWS_GPU if args.gpu else ROWS_CPU)
    if "trl-liger" in rows and not _installed("liger_kernel"):
        rows.remove("trl-liger")
        print("note: liger_kernel is not installed; skipping the trl-liger row")
    started = time.time()
    import torch

    device = "cuda" if args.gpu and torch.cuda.is_available() else "cpu"
    root = build_fixture(spec, args.cache)
    load = os.getloadavg()
    print(f"machine: {machine(device)}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"{args.threads} threads per row")
    peak = bf16_matmul_rate(device, args.threads)
    print(f"probes: bf16 matmul {peak / 1e9:,.0f} GFLOP/s; bf16 copy {copy_rate(device, 128 << 20, 5) / 1e9:.1f} GB/s "
          f"(256 MiB), {copy_rate(device, 1 << 20, 2000) / 1e9:.0f} GB/s (2 MiB, in cache)", flush=True)
    results, took = [], {}
    for row in rows:
        if row == "hafs-fit":
            trl = next((r for r in results if r["row"] == "trl" and "error" not in r), None)
            if trl is None:
                print("skipping hafs-fit: it takes the trl row's peak memory as its budget, and trl did not run")
                continue
            # On CUDA the trl row's figure is what its tensors took (max_memory_allocated); a profile's
            # budget also holds the CUDA context, which the estimate adds (runtime_gb). RSS holds everything.
            from hafs.training.memory import RUNTIME_GB

            args.fit_gb = (trl["max_memory_allocated_gb"] + RUNTIME_GB["cuda"] if device == "cuda"
                           else trl["peak_rss_gb"])
        left = args.budget - (time.time() - started) if args.budget else float("inf")
        # A row takes about what the last row of its kind (hafs*, trl*) took; TRL's are the slow ones.
        kind = row.split("-")[0]
        expect = took.get(kind, max(took.values(), default=0.0))
        if left < expect * 1.2:
            print(f"skipping {row}: {left:.0f} s of the --budget left, a {kind} row took {expect:.0f} s")
            continue
        print(f"running {row} ...", flush=True)
        t0 = time.time()
        results.append(run_row(row, spec, root, args))
        took[kind] = time.time() - t0
        print("  " + json.dumps(results[-1]), flush=True)  # each row's figures as soon as it ends
        print(f"  {row}: {time.time() - t0:.0f} s"
              + (f"  ERROR {results[-1]['error'][-1]}" if "error" in results[-1] else ""),
              flush=True)
    text = table(results, spec, peak, device)
    print(text)
    out = os.environ.get("OUT")
    if args.gpu and out:
        Path(out, "bench_gpu.txt").write_text(f"machine: {machine(device)}\n{text}\n")
        Path(out, "bench_gpu.json").write_text(json.dumps(results, indent=2))


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    main()
