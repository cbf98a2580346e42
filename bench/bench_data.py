"""hafs's data step vs the usual `datasets` way, on the same rows, tokenizer and machine (issue 4).

    python bench/bench_data.py                    # 100k rows: hafs and datasets, each cold then cached
    python bench/bench_data.py --rows 20000       # a smaller fixture
    python bench/bench_data.py --repeat 3         # median of 3 rounds (each round: fresh caches)
    python bench/bench_data.py --tokenizer DIR    # another tokenizer folder (e.g. a real model's)
    python bench/bench_data.py --check            # exit 1 if a target is missed or the outputs differ

Issue 4's target: 100k rows read, filtered, templated and tokenized in <= 30 s on 2 cores, and a
re-run with unchanged data and tokenizer served from a cache in <= 3 s.

The fixture (cached under .cache/bench/): `synthetic_rows`, Alpaca rows shaped like the user's
exports (~120 tokens median, a long tail, `_metadata` with a domain and a quality score), and the
demo's Qwen2-style byte-level BPE tokenizer (vocab 1024), the same rows and tokenizer that
tests/test_data.py::test_scale_100k_rows checks for correctness. Both pipelines keep quality >= 0.1
and domain "asm", fill the default Alpaca template, tokenize prompt and response separately, append
EOS, mask the prompt out of the loss and cut at sequence_length 1024:

  hafs      `tokenize.prepare_data(plan, tokenizer)`, with HAFS_CACHE_DIR in a fresh temp folder.
  datasets  what TRL / transformers users write: `load_dataset("json", ...)`, `.filter` (batched),
            `.map` to prompt/completion (batched), `.map(tokenize, batched=True)` with the same
            tokenizer (TRL's truncation: prompt + completion + EOS cut to max_length), with its
            cache in a fresh temp folder.

Every run is its own process (a re-run is a new process, as it is for a user); the tokenizer is
loaded and the modules imported before the clock starts. "cold" runs on an empty cache, "cached"
is the same command again. Figures: wall and CPU seconds (all threads of the process) of the data
step alone, rows read / wall second, the process's peak RSS, whether the run was served from its
cache, and a digest of the output (token ids, loss mask, lengths) that must be the same for every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_VERSION = "1"
"""Bump when the rows or the tokenizer change (cached fixtures are keyed by it)."""
SEQUENCE_LENGTH = 1024
QUALITY_THRESHOLD = 0.1
DOMAIN = "asm"
TOKENIZER_VOCAB = 1024
TARGET_COLD_S = 30.0
TARGET_CACHED_S = 3.0
PIPELINES = ("hafs", "datasets")


# --------------------------------------------------------------------------- fixture

def synthetic_rows(n: int, seed: int = 0):
    """Alpaca rows shaped like the user's exports: ~120 tokens median, long tail, _metadata.

    Row i has quality (i % 7) / 7 and domain "misc" when i % 10 == 0, else "asm"."""
    rng = np.random.default_rng(seed)
    words = ["LDA", "STA", "$7EF36D", "#$20", "SEP", "REP", "JSL", "RTS", "the", "player", "sprite", "routine",
             "health", "bank", "Link", "DMA", "VRAM", "loads", "stores", "and", "to", "of", "\n", ";", "$0F"]
    lengths = np.minimum(rng.lognormal(3.5, 0.7, size=n).astype(int) + 5, 1500)
    for i in range(n):
        w = rng.integers(0, len(words), size=int(lengths[i]) + 12)
        yield {"instruction": " ".join(words[j] for j in w[:12]), "input": "",
               "output": " ".join(words[j] for j in w[12:]), "text": "x",
               "_metadata": {"domain": "asm" if i % 10 else "misc", "quality_score": float(i % 7) / 7}}


def build_fixture(rows: int, seed: int, cache: Path, log=print) -> Path:
    """`cache/data-<rows>-s<seed>-v<version>/` holding data/train.jsonl and tokenizer/ (built once)."""
    root = cache / f"data-{rows}-s{seed}-v{FIXTURE_VERSION}"
    if (root / "done.json").exists():
        return root
    from hafs.training.demo import build_tiny_model

    t0 = time.time()
    (root / "data").mkdir(parents=True, exist_ok=True)
    with open(root / "data" / "train.jsonl", "w") as f:
        for row in synthetic_rows(rows, seed):
            f.write(json.dumps(row) + "\n")
    # The demo's Qwen2-style tokenizer, as tests/test_data.py's qwen2_style_tokenizer builds it (a tiny model
    # comes with it; only its tokenizer files are used).
    build_tiny_model(root / "tokenizer", vocab_size=TOKENIZER_VOCAB)
    (root / "done.json").write_text(json.dumps({"rows": rows, "seed": seed, "seconds": round(time.time() - t0, 1)}))
    log(f"fixture: {rows:,} rows and the tokenizer built in {time.time() - t0:.1f} s ({root})")
    return root


def write_config(folder: Path, data_dir: Path, tokenizer_dir: Path) -> Path:
    """A training.toml whose preset `bench` reads `data_dir` with the benchmark's filters."""
    text = f"""
[hardware.cpu]
name = "CPU"
device = "cpu"
max_batch_size = 8
max_sequence_length = 4096
supports_bf16 = true

[experts.e]
display_name = "E"
base_model = {json.dumps(str(tokenizer_dir))}
context_window = 4096

[lora.l]
r = 4

[hyperparameters.default]

[datasets.d]
path = {json.dumps(str(data_dir))}
quality_threshold = {QUALITY_THRESHOLD}
domains = [{json.dumps(DOMAIN)}]

[presets.bench]
expert = "e"
hardware = "cpu"
dataset = "d"
lora = "l"
sequence_length = {SEQUENCE_LENGTH}
"""
    path = folder / "training.toml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- workers (one process per run)

