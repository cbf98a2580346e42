"""The benchmark's fixture: specs, a generated Alpaca dataset with long-tailed lengths, a byte-level
BPE tokenizer trained on it, a random-init Qwen2 model (cached under .cache/bench/), and the
training.toml the hafs row trains from. bench_train.py and bench_levers.py build theirs here.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
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

