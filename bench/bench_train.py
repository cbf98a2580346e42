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
import hashlib
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
FIXTURE_VERSION = "2"
"""Bump when the fixture recipe changes (cached fixtures are keyed by it and the spec)."""


@dataclass(frozen=True)
class Spec:
    """One benchmark configuration: model shape, data and training settings."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    train_rows: int
    val_rows: int
    median_tokens: int
    max_tokens: int
    seq: int
    batch: int = 4
    lr: float = 2e-4
    r: int = 8
    alpha: int = 8
    dropout: float = 0.05
    tokenizer_vocab: int = 16384
    init_std: float = 0.05
    embed_std: float = 0.1


SPECS = {
    # median_tokens is the generator's parameter; with the template and EOS the tokenized median is ~120.
    "cpu": Spec("cpu", 512, 8, 8, 2, 1536, 16384, 360, 40, 98, 1400, 1024),
    "tiny": Spec("tiny", 128, 2, 4, 2, 384, 4096, 96, 24, 45, 300, 256, tokenizer_vocab=4096),
    # Qwen2.5-Coder-1.5B: hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocab 151,936.
    "gpu": Spec("gpu", 1536, 28, 12, 2, 8960, 151936, 1200, 64, 98, 1400, 2048, init_std=0.02, embed_std=0.02),
    "gpu-small": Spec("gpu-small", 128, 2, 4, 2, 384, 151936, 48, 16, 60, 300, 512, tokenizer_vocab=4096),
}
ROWS_CPU = ["hafs", "earlier", "trl", "trl-nogc"]
# In order of importance (a time budget may cut the tail); hafs-fit needs trl's figure first.
ROWS_GPU = ["hafs", "trl", "hafs-fit", "trl-liger", "hafs-gc"]

# --------------------------------------------------------------------------- fixture

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["lda", "sta", "jsr", "rts", "sep", "rep"]
TEMPLATE = """Below is an instruction for 65816 assembly{context}. Write a response.