def digest(lengths: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> str:
    """What the output is, independent of how it is stored: lengths, token ids and loss mask."""
    h = hashlib.sha256()
    for a, dtype in ((lengths, "<i8"), (ids, "<i4"), (mask, "u1")):
        h.update(np.ascontiguousarray(a, dtype=dtype).tobytes())
    return h.hexdigest()[:16]


def output_figures(lengths: np.ndarray, ids: np.ndarray, mask: np.ndarray, eos: int) -> dict:
    ends = ids[np.cumsum(lengths) - 1]
    return {"examples": len(lengths), "tokens": int(len(ids)), "trained_tokens": int(mask.sum()),
            "lengths": [int(v) for v in np.percentile(lengths, [50, 90, 99], method="nearest")] + [int(lengths.max())],
            "cut": int((ends != eos).sum()), "digest": digest(lengths, ids, mask)}


def run_hafs(config: Path, tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from hafs.training.loader import load_config
    from hafs.training.plan import resolve
    from hafs.training.tokenize import prepare_data

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    plan = resolve(load_config(config), "bench")
    t0, c0 = time.perf_counter(), time.process_time()
    prepared = prepare_data(plan, tok, log=lambda *a, **k: None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    split = prepared.train
    out = {"wall": wall, "cpu": cpu, "peak_rss_gb": _peak_rss_gb(), "read": split.raw.read,
           "cache_hit": split.cache_hit}
    return out | output_figures(split.lengths, split.input_ids, split.label_mask, tok.eos_token_id)


def run_datasets(data_dir: Path, tokenizer_dir: Path, cache_dir: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer

    from hafs.training.templates import DEFAULT_PROMPT_TEMPLATE, fill_template

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos, max_length = tok.eos_token_id, SEQUENCE_LENGTH

    def keep(batch):
        return [m["quality_score"] >= QUALITY_THRESHOLD and m["domain"] == DOMAIN for m in batch["_metadata"]]

    def to_prompt(batch):
        return {"prompt": [fill_template(DEFAULT_PROMPT_TEMPLATE, i, x) for i, x in zip(batch["instruction"],
                                                                                        batch["input"])],
                "completion": batch["output"]}

    def tokenize(batch):
        prompts = tok(batch["prompt"], add_special_tokens=False)["input_ids"]
        completions = tok(batch["completion"], add_special_tokens=False)["input_ids"]
        ids, masks = [], []
        for p, c in zip(prompts, completions):
            ids.append((p + c + [eos])[:max_length])
            masks.append(([0] * len(p) + [1] * (len(c) + 1))[:max_length])
        return {"input_ids": ids, "completion_mask": masks}

    before = set(cache_dir.rglob("*.arrow"))
    t0, c0 = time.perf_counter(), time.process_time()
    ds = datasets.load_dataset("json", data_files=str(data_dir / "train.jsonl"), split="train",
                               cache_dir=str(cache_dir))
    read = len(ds)
    ds = ds.filter(keep, batched=True)
    ds = ds.map(to_prompt, batched=True, remove_columns=ds.column_names)
    ds = ds.map(tokenize, batched=True, remove_columns=["prompt", "completion"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss, written = _peak_rss_gb(), len(set(cache_dir.rglob("*.arrow")) - before)
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    ids_col, mask_col = table.column("input_ids").combine_chunks(), table.column("completion_mask").combine_chunks()
    lengths = pc.list_value_length(ids_col).to_numpy().astype(np.int64)
    ids = ids_col.flatten().to_numpy().astype(np.int32)
    mask = mask_col.flatten().to_numpy().astype(bool)
    out = {"wall": wall, "cpu": cpu, "peak_rss_gb": rss, "read": read, "cache_hit": written == 0,
           "cache_files_written": written}
    return out | output_figures(lengths, ids, mask, eos)


def worker(args) -> dict:
    run_dir = Path(args.run_dir)
    if args.worker == "hafs":
        return run_hafs(run_dir / "training.toml", Path(args.tokenizer))
    return run_datasets(Path(args.data), Path(args.tokenizer), run_dir / "hf-datasets")


def _peak_rss_gb() -> float:
    """The process's peak RSS so far (taken right after the data step, before the output is hashed)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


# --------------------------------------------------------------------------- driver

def run_child(pipeline: str, run_dir: Path, data_dir: Path, tokenizer_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", pipeline, "--run-dir", str(run_dir), "--data", str(data_dir),
           "--tokenizer", str(tokenizer_dir)]
    env = dict(os.environ, HAFS_CACHE_DIR=str(run_dir / "hafs-cache"),
               HF_DATASETS_CACHE=str(run_dir / "hf-datasets"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-6:]}
    return json.loads(lines[-1][len("RESULT "):])


def summarize(runs: list[dict]) -> dict:
    """The first run's figures with the median wall / CPU seconds of all of them (rounds of --repeat)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    out["wall"] = statistics.median(r["wall"] for r in ok)
    out["cpu"] = statistics.median(r["cpu"] for r in ok)
    out["cache_hit"] = all(r["cache_hit"] for r in ok)
    out["walls"] = [r["wall"] for r in ok]
    out["digests"] = sorted({r["digest"] for r in ok})
    return out


def table(results: dict, rows: int) -> tuple[str, bool]:
    """The printed table, and whether every target is met and every output the same."""
    head = (f"{'pipeline':<10} {'run':<7} {'rows read':>10} {'examples':>9} {'wall s':>8} {'CPU s':>8} "
            f"{'rows/s':>10} {'peak RSS':>9}  cache")
    lines = [head]
    for (name, phase), r in results.items():
        if "error" in r:
            lines.append(f"{name:<10} {phase:<7} ERROR: " + " | ".join(r["error"][-3:]))
            continue
        cache = "hit" if r["cache_hit"] else (
            "miss" + (f" ({r['cache_files_written']} cache files written)" if "cache_files_written" in r else ""))
        rounds = f"; wall per round {' / '.join(f'{w:.2f}' for w in r['walls'])}" if len(r["walls"]) > 1 else ""
        lines.append(f"{name:<10} {phase:<7} {r['read']:>10,} {r['examples']:>9,} {r['wall']:>8.2f} "
                     f"{r['cpu']:>8.2f} {r['read'] / r['wall']:>10,.0f} {r['peak_rss_gb']:>6.2f} GB  {cache}{rounds}")
    ok = {k: r for k, r in results.items() if "error" not in r}
    good = len(ok) == len(results)
    lines.append("")
    h_cold, h_cached = ok.get(("hafs", "cold")), ok.get(("hafs", "cached"))
    for name in PIPELINES[1:]:
        p_cold, p_cached = ok.get((name, "cold")), ok.get((name, "cached"))
        if h_cold and p_cold:
            lines.append(f"hafs vs {name}: cold {p_cold['wall'] / h_cold['wall']:.2f}x faster "
                         f"({h_cold['wall']:.2f} vs {p_cold['wall']:.2f} s wall), "
                         f"{p_cold['cpu'] / h_cold['cpu']:.2f}x less CPU "
                         f"({h_cold['cpu']:.2f} vs {p_cold['cpu']:.2f} s)")
        if h_cached and p_cached:
            note = "" if p_cached["cache_hit"] else f" ({name} re-ran part of its work: its cache missed)"
            lines.append(f"hafs vs {name}: cached {p_cached['wall'] / h_cached['wall']:.2f}x faster "
                         f"({h_cached['wall']:.2f} vs {p_cached['wall']:.2f} s wall), "
                         f"{p_cached['cpu'] / h_cached['cpu']:.2f}x less CPU{note}")
    digests = sorted({d for r in ok.values() for d in r["digests"]})
    if len(digests) == 1:
        lines.append(f"outputs: every run produced the same token ids, loss masks and lengths (digest {digests[0]})")
    else:
        good = False
        lines.append("outputs DIFFER: " + "; ".join(f"{n} {p}: {', '.join(r['digests'])}" for (n, p), r in ok.items()))
    cores = os.cpu_count()
    where = "" if rows == 100_000 else "; the target is for 100,000"
    where += "" if cores == 2 else f"; this machine has {cores} cores, the target is stated for 2"
    lines.append(f"issue 4 target ({rows:,} rows{where}):")
    for phase, limit, r in (("cold", TARGET_COLD_S, h_cold), ("cached re-run", TARGET_CACHED_S, h_cached)):
        if r is None:
            lines.append(f"  {phase} <= {limit:g} s: not measured")
            good = False
            continue
        met = r["wall"] <= limit and (phase == "cold" or r["cache_hit"])
        good &= met
        lines.append(f"  {phase} <= {limit:g} s: {r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU"
                     + ("" if phase == "cold" else f", cache {'hit' if r['cache_hit'] else 'MISSED'}")
                     + f": {'met' if met else 'MISSED'}")
    if h_cold:
        p50, p90, p99, top = h_cold["lengths"]
        lines.append(f"output: {h_cold['examples']:,} examples, {h_cold['tokens']:,} tokens "
                     f"({h_cold['trained_tokens']:,} trained on); "
                     f"length p50 {p50} / p90 {p90} / p99 {p99} / max {top}; "
                     f"{h_cold['cut']} cut at {SEQUENCE_LENGTH} tokens")
    return "\n".join(lines), good


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="rows in the fixture (default 100,000)")
    ap.add_argument("--seed", type=int, default=0, help="the generator's seed")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (each with fresh caches); the median is shown")
    ap.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated: hafs,datasets")
    ap.add_argument("--tokenizer", type=Path, help="a tokenizer folder instead of the fixture's")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench", help="where the fixture is kept")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed or the outputs differ")
    ap.add_argument("--worker", choices=PIPELINES, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    pipelines = [p for p in args.pipelines.split(",") if p]
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        ap.error(f"unknown pipelines {unknown}; choose from {', '.join(PIPELINES)}")
    fixture = build_fixture(args.rows, args.seed, args.cache.resolve())
    tokenizer_dir = (args.tokenizer or fixture / "tokenizer").resolve()
    load = os.getloadavg()
    print(f"machine: {_machine()}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"fixture: {args.rows:,} rows ({fixture / 'data' / 'train.jsonl'}); tokenizer {tokenizer_dir}", flush=True)
    runs: dict[tuple[str, str], list[dict]] = {(p, phase): [] for p in pipelines for phase in ("cold", "cached")}
    for rnd in range(args.repeat):
        for pipeline in pipelines:
            with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
                run_dir = Path(tmp)
                write_config(run_dir, fixture / "data", tokenizer_dir)
                for phase in ("cold", "cached"):
                    r = run_child(pipeline, run_dir, fixture / "data", tokenizer_dir)
                    runs[(pipeline, phase)].append(r)
                    hit = "hit" if r.get("cache_hit") else "miss"
                    figures = ("ERROR " + r["error"][-1] if "error" in r else
                               f"{r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU, cache {hit}")
                    print(f"  round {rnd + 1}: {pipeline} {phase}: {figures}", flush=True)
    text, good = table({k: summarize(v) for k, v in runs.items()}, args.rows)
    print(text)
    if args.check and not good:
        sys.exit(1)


def _machine() -> str:
    from probes import cpu_name  # this folder is on sys.path when the script runs (not when a test imports it)

    return f"{cpu_name()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
