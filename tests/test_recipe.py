"""The seed's promise end to end: ConfigTrainer.train(preset) → a complete model directory.

One short real run on a tiny model and the shipped demo data; every assertion is about what a user
gets: the files, metadata.json in the seed's shape, a second run that does not overwrite the first,
and an adapter that a fresh process loads with plain peft and that changes the model's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hafs.training.config_trainer import ConfigTrainer
from hafs.training.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SEED_KEYS = {
    "expert": {"name", "role", "group", "specialization"},
    "model": {"base", "lora_rank", "lora_alpha"},
    "training": {"dataset", "num_samples", "num_epochs", "batch_size", "gradient_accumulation", "learning_rate",
                 "sequence_length", "duration_seconds", "duration_minutes"},
    "hardware": {"name", "device", "fp16", "bf16"},
    "metadata": {"created", "git_commit"},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from hafs.training.demo import build_tiny_model

    root = tmp_path_factory.mktemp("recipe")
    model = build_tiny_model(root / "base")
    config = root / "training.toml"
    config.write_text(f"""
[hardware.cpu]
name = "CPU"
device = "cpu"
available_memory_gb = 8
max_batch_size = 8
max_sequence_length = 512
supports_bf16 = false

[experts.oracle-tiny-asm]
display_name = "Oracle: Tiny Asm"
role = "asm"
group = "tests"
base_model = "{model}"
context_window = 2048
specialization = "65816 for tests"

[lora.small]
r = 4
lora_alpha = 8
lora_dropout = 0.0

[hyperparameters.short]
max_steps = 12
learning_rate = 5e-3
logging_steps = 4
eval_strategy = "steps"
eval_steps = 6

[datasets.demo]
path = "{REPO / 'data' / 'demo'}"
quality_threshold = 0.5
domains = ["asm", "debugging", "yaze"]

[presets.tiny]
expert = "oracle-tiny-asm"
hardware = "cpu"
dataset = "demo"
hyperparameters = "short"
lora = "small"
sequence_length = 256
batch_size = 4

[output]
models_dir = "models"
checkpoints_dir = "ckpt"
logs_dir = "logs"
name_template = "oracle-{{name}}-{{role}}-{{base_short}}-{{date}}"
""")
    trainer = ConfigTrainer(config, log=lambda *a: None)
    first = trainer.train("tiny", evaluate=False)
    plan = trainer.build_training_config("tiny")
    plan.learning_rate = 1e-3  # the seed's programmatic example: edit, then train_with_config
    second = trainer.train_with_config(plan, evaluate=False)
    return {"root": root, "model": model, "first": first, "second": second}


def test_model_directory_has_the_seeds_layout(trained):
    out = trained["first"]
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json",
            "tokenizer_config.json", "metadata.json", "loss_curve.png"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert out.parent == trained["root"] / "models"
    assert out.name.startswith("oracle-tiny-asm-asm-base-")  # {name} drops "oracle-", base_short from the path


def test_metadata_has_the_seeds_shape_and_true_values(trained):
    meta = json.loads((trained["first"] / "metadata.json").read_text())
    for section, keys in SEED_KEYS.items():
        assert keys <= set(meta[section]), section
    assert meta["expert"]["name"] == "Oracle: Tiny Asm" and meta["expert"]["role"] == "asm"
    assert meta["model"] == {**meta["model"], "base": str(trained["model"]), "lora_rank": 4, "lora_alpha": 8}
    t = meta["training"]
    assert t["dataset_samples"] == 260  # the demo's train split after its quality and domain filters
    # 12 steps of 4 rows end inside the first epoch: what the run trained on, not the split's size
    assert 0 < t["num_samples"] < 260 and 0 < t["num_epochs"] < 1
    assert t["sequence_length"] == 256 and t["batch_size"] == 4 and t["learning_rate"] == 5e-3
    assert t["optimizer_steps"] == 12 and t["tokens_trained"] > 0
    assert meta["hardware"]["device"] == "cpu" and meta["hardware"]["bf16"] is False
    losses = [loss for _, loss in meta["losses"]["train"]]
    assert len(losses) == 12 and losses[-1] < losses[0]  # it learned
    assert meta["losses"]["eval"] and meta["config"]["preset"] == "tiny"


def test_second_run_the_same_day_gets_a_new_name(trained):
    first, second = trained["first"], trained["second"]
    assert second != first and second.name == first.name + "-2"
    assert json.loads((second / "metadata.json").read_text())["training"]["learning_rate"] == 1e-3
    assert json.loads((first / "metadata.json").read_text())["training"]["learning_rate"] == 5e-3
    assert not list((trained["root"] / "models").glob(".staging-*"))


def test_adapter_loads_with_plain_peft_in_a_fresh_process_and_changes_the_output(trained):
    code = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained({str(trained['model'])!r})
ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
with torch.no_grad():
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, {str(trained['first'])!r})
    after = model(ids).logits
print("DIFF", (after - before).abs().max().item())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    diff = float(out.stdout.split("DIFF")[1])
    assert diff > 1e-3


def test_edited_plan_is_revalidated_before_anything_loads(trained):
    trainer = ConfigTrainer(trained["root"] / "training.toml", log=lambda *a: None)
    plan = trainer.build_training_config("tiny")
    plan.batch_size = 64
    with pytest.raises(ConfigError, match="max_batch_size"):
        trainer.train_with_config(plan)


def _tiny_plan_config(root: Path, model, data: Path) -> Path:
    from conftest import tiny_config

    return tiny_config(root, model, preset="t", hyperparameters="max_steps = 2", hyperparameters_name="h", data=data)


@pytest.mark.parametrize("files, missing", [
    ((), "no config.json, no tokenizer files (tokenizer.json or tokenizer.model), no *.safetensors weights"),
    (("config.json", "tokenizer.json"), "no *.safetensors weights"),
])
def test_a_base_model_folder_that_is_not_a_model_stops_the_dry_run_and_the_run_before_loading(
        tmp_path, files, missing):
    from hafs.training.dryrun import dry_run
    from hafs.training.errors import HardwareError
    from hafs.training.loader import load_config

    folder = tmp_path / "not-a-model"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("{}")
    config = _tiny_plan_config(tmp_path, folder, REPO / "data" / "demo")
    cfg = load_config(config)
    report = dry_run(cfg, "t")
    assert not report.ok and "Ready to train" not in report.render()
    (p,) = [p for p in report.problems if p.key.endswith("base_model")]
    assert p.key == "experts.tiny.base_model" and missing in p.message
    assert p.file == str(config) and p.line == cfg.line_of(["experts", "tiny", "base_model"])
    with pytest.raises(HardwareError, match="is not a model folder"):  # before any model load
        ConfigTrainer(config, log=lambda *a: None).train("t", evaluate=False)


def test_a_plan_edited_in_python_reads_the_edited_dataset_path(tmp_path, tiny_model):
    from hafs.training.errors import DatasetError

    config = _tiny_plan_config(tmp_path / "conf", tiny_model, REPO / "data" / "demo")
    (tmp_path / "conf" / "other").mkdir()  # no train.jsonl: the run must look here, not in data/demo
    trainer = ConfigTrainer(config, log=lambda *a: None)
    plan = trainer.build_training_config("t")
    plan.dataset.path = "other"  # relative: to the config file's folder, as in the file
    with pytest.raises(DatasetError) as info:
        trainer.train_with_config(plan, evaluate=False)
    assert str(tmp_path / "conf" / "other") in info.value.render()
    assert plan.dataset_dir == str(tmp_path / "conf" / "other")