### Instruction:
{instruction}
{input_section}
### Response:
{output}"""


def lexicon(n: int, rng: random.Random) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def sentence(words, weights, n: int, rng: random.Random) -> str:
    """n words drawn from a Zipf distribution, with some punctuation and line breaks."""
    out = rng.choices(words, weights=weights, k=n)
    text, line = [], 0
    for w in out:
        text.append(w)
        line += 1
        if line > 8 and rng.random() < 0.15:
            text[-1] += rng.choice([".", ";", ":"]) + ("\n" if rng.random() < 0.3 else "")
            line = 0
    return " ".join(text).replace("\n ", "\n")


def target_lengths(spec: Spec, n: int, rng: random.Random) -> list[int]:
    """Long-tailed lengths: lognormal (sigma 0.74 gives p90 = 2.6 x median), one at the maximum."""
    out = [int(min(spec.max_tokens, max(24, math.exp(rng.gauss(math.log(spec.median_tokens), 0.74)))))
           for _ in range(n)]
    out[rng.randrange(n)] = spec.max_tokens
    return out


def make_rows(targets: dict, words, weights, tokens_per_word: float, rng: random.Random, head: int = 0) -> dict:
    """Alpaca rows whose token counts (template `head` included) approximate `targets`."""
    rows = {}
    for split, lengths in targets.items():
        rows[split] = []
        for length in lengths:
            words_total = max(8, round(max(8, length - head) / tokens_per_word))
            prompt_words = max(3, int(words_total * rng.uniform(0.2, 0.45)))
            has_input = rng.random() < 0.4
            instruction = sentence(words, weights, prompt_words // 2 if has_input else prompt_words, rng)
            input_text = sentence(words, weights, prompt_words - prompt_words // 2, rng) if has_input else ""
            output = sentence(words, weights, words_total - prompt_words, rng)
            rows[split].append({"instruction": instruction, "input": input_text, "output": output})
    return rows


def build_fixture(spec: Spec, cache: Path, log=print) -> Path:
    """Model directory, tokenizer and dataset for `spec` (built once, then reused)."""
    digest = hashlib.sha256((json.dumps(asdict(spec)) + FIXTURE_VERSION).encode()).hexdigest()[:10]
    root = cache / f"{spec.name}-{digest}"
    if (root / "done.json").exists():
        return root
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hafs.training import demo

    t0 = time.time()
    rng = random.Random(1234)
    words = lexicon(min(12000, spec.tokenizer_vocab - 600), rng)
    weights = [1.0 / (i + 1) ** 0.9 for i in range(len(words))]
    rng.shuffle(words)
    model_dir, data_dir = root / "model", root / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    targets = {split: target_lengths(spec, n, rng) for split, n in (("train", spec.train_rows),
                                                                     ("val", spec.val_rows))}
    rows = make_rows(targets, words, weights, 1.0, random.Random(1))
    # Tokenizer: Qwen2-style byte-level BPE (what transformers' Qwen2Tokenizer expects), trained on
    # the lexicon, the prompt template and the rows, so that most words are one token.
    corpus = [" ".join(words)] * 3 + [TEMPLATE] * 50 + [r["instruction"] + "\n" + r["input"] + "\n" + r["output"]
                                                        for r in rows["train"]]
    tok_json = demo._train_tokenizer(spec.tokenizer_vocab, corpus)
    (model_dir / "tokenizer.json").write_text(tok_json)
    special = {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                        "single_word": False} for i, t in enumerate((demo.EOS_TOKEN, demo.PAD_TOKEN))}
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": demo.EOS_TOKEN, "pad_token": demo.PAD_TOKEN,
        "unk_token": None, "bos_token": None, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": spec.seq * 2, "added_tokens_decoder": special}))
    # Calibrate: regenerate the rows with word counts scaled so token lengths hit the targets.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    head = len(tok(TEMPLATE.split("{output}")[0].format(context="", instruction="", input_section="")).input_ids)
    made = [len(tok(r["instruction"] + " " + r["input"] + " " + r["output"]).input_ids) for r in rows["train"]]
    ratio = sum(made) / sum(max(8, t) for t in targets["train"])  # tokens per generated word
    rows = make_rows(targets, words, weights, ratio, random.Random(1), head=head)
    for split in rows:
        with open(data_dir / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[split])
    config = Qwen2Config(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.mlp,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, max_position_embeddings=max(4096, spec.seq * 2),
                         tie_word_embeddings=True, use_sliding_window=False, rope_theta=1e6,
                         bos_token_id=0, eos_token_id=0, pad_token_id=1,
                         # Small models: larger than default init so that a frozen random model can
                         # express a sharp distribution and LoRA training visibly lowers the loss (see
                         # demo.DEMO_MODELS). The 1.5B shape keeps Qwen's 0.02 (28 layers would blow up).
                         initializer_range=spec.init_std)
    device = "cuda" if (spec.name == "gpu" and torch.cuda.is_available()) else "cpu"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0, spec.embed_std)
    if spec.name == "gpu":
        model = model.to(torch.bfloat16)  # 3 GB on disk instead of 6; every row loads the same weights
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    info = {"spec": asdict(spec), "seconds": round(time.time() - t0, 1)}
    (root / "done.json").write_text(json.dumps(info, indent=2))
    log(f"fixture {spec.name}: built in {info['seconds']} s")
    return root


def write_config(spec: Spec, root: Path) -> Path:
    """A training.toml for the hafs row: one preset with the benchmark's settings."""
    text = f'''
[hardware.bench]
name = "bench machine"
device = "auto"
available_memory_gb = 64
max_batch_size = 64
max_sequence_length = 8192
supports_bf16 = true
supports_fp16 = true
max_lora_rank = 64

[experts.bench]
display_name = "Bench"
base_model = "{root / 'model'}"
context_window = 8192
prompt_template = """{TEMPLATE}"""

[datasets.bench]
path = "{root / 'data'}"
train_split = "train.jsonl"
val_split = "val.jsonl"

[hyperparameters.bench]
num_epochs = 1
learning_rate = {spec.lr}
warmup_steps = 0
weight_decay = 0.0
lr_scheduler = "linear"
logging_steps = 10
save_steps = 0
eval_strategy = "no"
seed = 42

[lora.bench]
r = {spec.r}
lora_alpha = {spec.alpha}
lora_dropout = {spec.dropout}
target_modules = {json.dumps(TARGETS)}

[presets.bench]
expert = "bench"
hardware = "bench"
dataset = "bench"
hyperparameters = "bench"
lora = "bench"
sequence_length = {spec.seq}
batch_size = {spec.batch}
gradient_accumulation = 1
precision = "auto"
packing = false
'''
    path = root / "training.toml"
    path.write_text(text)
    return path


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
    profiler = _profiler(device, args.profile)
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
        _write_profile(profiler, device, seconds, state.step, flops * state.tokens / prepared.train.lengths.sum())
    return adapter_state(model), seconds, {"steps": state.step, "settings": settings.describe(), "cpu_seconds": cpu,
                                           "notes": notes,
                                           "tokens_seen": state.tokens,
                                           "flops": flops, "final_train_loss": state.last_loss(),
                                           "matmul_probes": probes}


def _profiler(device: str, on: bool):
    """torch.profiler over the hafs row's training (--profile), else nothing."""
    import contextlib

    if not on:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else []))


GEMM_OPS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::addmm_",
            "aten::addbmm")
"""The profiler's names for the CPU ops that are matrix products (their self time is the GEMM kernels')."""


