"""Evaluation on a tiny model: response-only loss, generations, before/after comparison, `hafs eval`.

Also home of the helpers the other post-training tests import (`trained_model_dir`, ...): a tiny
base model built once per session and a model folder made by hand like the recipe makes one.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from hafs.training import evaluate as ev  # noqa: E402
from hafs.training.errors import ConfigError  # noqa: E402
from hafs.training.loader import load_config  # noqa: E402
from hafs.training.plan import resolve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "training.toml"
TEXT_ROW = {"text": "LDA #$01 loads one into the accumulator."}


@pytest.fixture(autouse=True)
def _quiet_cpu(monkeypatch, tmp_path_factory):
    # Other processes share the CPU: one thread avoids OpenMP stalls. The token cache goes to tmp.
    monkeypatch.setenv("HAFS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hafs-cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_base(tmp_path_factory) -> Path:
    """A tiny Qwen2 + tokenizer, built once per test session (shared by the post-training test files)."""
    from hafs.training.demo import build_tiny_model

    out = tmp_path_factory.getbasetemp() / "tiny-base"
    if not (out / "model.safetensors").is_file():
        build_tiny_model(out, hidden_size=64, num_layers=2, vocab_size=512, embedding_std=0.1)
    return out


def write_dataset(folder: Path, *, val: int = 5, test: int = 4, text_row: bool = True) -> Path:
    """Alpaca rows taken from the shipped demo dataset; test gets a plain-text row first."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 4), ("val", val), ("test", test)):
        if n == 0:
            continue
        rows = (ROOT / "data" / "demo" / f"{split}.jsonl").read_text().splitlines()[:n]
        if split == "test" and text_row:
            rows.insert(0, json.dumps(TEXT_ROW))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def make_plan(base_dir: Path, data_dir: Path, models_dir: Path, **overrides):
    settings = {"expert.base_model": str(base_dir), "precision": "fp32", "batch_size": 2,
                "sequence_length": 256, "dataset.quality_threshold": 0.0, "dataset.domains": []}
    settings.update(overrides)
    plan = resolve(load_config(CONFIG), "demo", settings, check_hardware=False)
    plan.dataset_dir = str(data_dir)
    plan.output.models_dir = str(models_dir)
    return plan


def make_adapter_model(plan, scale: float = 0.5, seed: int = 0):
    """(peft model, tokenizer): the base with a LoRA whose B matrices are random, so it changes the output."""
    from hafs.training import model_loading

    model, tokenizer = model_loading.load_model_and_tokenizer(plan, "cpu", "fp32", log=lambda m: None)
    model = model_loading.apply_lora(model, plan)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.eval()
    return model, tokenizer


def trained_model_dir(tmp_path: Path, tmp_path_factory, *, name: str = "demo-asm-tiny-20250101", seed: int = 0,
                      created: str = "2025-01-01T10:00:00", extra: dict | None = None, **overrides):
    """A model folder as the recipe writes one (adapter, base config, tokenizer, metadata.json last)."""
    import datetime as dt

    from hafs.training import model_loading, outputs

    data_dir = write_dataset(tmp_path / "data")
    models_dir = tmp_path / "models"
    plan = make_plan(tiny_base(tmp_path_factory), data_dir, models_dir, **overrides)
    model, tokenizer = make_adapter_model(plan, seed=seed)
    out = models_dir / name
    model_loading.save_adapter(model, tokenizer, out)
    meta = outputs.build_metadata(
        plan, num_samples=4, duration_seconds=90.0, hardware_info={"cpu": "test"},
        created=dt.datetime.fromisoformat(created),
        extra={"training": {"final_loss": 2.5}, "losses": {"train": [[1, 3.0], [2, 2.5]], "eval": [[2, 2.75]]},
               **(extra or {})})
    outputs.atomic_write_json(out / "metadata.json", meta)
    return out, plan, model, tokenizer


