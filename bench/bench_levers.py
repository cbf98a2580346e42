"""Each CPU kernel lever of hafs on and off, in one process, in alternating rounds (issue 4).

    python bench/bench_levers.py                   # all levers, issue 4's fixture (~10 min on 2 cores)
    python bench/bench_levers.py --levers lora --rounds 12 --batches 12
    python bench/bench_levers.py --tiny            # the toy fixture (~1 min)

Why this exists: on a shared machine the speed of whole runs drifts by 10% and more within minutes
(bench/README.md), more than most single levers gain, so two end-to-end runs cannot tell a 2% lever
from noise. Here the model is loaded once; for each lever the same micro-batches (forward + backward,
no optimizer step) run with the lever on and off, alternately, round after round, so drift hits
both sides alike. The minimum over rounds is the least disturbed figure; the median shows the spread;
the median of each round's on/off ratio (its two runs back to back) is the steadiest of the three.

Levers (kernels.py), each switched on its own with the others on:
  lora      LoraLinear: the adapter and its frozen matmul as one autograd node (off: peft's forward)
  rotary    the rotary embedding of q and k as one node (off: transformers' apply_rotary_pos_emb)
  rms_norm  RMSNorm without fp32 copies (off: transformers' module)
  swiglu    SwiGLU keeping gate and up only (off: transformers' MLP forward)
  packed    frozen weights pre-packed for oneDNN (packed_linear; off: plain F.linear, repacked per call)
  no_cudnn  (CUDA) SDPA without cuDNN's attention (RunSettings.sdpa_cudnn = False; off: SDPA's own choice)

On a GPU (`--spec gpu`, Qwen2.5-Coder-1.5B's shape; `--spec gpu-small` for a toy run of the same code):
    python bench/bench_levers.py --spec gpu --levers no_cudnn,lora,rms_norm --rounds 6
Batching levers (padding-free rows, attention groups) change the batches themselves and are measured
by bench_train.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture  # noqa: E402  (bench_train.py's fixture and its config)

LEVERS = ("lora", "rotary", "rms_norm", "swiglu", "packed")
CPU_ONLY = ("packed",)  # nothing is packed on CUDA
CUDA_LEVERS = ("no_cudnn", "lora", "rotary", "rms_norm", "swiglu")  # CUDA bf16 runs hafs's kernels too
_packed: dict = {}  # model id -> the open packed_weights context while the "packed" lever is on


def load(spec, cache: Path):
    """(model, settings, micro-batches of the first epoch) for the fixture, trained by hafs's own loader."""
    from transformers import AutoTokenizer

    from hafs.training import engine, hardware, model_loading, tokenize
    from hafs.training.loader import load_config
    from hafs.training.plan import resolve
    from hafs.training.precision import run_settings

    root = fixture.build_fixture(spec, cache)
    plan = resolve(load_config(fixture.write_config(spec, root)), "bench", [])
    tok = AutoTokenizer.from_pretrained(root / "model")
    prepared = tokenize.prepare_data(plan, tok, log=lambda *a, **k: None)
    settings = run_settings(plan, hardware.detect())
    model, tok = model_loading.load_model_and_tokenizer(plan, settings.device, settings.precision, settings,
                                                        log=lambda *a: None)
    model = model_loading.apply_lora(model, plan, settings)
    return model, settings, engine.BatchSource(prepared.train, plan, tok, settings)(0)


def switch(model, lever: str, on: bool, settings=None) -> None:
    """Install (on, with kernels' own patch functions) or remove (off) one lever."""
    from hafs.training import kernels, packed_linear

    if lever == "no_cudnn":
        settings.sdpa_cudnn = not on  # read by settings.attention_kernels() around forward and backward
        return
    if lever == "packed":
        if on and id(model) not in _packed:
            _packed[id(model)] = context = packed_linear.packed_weights(model)
            context.__enter__()
        elif not on and id(model) in _packed:
            _packed.pop(id(model)).__exit__(None, None, None)
        return
    if lever == "rotary":
        kernels.patch_rotary(model)
        if not on:
            for module in kernels.rotary_modules(model):
                module.apply_rotary_pos_emb = module.apply_rotary_pos_emb.keywords["_original"]
        return
    if on:
        kernels.patch_model(model, lora=lever == "lora", swiglu=lever == "swiglu", rms_norm=lever == "rms_norm")
        return
    target = {"lora": kernels.lora_forward, "swiglu": kernels.swiglu_mlp_forward,
              "rms_norm": kernels.rms_norm_forward}[lever]
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) is target:
            del module.forward  # back to the class's own forward