def _write_profile(prof, device: str, seconds: float, steps: int, flops: float) -> None:
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


def adapter_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True).float() for k, v in get_peft_model_state_dict(model).items()}


def train_earlier(plan, prepared, tok, root, device):
    """The user's earlier trainer: pad to sequence_length, labels everywhere, fp32, HF Trainer."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    split, seq, pad = prepared.train, plan.sequence_length, tok.pad_token_id

    class Padded(torch.utils.data.Dataset):
        def __len__(self):
            return len(split)

        def __getitem__(self, i):
            ids = torch.full((seq,), pad, dtype=torch.long)
            ex = torch.from_numpy(split.example(i)[0].astype("int64"))
            ids[:len(ex)] = ex
            mask = torch.zeros(seq, dtype=torch.long)
            mask[:len(ex)] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}

    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    model = get_peft_model(model, lora_config(plan))
    args = TrainingArguments(output_dir=str(root / "runs" / "earlier"), per_device_train_batch_size=plan.batch_size,
                             num_train_epochs=1, learning_rate=plan.learning_rate, lr_scheduler_type="linear",
                             warmup_steps=0, weight_decay=0.0, logging_steps=10**6, save_strategy="no",
                             report_to=[], seed=42, use_cpu=device == "cpu", dataloader_num_workers=0,
                             disable_tqdm=True, max_steps=plan.max_steps or -1)
    seen = [0]

    def collate(examples):
        seen[0] += sum(int(e["attention_mask"].sum()) for e in examples)
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}

    trainer = Trainer(model=model, args=args, train_dataset=Padded(), data_collator=collate)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return adapter_state(model), seconds, {"settings": "fp32, padded to sequence_length, loss on all tokens",
                                           "cpu_seconds": cpu,
                                           "tokens_seen": seen[0]}


def lora_config(plan):
    from peft import LoraConfig

    return LoraConfig(r=plan.lora.r, lora_alpha=plan.lora.lora_alpha, lora_dropout=plan.lora.lora_dropout,
                      target_modules=list(plan.lora.target_modules), bias="none", task_type="CAUSAL_LM")


def train_trl(plan, spec, root, row, device):
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from hafs.training.templates import fill_template

    rows = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    data = Dataset.from_list([{"prompt": fill_template(TEMPLATE, r["instruction"], r["input"]),
                               "completion": r["output"]} for r in rows])
    extra = {}
    if row == "trl-nogc":
        extra["gradient_checkpointing"] = False
    if row == "trl-liger":
        extra["use_liger_kernel"] = True
    args = SFTConfig(output_dir=str(root / "runs" / row), per_device_train_batch_size=plan.batch_size,
                     num_train_epochs=1, learning_rate=plan.learning_rate, lr_scheduler_type="linear",
                     warmup_steps=0, weight_decay=0.0, max_length=plan.sequence_length, logging_steps=10**6,
                     save_strategy="no", report_to=[], seed=42, use_cpu=device == "cpu", disable_tqdm=True,
                     max_steps=plan.max_steps or -1, **extra)
    trainer = SFTTrainer(model=str(root / "model"), args=args, train_dataset=data, peft_config=lora_config(plan))
    seen, collator = [0], trainer.data_collator

    def counting(examples):
        seen[0] += sum(len(e["input_ids"]) for e in examples)
        return collator(examples)

    trainer.data_collator = counting
    if device == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    settings = (f"bf16={args.bf16}, gradient_checkpointing={args.gradient_checkpointing}, "
                f"packing={args.packing}, padding_free={args.padding_free}")
    return adapter_state(trainer.model), seconds, {"settings": settings, "tokens_seen": seen[0], "cpu_seconds": cpu}


def val_loss(plan, prepared, root, adapter: dict, device: str) -> float:
    """Mean CE per response token on val: the base model as saved (fp32 compute) + the row's adapter."""
    import gc

    import torch
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from hafs.training.batching import collate, plan_batches
    from hafs.training.engine import evaluate_loss

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, lora_config(plan))
    set_peft_model_state_dict(model, adapter)
    model.to(device)
    split = prepared.val
    rows = plan_batches(split.lengths, batch_size=4, sequence_length=plan.sequence_length, packing=False,
                        seed=0, epoch=0)
    batches = [collate(split, r, 1) for r in rows]
    loss, _ = evaluate_loss(model, batches)
    return loss


# --------------------------------------------------------------------------- driver

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
    print(f"machine: {_machine(device)}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
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
        Path(out, "bench_gpu.txt").write_text(f"machine: {_machine(device)}\n{text}\n")
        Path(out, "bench_gpu.json").write_text(json.dumps(results, indent=2))


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _machine(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


if __name__ == "__main__":
    main()
