"""The offline demo fixture: tiny Qwen2 models built locally, the demo cache, the shipped dataset."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from hafs.training import demo
from hafs.training.demo import (
    DEMO_DATA_DIR,
    EOS_TOKEN,
    PAD_TOKEN,
    build_demo_model,
    build_tiny_model,
    llama_cpp_pre_tokenizer,
    resolve_demo_model,
)
from hafs.training.errors import ConfigError

SNIPPET = "Hook:\n    REP #$30          ; 16-bit A, X, Y\n    LDA.l $7EF360,X\n    JSL $0DBA71\n    RTL\n"
DOMAINS = ("asm", "debugging", "yaze")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HAFS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- the tiny model
def test_same_arguments_give_byte_identical_files(tmp_path, tiny):
    again = build_tiny_model(tmp_path / "again")
    names = sorted(p.name for p in tiny.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(names)
    for name in names:
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name


def test_seed_changes_the_weights_but_not_the_tokenizer(tmp_path, tiny):
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()


def test_building_does_not_disturb_the_callers_rng(tmp_path):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", hidden_size=32, intermediate_size=64, vocab_size=300)
    assert torch.equal(torch.rand(3), expected)


def test_loads_with_auto_classes_and_gives_vocab_sized_logits(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.vocab_size % 64 == 0 and len(tok) <= model.config.vocab_size < len(tok) + 64
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    ids = tok(SNIPPET, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trips_65816_code(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    ids = tok(SNIPPET)["input_ids"]
    assert tok.decode(ids) == SNIPPET
    assert len(ids) < 0.6 * len(SNIPPET)  # trained on assembly: merges, not a token per byte
    unusual = "Zelda's ü, 日本, 🎮 and\ttabs"
    assert tok.decode(tok(unusual)["input_ids"]) == unusual  # byte-level: nothing is unknown


def test_auto_tokenizer_encodes_exactly_like_tokenizer_json(tiny):
    """transformers 5 rebuilds a qwen2 model's tokenizer around tokenizer.json's vocabulary; it must match."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    raw = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    texts = demo.tokenizer_corpus() + [SNIPPET, "  leading spaces", f"a{EOS_TOKEN}b{PAD_TOKEN}"]
    mismatched = [t[:40] for t in texts if tok(t)["input_ids"] != raw.encode(t).ids]
    assert mismatched == []


