"""Memory estimate vs measured peak, for the tiny and the benchmark-shaped model.

    python bench/memory_accuracy.py                 # CPU: tiny + bench shapes, seq 256/1024 x batch 1/4
    python bench/memory_accuracy.py --quick         # tiny shape only
    python bench/memory_accuracy.py --allocator mmap --steps 2   # after memory.release_freed_memory()
    python bench/memory_accuracy.py --device cuda --shapes tiny,bench,qwen1.5b --steps 2   # on a GPU

Each CPU case trains in a fresh subprocess: 16 steps of random row widths (`--varied`; length-grouped
batches bring a new shape nearly every step, and the allocator's heap and torch's caches of matmul
primitives grow with them), then `--steps` at full width; CUDA cases share one process per shape. Measured:
CPU = peak RSS (VmHWM) minus the RSS after importing torch/transformers/peft (the interpreter baseline);
CUDA = torch.cuda.max_memory_allocated. Compared with `MemoryEstimate.measurable_gb` (the estimate less
the runtime it cannot see). Target: within ±25%.

The steps (`train_steps`) use the trainer's own pieces: precision.run_settings, model_loading's LoRA
preparation and attention, hafs.training.loss's chunked loss, engine.build_optimizer (LoRA r=8 on
q,k,v,o, bf16 frozen weights, bf16 autocast). `--loop plain` uses peft's defaults instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

FIXTURE = ROOT / "tests/fixtures/qwen2.5-coder-1.5b-config.json"
SHAPES = {
    # tiny: the test-suite scale; bench: issue 4's benchmark fixture; qwen1.5b: Qwen2.5-Coder-1.5B (GPU only)
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 2048},
    "bench": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
              "intermediate_size": 1536, "vocab_size": 16384},
    "qwen1.5b": json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_R, LORA_DROPOUT, LABELLED = 8, 0.05, 0.5


def model_config(shape: str) -> dict:
    cfg = dict(SHAPES[shape])
    cfg.setdefault("model_type", "qwen2")
    cfg.setdefault("tie_word_embeddings", True)
    cfg.setdefault("max_position_embeddings", 4096)
    return cfg


def build_fixture(shape: str, out_dir: Path) -> Path:
    """A random-init Qwen2 model saved in bf16 (the demo builder's when it exists, else a local one)."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = {k: v for k, v in model_config(shape).items() if k not in ("architectures", "transformers_version")}
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- worker (fresh process)

def _status_mib(key: str) -> float:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def engine_settings(device: str, checkpointing: bool, seq: int = 2048):
    """The trainer's RunSettings for a bf16 packed run of `seq`-token rows (None with --loop plain)."""
    from hafs.training.precision import run_settings

    return run_settings(types.SimpleNamespace(device=device, precision="bf16", packing=True, sequence_length=seq,
                                              gradient_checkpointing=checkpointing))


def build_model(model_dir: str | None, cfg: dict, device: str, checkpointing: bool = False, settings=None):
    """bf16 base model + LoRA. With `settings`, the trainer's own preparation (model_loading: attention
    kernel, no fp32 input copy under autocast, its dropout, checkpointing); else peft's defaults."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    attn = settings.attn_implementation if settings else "sdpa"
    if settings:
        from hafs.training import model_loading
        from hafs.training.precision import VARLEN_ATTENTION

        if attn == VARLEN_ATTENTION:
            model_loading.register_varlen_attention()
    if model_dir:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=attn)
    else:  # GPU runs: build in place, no file round trip
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(Qwen2Config(**cfg), dtype=torch.bfloat16, attn_implementation=attn)
    model = model.to(device)
    if checkpointing and not settings:
        from hafs.training.model_loading import enable_checkpointing

        enable_checkpointing(model)
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_R, target_modules=TARGETS,
                                             lora_dropout=LORA_DROPOUT), autocast_adapter_dtype=True)
    if settings:
        model_loading.prepare_for_training(model, settings)
    model.train()
    return model


def train_steps(model, cfg: dict, seq: int, batch: int, steps: int, device: str, settings=None,
                varied: int = 0) -> None:
    """Steps as the engine takes them: autocast forward, hafs.training.loss's fused chunked cross-entropy on
    labelled tokens (one example per row: the estimate's worst case), AdamW on the adapter.

    `varied`: first that many steps with rows of random widths (seq/4 to seq), as length-grouped
    batches bring a new shape nearly every step: the allocator's heap and oneDNN's cache of per-shape
    primitives grow with them, which a few steps of one shape do not show."""
    import contextlib

    import torch

    from hafs.training.loss import causal_lm_loss
    from hafs.training.packed_linear import packed_weights

    if settings:
        from hafs.training.engine import build_optimizer

        opt = build_optimizer(model, types.SimpleNamespace(weight_decay=0.0, learning_rate=2e-4), settings)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    gen = torch.Generator().manual_seed(0)
    widths = torch.randint(max(1, seq // 4), seq + 1, (varied,), generator=gen).tolist() + [seq] * steps
    # as engine.train: the frozen weights packed for the loop when the settings say so
    with packed_weights(model, bool(settings is not None and settings.packed_weights)):
        for width in widths:
            # One example per row, the second half its labelled response: the estimate's worst case (the
            # CPU attention keeps probabilities quadratic in the example's length).
            ids = torch.randint(2, cfg["vocab_size"], (batch, width), generator=gen)
            pos = torch.arange(width).repeat(batch, 1)
            labels = ids.clone()
            labels[:, :width // 2] = -100
            batch_ = {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": labels.to(device)}
            autocast = settings.autocast() if settings else torch.autocast(device, dtype=torch.bfloat16)
            with autocast or contextlib.nullcontext():
                loss, n = causal_lm_loss(model, batch_, chunk_size=settings.loss_chunk_size if settings else None,
                                         bf16_softmax=bool(settings and settings.bf16_loss_softmax))
            (loss / max(1, n)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
    del opt


def worker(args) -> None:
    """One CPU case in a fresh process: peak RSS minus the RSS after the heavy imports."""
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers.models.qwen2 import modeling_qwen2  # noqa: F401

    torch.set_num_threads(args.threads)
    if args.allocator == "mmap":
        from hafs.training.memory import release_freed_memory

        assert release_freed_memory(), "mallopt unavailable: use --allocator glibc"
    cfg = model_config(args.shape)
    settings = engine_settings("cpu", args.checkpointing, args.seq) if args.loop == "engine" else None
    baseline = _status_mib("VmRSS")
    model = build_model(args.model_dir, cfg, "cpu", args.checkpointing, settings)
    if settings is not None:  # as engine.train: before the first matmul
        from hafs.training.packed_linear import limit_primitive_cache

        limit_primitive_cache(settings.onednn_cache_capacity)
    train_steps(model, cfg, args.seq, args.batch, args.steps, "cpu", settings, args.varied)
    print(json.dumps({"measured_mib": _status_mib("VmHWM") - baseline, "baseline_mib": baseline}))


def cuda_cases(shape: str, cases, args):
    """All cases of one shape in this process: max_memory_allocated, reset before each case."""
    import gc

    import torch

    cfg = model_config(shape)
    settings = engine_settings("cuda", args.checkpointing) if args.loop == "engine" else None
    model = build_model(None, cfg, "cuda", args.checkpointing, settings)
    for seq, batch in cases:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        train_steps(model, cfg, seq, batch, args.steps, "cuda", settings)
        torch.cuda.synchronize()
        yield seq, batch, torch.cuda.max_memory_allocated() / 2**20
    del model


# ----------------------------------------------------------------------------- driver

def estimate(shape: str, seq: int, batch: int, args):
    from hafs.training.memory import estimate_memory
    from hafs.training.memory_check import settings_kwargs

    if args.loop == "engine":
        settings = engine_settings(args.device, args.checkpointing, seq)
        run = {**settings_kwargs(settings), "cpu_allocator": args.allocator}
    else:  # peft defaults: fp32 input copies, torch dropout, transformers' sdpa
        run = {"precision": "bf16", "gradient_checkpointing": args.checkpointing, "attn_impl": "sdpa",
                   "device_kind": args.device, "autocast": True, "cpu_allocator": args.allocator}
    return estimate_memory(model_config(shape), sequence_length=seq, batch_size=batch, lora_r=LORA_R,
                           lora_targets=TARGETS, packing=True, lora_dropout=LORA_DROPOUT,
                           labelled_fraction=LABELLED, **run)


def run_case(shape, seq, batch, args, model_dir) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--seq", str(seq), "--batch", str(batch),
           "--steps", str(args.steps), "--varied", str(args.varied), "--device", args.device,
           "--threads", str(args.threads),
           "--loop", args.loop, "--allocator", args.allocator] + (["--checkpointing"] if args.checkpointing else []) + (
               ["--model-dir", str(model_dir)] if model_dir else [])
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed for {shape} seq={seq} batch={batch}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,bench")
    p.add_argument("--seqs", default="256,1024")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--steps", type=int, default=4,
                   help="optimizer steps per case; glibc's heap needs ~3 to reach its steady peak")
    p.add_argument("--varied", type=int, default=16,
                   help="CPU: steps of random row widths (seq/4 to seq) before the --steps at full width")
    p.add_argument("--allocator", default="glibc", choices=["glibc", "mmap"],
                   help="CPU malloc as is, or with memory.release_freed_memory() (fixed mmap threshold)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loop", default="engine", choices=["engine", "plain"],
                   help="engine: the trainer's settings and model preparation; plain: peft defaults")
    p.add_argument("--quick", action="store_true", help="tiny shape only")
    p.add_argument("--checkpointing", action="store_true", help="train with gradient checkpointing")
    p.add_argument("--json", help="also write the table as JSON to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    shapes = ["tiny"] if args.quick else args.shapes.split(",")
    cases = [(int(q), int(b)) for q in args.seqs.split(",") for b in args.batches.split(",")]
    rows = []
    print(f"{'shape':<9}{'seq':>6}{'batch':>6}{'estimate MiB':>14}{'measured MiB':>14}{'ratio':>7}"
          f"   ({args.device}, {args.loop} loop, {args.allocator if args.device == 'cpu' else 'caching'} allocator"
          f"{', checkpointing' if args.checkpointing else ''}, "
          f"{f'{args.varied} steps of varied widths + ' if args.varied and args.device == 'cpu' else ''}"
          f"{args.steps} steps)", flush=True)

    def report(shape, seq, batch, got):
        est = estimate(shape, seq, batch, args).measurable_gb * 1024
        ratio = est / got if got else float("inf")
        rows.append({"shape": shape, "seq": seq, "batch": batch, "estimate_mib": round(est, 1),
                     "measured_mib": round(got, 1), "ratio": round(ratio, 3)})
        flag = "" if 0.75 <= ratio <= 1.25 else "  <-- outside ±25%"
        print(f"{shape:<9}{seq:>6}{batch:>6}{est:>14.1f}{got:>14.1f}{ratio:>7.2f}{flag}", flush=True)

    if args.device == "cuda":
        sys.path.insert(0, str(ROOT / "src"))
        for shape in shapes:
            for seq, batch, got in cuda_cases(shape, cases, args):
                report(shape, seq, batch, got)
    else:
        with tempfile.TemporaryDirectory(prefix="hafs-mem-") as tmp:
            for shape in shapes:
                model_dir = build_fixture(shape, Path(tmp) / shape)
                for seq, batch in cases:
                    report(shape, seq, batch, run_case(shape, seq, batch, args, model_dir)["measured_mib"])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(0.75 <= r["ratio"] <= 1.25 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