def manual_loss(model, split) -> tuple[float, int]:
    """Cross-entropy over the scored tokens, one example at a time, without batching or packing."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(split)):
            ids, mask = split.example(i)
            x = torch.tensor(ids[None].astype(np.int64))
            logits = model(input_ids=x).logits[0, :-1].float()
            targets = x[0, 1:]
            keep = torch.tensor(mask[1:])
            total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count, count


# ----------------------------------------------------------------------------- scores

def test_overlap_scores_on_known_pairs():
    assert ev.words("LDA #$01, X") == ["lda", "#", "$", "01", ",", "x"]
    assert ev.token_f1("lda sta rts", "lda sta rts") == 1.0
    # 2 common of 3 predicted and 4 reference words: P=2/3, R=1/2, F1=4/7
    assert ev.token_f1("lda sta jmp", "lda rts sta nop") == pytest.approx(4 / 7)
    assert ev.token_f1("abc", "xyz") == 0.0 and ev.token_f1("", "") == 1.0 and ev.token_f1("", "a") == 0.0
    # LCS of (a b c d) and (a c b d) is 3: P = R = 3/4
    assert ev.rouge_l("a b c d", "a c b d") == pytest.approx(0.75)
    assert ev.rouge_l("d c b a", "a b c d") == pytest.approx(0.25)
    assert ev.exact_match(" LDA  #$01\n", "LDA #$01") == 1.0 and ev.exact_match("lda", "LDA") == 0.0
    assert ev.perplexity(2.0) == pytest.approx(math.e ** 2) and ev.perplexity(1e6) == float("inf")


def test_compare_reports_the_change():
    before = {"val": {"loss": 4.0, "perplexity": 54.6}, "test": None,
              "generation_scores": {"token_f1": 0.1, "rouge_l": 0.1, "exact_match": 0.0, "count": 2}}
    after = {"val": {"loss": 3.0, "perplexity": 20.1}, "test": None,
             "generation_scores": {"token_f1": 0.3, "rouge_l": 0.2, "exact_match": 0.0, "count": 2}}
    out = ev.compare(before, after)
    assert out["val"]["loss_change"] == -1.0 and out["val"]["loss_change_pct"] == -25.0 and out["val"]["improved"]
    assert "test" not in out and out["generation"]["token_f1"] == {"before": 0.1, "after": 0.3}
    assert ev.compare(None, after) == {}


def test_write_eval_of_one_result(tmp_path):
    result = {"val": {"loss": 2.0, "perplexity": 7.389, "tokens": 10, "examples": 2}, "test": None,
              "skipped": {"test": "no test split"}, "generation_scores": {"token_f1": 0.5, "count": 2},
              "generations": [{"split": "val", "prompt": "p1", "reference": "r1", "generated": "g1"},
                              {"split": "val", "prompt": "p2", "reference": "r2", "generated": "g2"}]}
    meta = ev.write_eval(tmp_path, result)
    assert "generations" not in meta and meta["val"] == result["val"] and meta["skipped"] == result["skipped"]
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == result
    lines = [json.loads(x) for x in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert [(g["when"], g["generated"]) for g in lines] == [("result", "g1"), ("result", "g2")]


# ----------------------------------------------------------------------------- on a model

def test_evaluate_model_scores_response_tokens_only_and_generates(tmp_path, tmp_path_factory):
    from hafs.training import data
    from hafs.training.tokenize import tokenize_split

    # Long enough for every row: the references are then the whole outputs.
    plan = make_plan(tiny_base(tmp_path_factory), write_dataset(tmp_path / "data"), tmp_path / "models",
                     sequence_length=1024)
    model, tokenizer = make_adapter_model(plan)
    raw = {s: data.read_split(plan, s) for s in ("val", "test")}
    val = tokenize_split(raw["val"], plan, tokenizer)
    lines = []
    result = ev.evaluate_model(model, tokenizer, plan, {"val": val, "test": raw["test"]}, generations=3,
                               max_new_tokens=8, log=lines.append)
    want_loss, want_tokens = manual_loss(model, val)
    assert result["val"]["tokens"] == want_tokens == val.stats.response_tokens
    assert result["val"]["loss"] == pytest.approx(want_loss, abs=1e-4)
    assert result["val"]["perplexity"] == pytest.approx(math.exp(want_loss), rel=1e-3)
    assert result["val"]["examples"] == 5 and result["test"]["examples"] == 5
    assert result["skipped"] == {} and lines == []
    # The text row (first in test) has no prompt: the 3 generations are the next 3 Alpaca rows.
    gens = result["generations"]
    assert [g["split"] for g in gens] == ["test"] * 3
    for g, sample in zip(gens, raw["test"].rows[1:4]):
        prompt, response = data.render(sample, plan.expert, tokenizer)
        assert g["prompt"] == prompt and g["reference"] == response
        assert len(tokenizer(g["generated"], add_special_tokens=False)["input_ids"]) <= 8 + 1
        assert g["token_f1"] == round(ev.token_f1(g["generated"], response), 4)
    assert result["generation_scores"]["count"] == 3
    assert result["generation_scores"]["rouge_l"] == pytest.approx(sum(g["rouge_l"] for g in gens) / 3, abs=1e-4)
    # Greedy: the same prompts give the same texts again.
    again = ev.evaluate_model(model, tokenizer, plan, {"val": None, "test": raw["test"]}, generations=3,
                              max_new_tokens=8, log=lines.append)
    assert [g["generated"] for g in again["generations"]] == [g["generated"] for g in gens]
    assert again["val"] is None and "val" in again["skipped"] and "no val split" in lines[0]


def test_half_precision_base_with_fp32_adapter_evaluates_under_autocast(tmp_path, tmp_path_factory):
    from hafs.training import model_loading
    from hafs.training.precision import RunSettings

    plan = make_plan(tiny_base(tmp_path_factory), write_dataset(tmp_path / "data"), tmp_path / "models")
    fp32_model, tokenizer = make_adapter_model(plan)
    model, _ = model_loading.load_model_and_tokenizer(plan, "cpu", "bf16", log=lambda m: None)
    model = model_loading.apply_lora(model, plan)
    model.load_state_dict({k: v for k, v in fp32_model.state_dict().items() if "lora_" in k}, strict=False)
    settings = RunSettings(device="cpu", precision="bf16", weight_dtype="bfloat16", autocast_dtype="bfloat16",
                           packing=True)
    from hafs.training import data

    splits = {"val": data.read_split(plan, "val"), "test": data.read_split(plan, "test")}
    half = ev.evaluate_model(model, tokenizer, plan, splits, generations=1, max_new_tokens=4, settings=settings)
    full = ev.evaluate_model(fp32_model, tokenizer, plan, splits, generations=0)
    assert next(model.get_base_model().parameters()).dtype == torch.bfloat16
    assert half["val"]["loss"] == pytest.approx(full["val"]["loss"], abs=0.05)
    assert len(half["generations"]) == 1


def test_training_shows_as_an_improvement_and_files_are_written(tmp_path, tmp_path_factory):
    from hafs.training import tokenize
    from hafs.training.loss import causal_lm_loss

    plan = make_plan(tiny_base(tmp_path_factory), write_dataset(tmp_path / "data", test=0), tmp_path / "models")
    model, tokenizer = make_adapter_model(plan, scale=0.0)  # a fresh adapter: B = 0
    prepared = tokenize.prepare_data(plan, tokenizer, log=lambda m: None)
    assert prepared.test is None
    lines = []
    evaluator = ev.Evaluator(plan, prepared, tokenizer, generations=2, max_new_tokens=4, log=lines.append)
    before = evaluator.run(model, "before")
    val_loss, tokens = evaluator.val_loss(model)
    assert val_loss == pytest.approx(before["val"]["loss"], abs=1e-5) and tokens == before["val"]["tokens"]

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    batches = ev.eval_batches(prepared.val, plan, tokenizer.pad_token_id)
    for _ in range(6):  # fit the val split itself: its loss must fall
        for b in batches:
            loss, n = causal_lm_loss(model, b)
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
    after = evaluator.run(model, "after")
    assert after["val"]["loss"] < before["val"]["loss"] - 0.05
    assert [g["split"] for g in after["generations"]] == ["val", "val"]  # no test split: val prompts

    out = tmp_path / "model"
    meta = evaluator.write(out, before, after)
    change = meta["comparison"]["val"]
    assert change["improved"] and change["loss_change"] == pytest.approx(after["val"]["loss"] - before["val"]["loss"])
    assert "generations" not in meta["after"] and meta["after"]["generation_scores"]["count"] == 2
    assert meta["files"] == {"results": "eval/results.json", "generations": "eval/generations.jsonl"}
    saved = json.loads((out / "eval" / "results.json").read_text())
    assert saved["after"]["val"] == after["val"] and saved["dataset"] == "demo"
    gen_lines = [json.loads(x) for x in (out / "eval" / "generations.jsonl").read_text().splitlines()]
    assert [g["when"] for g in gen_lines] == ["before", "before", "after", "after"]
    assert any("eval before: val loss" in x for x in lines) and any(x.startswith("eval: loss") for x in lines)


def test_evaluator_without_val_split_leaves_training_eval_off(tmp_path, tmp_path_factory):
    from hafs.training.tokenize import PreparedData

    plan = make_plan(tiny_base(tmp_path_factory), write_dataset(tmp_path / "data"), tmp_path / "models")
    evaluator = ev.Evaluator(plan, PreparedData(train=None, val=None, test=None), tokenizer=None)
    assert evaluator.val_loss is None


def _eval_args(model_dir, **kw):
    return argparse.Namespace(model_dir=str(model_dir), dataset=kw.get("dataset"), config=kw.get("config"),
                              json=kw.get("json", False), verbose=False)


def test_hafs_eval_reruns_on_a_model_dir_and_updates_metadata(tmp_path, tmp_path_factory, capsys):
    from hafs.training import data
    from hafs.training.cli import main
    from hafs.training.tokenize import tokenize_split

    model_dir, plan, model, tokenizer = trained_model_dir(tmp_path, tmp_path_factory)
    original = json.loads((model_dir / "metadata.json").read_text())
    assert main(["eval", str(model_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    val = tokenize_split(data.read_split(plan, "val"), plan, tokenizer)
    with_adapter, _ = manual_loss(model, val)
    with model.disable_adapter():
        base_only, _ = manual_loss(model, val)
    assert printed["after"]["val"]["loss"] == pytest.approx(with_adapter, abs=1e-4)
    assert printed["before"]["val"]["loss"] == pytest.approx(base_only, abs=1e-4)
    assert abs(with_adapter - base_only) > 1e-2  # the adapter matters, so the two are told apart

    meta = json.loads((model_dir / "metadata.json").read_text())
    rerun = meta["evaluation"]["reruns"]["demo"]
    assert rerun["after"]["val"]["loss"] == printed["after"]["val"]["loss"]
    assert rerun["files"]["results"] == "eval/demo/results.json"
    assert {k: v for k, v in meta.items() if k != "evaluation"} == \
        {k: v for k, v in original.items() if k != "evaluation"}
    assert len((model_dir / "eval" / "demo" / "generations.jsonl").read_text().splitlines()) == 6
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_hafs_eval_on_another_dataset_of_the_config(tmp_path, tmp_path_factory, capsys, monkeypatch):
    model_dir, plan, _, _ = trained_model_dir(tmp_path, tmp_path_factory)
    other = write_dataset(tmp_path / "other", val=2, test=0)
    config = tmp_path / "training.toml"
    config.write_text(CONFIG.read_text() + f'\n[datasets.other]\npath = "{other}"\n')
    assert ev.cmd_eval(_eval_args(model_dir, dataset="other", config=str(config))) == 0
    out = capsys.readouterr().out
    assert "no test split" in out and "with adapter: val loss" in out
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["evaluation"]["reruns"]["other"]["after"]["val"]["examples"] == 2
    assert meta["evaluation"]["reruns"]["other"]["after"]["test"] is None

    import hafs.training.generate as generate

    loads = []
    original = generate.load_trained_model
    monkeypatch.setattr(generate, "load_trained_model", lambda *a, **k: loads.append(a) or original(*a, **k))
    with pytest.raises(ConfigError, match="did you mean 'other'"):
        ev.cmd_eval(_eval_args(model_dir, dataset="othr", config=str(config)))
    assert loads == []  # refused before the model was loaded


def test_a_dataset_name_with_dots_and_slashes_stays_inside_the_model_folder(tmp_path, tmp_path_factory, capsys):
    """A TOML key may be any string: `[datasets."../../../escaped"]` is a configured dataset, so --dataset
    accepts it; the folder its results go to must still be one name inside eval/."""
    model_dir, _, _, _ = trained_model_dir(tmp_path, tmp_path_factory)
    other = write_dataset(tmp_path / "other", val=2, test=0)
    config = tmp_path / "training.toml"
    config.write_text(CONFIG.read_text() + f'\n[datasets."../../../escaped"]\npath = "{other}"\n')
    assert ev.cmd_eval(_eval_args(model_dir, dataset="../../../escaped", config=str(config))) == 0
    assert not (model_dir / "eval" / "../../../escaped").exists() and not (tmp_path / "escaped").exists()
    assert json.loads((model_dir / "eval" / "escaped" / "results.json").read_text())["dataset"] == "../../../escaped"
    rerun = json.loads((model_dir / "metadata.json").read_text())["evaluation"]["reruns"]["../../../escaped"]
    assert rerun["files"]["results"] == "eval/escaped/results.json"


def test_hafs_eval_on_a_folder_that_is_not_a_model(tmp_path):
    from hafs.training.cli import main

    (tmp_path / "half").mkdir()
    assert main(["eval", str(tmp_path / "half")]) == 2
    assert main(["eval", str(tmp_path / "missing")]) == 2
    shutil.rmtree(tmp_path / "half")