def test_eos_and_pad_are_distinct_and_agree_with_the_configs(tiny):
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny)
    config = json.loads((tiny / "config.json").read_text())
    gen = GenerationConfig.from_pretrained(tiny)
    assert (tok.eos_token, tok.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    assert tok.eos_token_id != tok.pad_token_id
    assert config["eos_token_id"] == gen.eos_token_id == tok.eos_token_id
    assert config["pad_token_id"] == gen.pad_token_id == tok.pad_token_id
    assert tok("LDA #$10")["input_ids"][-1] != tok.eos_token_id  # no special tokens added on encode
    assert tok(EOS_TOKEN)["input_ids"] == [tok.eos_token_id]


def test_pre_tokenizer_is_qwen2s(tiny, tmp_path):
    from transformers.models.qwen2 import tokenization_qwen2

    assert demo.QWEN2_SPLIT == tokenization_qwen2.PRETOKENIZE_REGEX
    assert llama_cpp_pre_tokenizer(tiny) == "qwen2"
    changed = json.loads((tiny / "tokenizer.json").read_text())
    changed["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(changed))
    assert llama_cpp_pre_tokenizer(tmp_path) is None
    assert llama_cpp_pre_tokenizer(tmp_path / "missing") is None


def test_tokenizer_dir_reuses_a_tokenizer_and_sets_the_embedding_rows(tmp_path, tiny):
    from transformers import AutoConfig

    reused = build_tiny_model(tmp_path / "r", tokenizer_dir=tiny, vocab_size=1100)
    assert (reused / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    assert AutoConfig.from_pretrained(reused).vocab_size == 1152  # 1100 rounded up to 64
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_tiny_model(tmp_path / "small", tokenizer_dir=tiny, vocab_size=100)


def test_embedding_std_sets_the_embedding_scale(tmp_path):
    from safetensors.torch import load_file

    built = build_tiny_model(tmp_path / "m", vocab_size=300, embedding_std=0.1)
    weights = load_file(built / "model.safetensors")
    assert 0.09 < weights["model.embed_tokens.weight"].std().item() < 0.11
    assert weights["model.layers.0.mlp.up_proj.weight"].std().item() < 0.03


# ---------------------------------------------------------------- the demo model and its cache
def test_demo_model_is_built_once_and_reused(cache):
    first = build_demo_model()
    assert first == cache / "demo" / f"tiny-qwen2-{demo.DEMO_VERSION}"
    weights = first / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    os.utime(weights, ns=(mtime - 10**9, mtime - 10**9))  # so a rebuild could not keep the same mtime
    assert build_demo_model() == first
    assert weights.stat().st_mtime_ns == mtime - 10**9
    stamp = json.loads((first / demo.STAMP).read_text())
    assert stamp["shape"]["hidden_size"] == demo.DEMO_MODELS["tiny-qwen2"].hidden_size
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary folders left


def test_demo_model_is_larger_than_the_test_model_and_trains_on_cpu(cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_demo_model()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 < n_params < 2_000_000
    assert len(tok) > 1500
    ids = tok(SNIPPET, return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_stale_demo_model_is_replaced(cache):
    first = build_demo_model()
    stamp = json.loads((first / demo.STAMP).read_text())
    stamp["version"] = "v0"
    (first / demo.STAMP).write_text(json.dumps(stamp))
    again = build_demo_model()
    assert again == first and json.loads((again / demo.STAMP).read_text())["version"] == demo.DEMO_VERSION
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_interrupted_build_leaves_nothing_behind(cache, monkeypatch):
    def explode(out_dir, **shape):
        (Path(out_dir) / "config.json").write_text("{}")  # half written, then killed
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "build_tiny_model", explode)
    with pytest.raises(KeyboardInterrupt):
        build_demo_model()
    assert list((cache / "demo").iterdir()) == []


def test_explicit_cache_dir_wins_over_the_environment(cache, tmp_path):
    path = build_demo_model(tmp_path / "elsewhere")
    assert path.parent == tmp_path / "elsewhere" / "demo"
    assert not (cache / "demo").exists()


def test_resolve_demo_model(cache):
    assert resolve_demo_model("Qwen/Qwen2.5-Coder-1.5B") is None
    assert resolve_demo_model("/models/hafs-demo/tiny-qwen2") is None
    assert resolve_demo_model("hafs-demo/tiny-qwen2") == cache / "demo" / f"tiny-qwen2-{demo.DEMO_VERSION}"
    with pytest.raises(ConfigError) as err:
        resolve_demo_model("hafs-demo/tiny-qwen")
    assert "did you mean 'tiny-qwen2'" in str(err.value) and "hafs-demo/tiny-qwen2" in str(err.value)


# ---------------------------------------------------------------- the shipped dataset
def _rows(split: str) -> list[dict]:
    lines = (DEMO_DATA_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _meta(row: dict) -> dict:
    return row.get("_metadata", {})


# Documented in data/demo/README.md: rows, per domain (None: no _metadata), chat rows,
# quality < 0.5, quality == 0.5, and what [datasets.demo] keeps.
EXPECTED = {
    "train": dict(rows=300, domains={"asm": 189, "debugging": 54, "yaze": 39, "lore": 16, None: 2}, chat=12,
                  low=24, half=10, kept=260, kept_domains={"asm": 173, "debugging": 50, "yaze": 35, None: 2}),
    "val": dict(rows=40, domains={"asm": 23, "debugging": 9, "yaze": 5, "lore": 3}, chat=2, low=3, half=2,
                kept=34, kept_domains={"asm": 21, "debugging": 8, "yaze": 5}),
    "test": dict(rows=40, domains={"asm": 29, "debugging": 7, "yaze": 1, "lore": 3}, chat=2, low=3, half=2,
                 kept=34, kept_domains={"asm": 27, "debugging": 6, "yaze": 1}),
}


@pytest.mark.parametrize("split", sorted(EXPECTED))
def test_demo_dataset_counts(split):
    from collections import Counter

    rows, want = _rows(split), EXPECTED[split]
    kept = [r for r in rows
            if _meta(r).get("quality_score", 1.0) >= 0.5 and _meta(r).get("domain", "asm") in DOMAINS]
    assert len(rows) == want["rows"]
    assert dict(Counter(_meta(r).get("domain") for r in rows)) == want["domains"]
    assert sum("messages" in r for r in rows) == want["chat"]
    assert sum(_meta(r).get("quality_score", 1.0) < 0.5 for r in rows) == want["low"]
    assert sum(_meta(r).get("quality_score") == 0.5 for r in rows) == want["half"]
    assert len(kept) == want["kept"]
    assert dict(Counter(_meta(r).get("domain") for r in kept)) == want["kept_domains"]


def test_demo_rows_have_the_exporters_shape():
    rows = [r for split in EXPECTED for r in _rows(split)]
    ids = [_meta(r)["sample_id"] for r in rows if "_metadata" in r]
    assert len(ids) == len(set(ids))
    prompts = [(r["instruction"], r.get("input", "")) for r in rows if "instruction" in r]
    assert len(prompts) == len(set(prompts))  # no duplicate questions, so none leak from train to test
    for r in rows:
        assert isinstance(r["text"], str) and r["text"]
        if "_metadata" in r:
            assert set(r["_metadata"]) == {"sample_id", "domain", "source", "quality_score"}
        if "messages" in r:
            assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        else:
            assert r["instruction"] and r["output"] and r["output"] in r["text"]
    assert any("input" not in r for r in rows if "instruction" in r)
    assert any(r.get("input") for r in rows)


def test_demo_answers_are_computed_correctly():
    """LoROM rows state the right PC offset; disassembly rows list exactly the input bytes."""
    import re

    checked = 0
    good = [r for split in EXPECTED for r in _rows(split)
            if "instruction" in r and _meta(r).get("quality_score", 1.0) >= 0.5]
    for r in good:
        m = re.match(r"Convert the LoROM address \$([0-9A-F]{2}):([0-9A-F]{4}) to a PC", r["instruction"])
        if m:
            bank, addr = int(m[1], 16), int(m[2], 16)
            assert f"= ${(bank & 0x7F) * 0x8000 + addr - 0x8000:06X}." in r["output"]
            checked += 1
        if _meta(r).get("source") == "template:disassemble":
            listed = [b for line in r["output"].split("```")[1].strip().splitlines()
                      for b in re.findall(r"\b[0-9A-F]{2}\b", line[:12])]
            assert " ".join(listed) == r["input"].splitlines()[0]
            checked += 1
    assert checked > 20


def test_demo_files_match_the_generator():
    script = DEMO_DATA_DIR.parents[1] / "scripts" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0


def test_a_cache_folder_that_is_a_file_stops_the_dry_run_with_the_reason(tmp_path, monkeypatch):
    """The demo model must be stored to be loaded: the dry run says why it cannot be, before training."""
    from hafs.training.dryrun import dry_run
    from hafs.training.loader import load_config

    blocker = tmp_path / "afile"
    blocker.write_text("")
    monkeypatch.setenv("HAFS_CACHE_DIR", str(blocker))
    report = dry_run(load_config(Path(__file__).resolve().parents[1] / "config" / "training.toml"), "demo")
    assert not report.ok
    assert any(p.key == "HAFS_CACHE_DIR" and "is a file, not a folder" in p.message for p in report.problems)


def test_dry_run_reports_data_the_tokenizer_leaves_empty_instead_of_estimating():
    """A tokenizer that is there but leaves no sample to train on is a problem, not 'not available offline'."""
    from hafs.training.dryrun import dry_run
    from hafs.training.loader import load_config

    report = dry_run(load_config(Path(__file__).resolve().parents[1] / "config" / "training.toml"), "demo",
                     ["sequence_length=48"])
    assert not report.ok and not any("not available offline" in n for n in report.notes)
    (problem,) = [p for p in report.problems if "samples of the train split were dropped: their prompts" in p.message]
    assert problem.key in ("presets.demo.sequence_length", "--set sequence_length")  # the override is to blame
    assert "training tokens (est.)" not in report.numbers