def run(model, settings, batches) -> float:
    """Seconds for forward + backward of `batches` (gradients dropped after)."""
    import torch

    from hafs.training.engine import plain_head
    from hafs.training.loss import causal_lm_loss

    torch.manual_seed(0)
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
    dtype = settings.torch_dtype(settings.autocast_dtype) if settings.autocast_dtype else None
    plain = plain_head(model)
    start = time.perf_counter()
    with settings.attention_kernels():  # as engine.train: around forward and backward (and any recompute)
        for b in batches:
            with settings.autocast():
                part, _ = causal_lm_loss(model, b, chunk_size=settings.loss_chunk_size, compute_dtype=dtype,
                                         plain=plain, bf16_softmax=settings.bf16_loss_softmax)
            (part / 1000).backward()
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the toy fixture (= --spec tiny)")
    ap.add_argument("--spec", choices=sorted(fixture.SPECS), default="", help="fixture (default: cpu)")
    ap.add_argument("--levers", default="", help=f"comma-separated, from {', '.join(LEVERS + ('no_cudnn',))} "
                                                 f"(default: the device's: {', '.join(LEVERS)} on a CPU, "
                                                 f"{', '.join(CUDA_LEVERS)} on CUDA)")
    ap.add_argument("--rounds", type=int, default=8, help="on/off pairs per lever")
    ap.add_argument("--batches", type=int, default=12, help="micro-batches per timing, spread over the epoch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--cache", type=Path, default=fixture.ROOT / ".cache" / "bench")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = fixture.SPECS[args.spec or ("tiny" if args.tiny else "cpu")]
    model, settings, epoch = load(spec, args.cache.resolve())
    cuda = settings.device.startswith("cuda")
    levers = [x for x in args.levers.split(",") if x] or list(CUDA_LEVERS if cuda else LEVERS)
    wrong = sorted(set(levers) - set(LEVERS + CUDA_LEVERS) | (set(levers) & set(CPU_ONLY if cuda else ("no_cudnn",))))
    if wrong:
        sys.exit(f"lever(s) {', '.join(wrong)} not measurable on {settings.device}; "
                 f"choose from {', '.join(CUDA_LEVERS if cuda else LEVERS)}")
    model.train()
    if not cuda:
        from hafs.training import packed_linear

        packed_linear.limit_primitive_cache(settings.onednn_cache_capacity)  # as engine.train, before any matmul
        switch(model, "packed", True)  # as engine.train has it: the other levers are measured with it on
    step = max(1, len(epoch) // args.batches)
    batches = [epoch[i] for i in range(0, len(epoch), step)][:args.batches]
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    print(f"{len(batches)} micro-batches ({tokens:,} tokens) x {args.rounds} rounds per side, "
          f"{torch.get_num_threads()} threads")
    run(model, settings, batches)  # warm-up: first-call allocations and kernel choices
    print(f"{'lever':10s} {'on (min / median s)':>22s} {'off (min / median s)':>22s}  on/off min  on/off median"
          "  paired median")
    engine_cudnn = settings.sdpa_cudnn  # run_settings' choice, restored after its lever
    for lever in levers:
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for on in (True, False):
                switch(model, lever, on, settings)
                times[on].append(run(model, settings, batches))
        switch(model, lever, lever != "no_cudnn" or not engine_cudnn, settings)  # back to the engine's own choice
        on, off = times[True], times[False]
        mid_on, mid_off = statistics.median(on), statistics.median(off)
        # Each round's on/off pair ran back to back: the median of their ratios is the least drift-prone.
        paired = statistics.median(a / b for a, b in zip(on, off))
        print(f"{lever:10s} {min(on):10.3f} / {mid_on:7.3f}   {min(off):10.3f} / {mid_off:7.3f}   "
              f"{min(on) / min(off):9.3f}  {mid_on / mid_off:12.3f}  {paired:13.3f}", flush=True)
    switch(model, "packed", False)  # close the packs now, not in the interpreter's teardown


if __name__ == "__main__":
    main()
