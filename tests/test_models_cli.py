"""`hafs models`: listing models_dir (odd folders included), show, compare, rm. No model is loaded."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from hafs.training import registry
from hafs.training.cli import main
from hafs.training.errors import ConfigError
from hafs.training.loader import load_config
from hafs.training.outputs import atomic_write_json, build_metadata
from hafs.training.plan import resolve

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "training.toml"


@pytest.fixture
def setup(tmp_path):
    """A config in tmp_path/config whose models_dir is tmp_path/models, holding good and odd folders."""
    (tmp_path / "config").mkdir()
    config = tmp_path / "config" / "training.toml"
    config.write_text(CONFIG.read_text())
    models = tmp_path / "models"
    shipped = load_config(config)
    older = _model(models, "demo-asm-a", resolve(shipped, "demo", check_hardware=False), "2025-01-01T09:00:00",
                   eval_loss=2.4)
    plan = resolve(shipped, "demo", {"learning_rate": 5e-4, "lora.r": 4}, check_hardware=False)
    plan.dataset_name = "alttp_yaze_full"
    newer = _model(models, "demo-asm-b", plan, "2025-03-01T09:00:00", eval_loss=2.1, curve=True)
    (models / "no-metadata").mkdir()
    (models / "no-metadata" / "adapter_config.json").write_text("{}")
    (models / "corrupt").mkdir()
    (models / "corrupt" / "metadata.json").write_text('{"expert": ')
    (models / ".staging-demo-asm-c-4242").mkdir()
    (models / ".staging-demo-asm-c-4242" / "adapter_model.safetensors").write_bytes(b"x" * 300)
    (models / ".cache").mkdir()  # hidden, not ours: not listed
    (models / "notes.txt").write_text("not a folder")
    return {"config": config, "models": models, "older": older, "newer": newer}


def _model(models: Path, name: str, plan, created: str, *, eval_loss: float, curve: bool = False) -> Path:
    out = models / name
    out.mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    meta = build_metadata(plan, num_samples=120, duration_seconds=60, hardware_info={},
                          created=dt.datetime.fromisoformat(created),
                          extra={"training": {"final_loss": eval_loss - 0.2},
                                 "losses": {"train": [[1, 3.0]], "eval": [[1, 9.9]]},
                                 "evaluation": {"before": {"val": {"loss": 3.0, "perplexity": 20.09}},
                                                "after": {"val": {"loss": eval_loss, "perplexity": 8.0},
                                                          "generation_scores": {"token_f1": 0.25}}}})
    atomic_write_json(out / "metadata.json", meta)
    if curve:
        (out / "loss_curve.png").write_bytes(b"\x89PNG fake")
    return out


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_scan_lists_newest_first_and_odd_folders_without_crashing(setup):
    entries = registry.scan_models(setup["models"])
    by_name = {e.name: e for e in entries}
    assert set(by_name) == {"demo-asm-a", "demo-asm-b", "no-metadata", "corrupt", ".staging-demo-asm-c-4242"}
    good = [e.name for e in entries if e.status == "ok"]
    assert good == ["demo-asm-b", "demo-asm-a"]
    b = by_name["demo-asm-b"]
    assert (b.expert, b.expert_name, b.base, b.dataset, b.preset) == \
        ("demo-asm", "Demo: 65816 Assembler", "hafs-demo/tiny-qwen2", "alttp_yaze_full", "demo")
    assert b.samples == 120 and b.eval_loss == 2.1 and b.train_loss == pytest.approx(1.9)
    assert b.created == "2025-03-01T09:00:00" and b.size_bytes == _size(setup["newer"])
    assert b.loss_curve == str((setup["newer"] / "loss_curve.png").resolve())
    assert by_name["demo-asm-a"].loss_curve == "" and by_name["demo-asm-a"].dataset == "demo"
    assert by_name["no-metadata"].status == "incomplete"
    assert by_name["corrupt"].status == "broken"
    staging = by_name[".staging-demo-asm-c-4242"]
    assert staging.status == "partial" and staging.size_bytes == 300
    assert registry.scan_models(setup["models"] / "missing") == []
    (setup["models"] / f".staging-demo-asm-d-{os.getpid()}").mkdir()  # a save in progress: say so
    live = registry.read_entry(setup["models"] / f".staging-demo-asm-d-{os.getpid()}")
    assert live.status == "partial" and live.problem == f"being written by process {os.getpid()} right now"


def test_eval_loss_falls_back_to_the_last_evaluation_during_training():
    assert registry.eval_loss_of({"evaluation": {"after": {"val": None, "test": {"loss": 1.5}}}}) == 1.5
    assert registry.eval_loss_of({"evaluation": None, "losses": {"eval": [[5, 2.0], [10, 1.75]]}}) == 1.75
    assert registry.eval_loss_of({"losses": {"eval": []}}) is None


def test_list_table_json_and_filters(setup, capsys):
    cfg = str(setup["config"])
    assert main(["models", "--config", cfg]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "EXPERT", "BASE", "DATASET", "DATE", "SAMPLES", "EVAL", "LOSS", "SIZE"]
    assert [line.split()[0] for line in lines[1:3]] == ["demo-asm-b", "demo-asm-a"]  # newest first
    assert lines[1].split()[1:8] == ["demo-asm", "hafs-demo/tiny-qwen2", "alttp_yaze_full", "2025-03-01", "09:00",
                                     "120", "2.1000"]
    assert lines[4] == "Not usable (hafs models rm NAME to clean up):"
    odd = sorted(line.split()[:2] for line in lines[5:8])
    assert odd == [[".staging-demo-asm-c-4242", "partial:"], ["corrupt", "broken:"], ["no-metadata", "incomplete:"]]
    assert ".cache" not in out and "notes.txt" not in out
    assert lines[-1] == f"2 models in {setup['models']}, 3 unusable folders"

    assert main(["models", "--config", cfg, "--json", "--dataset", "alttp"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == ["demo-asm-b"] and data[0]["eval_loss"] == 2.1
    assert main(["models", "list", "--config", cfg, "--json", "--expert", "DEMO: 65816"]) == 0
    assert [d["name"] for d in json.loads(capsys.readouterr().out)] == ["demo-asm-b", "demo-asm-a"]
    assert main(["models", "--config", cfg, "--expert", "oracle"]) == 0
    assert "No models in" in capsys.readouterr().out


def test_registered_models_are_flagged(setup, capsys):
    registry_file = setup["config"].parent / "registry.toml"
    registry_file.write_text(f'[models.demo-asm]\nstatus = "trained"\nmodel_dir = "{setup["older"]}"\n')
    text = setup["config"].read_text().replace("# registry = ", "registry = ", 1)
    text = text.replace('registry = "~/.context/models/registry.toml"', 'registry = "registry.toml"')
    setup["config"].write_text(text)
    assert main(["models", "--config", str(setup["config"]), "--json"]) == 0
    flags = {d["name"]: d["registered"] for d in json.loads(capsys.readouterr().out)}
    assert flags["demo-asm-a"] is True and flags["demo-asm-b"] is False
    assert main(["models", "--config", str(setup["config"])]) == 0
    out = capsys.readouterr().out
    assert "demo-asm-a *" in out and out.rstrip().endswith("(* = in your model registry)")


def test_show_points_to_the_loss_curve(setup, capsys):
    cfg = str(setup["config"])
    assert main(["models", "show", "demo-asm-b", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert f"loss curve:  {(setup['newer'] / 'loss_curve.png').resolve()}" in out
    assert "val loss:    2.1000 (perplexity 8.00), before training 3.0000 (-0.9000)" in out
    assert "LoRA r=4" in out and "120 samples" in out
    assert main(["models", "show", "demo-asm-a", "--config", cfg]) == 0
    assert "loss curve:  none" in capsys.readouterr().out
    assert main(["models", "show", "corrupt", "--config", cfg]) == 2
    assert "broken" in capsys.readouterr().out
    assert main(["models", "show", str(setup["older"]), "--config", cfg, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["metrics"]["eval.after.val.loss"] == 2.4 and "metadata.json" in data["files"]
    assert main(["models", "show", "demo-asm-bb", "--config", cfg]) == 2
    assert "did you mean 'demo-asm-b'" in capsys.readouterr().err
    assert main(["models", "show", "--config", cfg]) == 2  # no name


def test_compare_lists_config_and_metric_differences(setup, capsys):
    diff = registry.compare_models(setup["older"], setup["newer"])
    assert diff["config"]["learning_rate"] == [1e-3, 5e-4]
    assert diff["config"]["lora.r"] == [8, 4] and diff["config"]["dataset_name"] == ["demo", "alttp_yaze_full"]
    assert "preset" not in diff["config"] and "config_path" not in diff["config"]
    assert diff["metrics"]["eval.after.val.loss"] == [2.4, 2.1]
    assert diff["metrics"]["eval.after.generation.token_f1"] == [0.25, 0.25]
    assert main(["models", "compare", "demo-asm-a", "demo-asm-b", "--config", str(setup["config"])]) == 0
    out = capsys.readouterr().out
    assert "Config differences (" in out and "learning_rate" in out and "-0.3000" in out
    with pytest.raises(ConfigError, match="missing or unreadable"):
        registry.compare_models(setup["older"], setup["models"] / "corrupt")


def test_rm_asks_first_and_stays_inside_models_dir(setup, tmp_path, capsys):
    models, cfg = setup["models"], str(setup["config"])
    said = []
    no = registry.remove_model(models, "demo-asm-a", confirm=lambda q: said.append(q) or "n", log=said.append)
    assert no is False and setup["older"].is_dir()
    assert said[0].startswith(f"Remove {models / 'demo-asm-a'} (") and said[1] == "Nothing removed."
    assert registry.remove_model(models, "demo-asm-a", confirm=lambda q: "y", log=said.append) is True
    assert not setup["older"].exists() and not [p for p in models.iterdir() if p.name.startswith(".staging-rm")]

    outside = tmp_path / "precious"
    outside.mkdir()
    for bad in ("../precious", str(outside), "..", "demo-asm-b/../../precious"):
        with pytest.raises(ConfigError):
            registry.remove_model(models, bad, yes=True)
    assert outside.is_dir()
    os.symlink(outside, models / "link")
    assert registry.remove_model(models, "link", yes=True, log=said.append)
    assert outside.is_dir() and not (models / "link").exists()  # the link went, not its target

    assert main(["models", "rm", ".staging-demo-asm-c-4242", "--yes", "--config", cfg]) == 0
    (models / f".staging-x-{os.getpid()}").mkdir()
    with pytest.raises(ConfigError, match="being written by process"):
        registry.remove_model(models, f".staging-x-{os.getpid()}", yes=True)
    (models / f".staging-x-{os.getpid()}").rmdir()
    assert main(["models", "rm", "nope", "--yes", "--config", cfg]) == 2
    assert {e.name for e in registry.scan_models(models)} == {"demo-asm-b", "corrupt", "no-metadata"}


def test_rm_without_yes_on_closed_stdin_removes_nothing(setup, monkeypatch):
    def eof(_):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    assert main(["models", "rm", "demo-asm-b", "--config", str(setup["config"])]) == 1
    assert setup["newer"].is_dir()


def test_rm_of_a_registered_model_says_which_registry_entry_now_points_at_nothing(setup, capsys):
    registry_file = setup["config"].parent / "registry.toml"
    registry_file.write_text(f'[models.demo-asm]\nmodel_dir = "{setup["newer"]}"\n\n'
                             f'[models.other]\nmodel_dir = "{setup["older"]}"\n')
    text = setup["config"].read_text()
    setup["config"].write_text(text.replace("[output]\n", f'[output]\nregistry = "{registry_file}"\n', 1))
    assert main(["models", "rm", "demo-asm-b", "--yes", "--config", str(setup["config"])]) == 0
    err = capsys.readouterr().err
    assert "models.demo-asm.model_dir still names the removed" in err and "models.other" not in err
    assert registry_file.read_text().startswith("[models.demo-asm]")  # the user's file is left as it was


def test_checkpoint_runs_in_models_dir_are_listed_as_such_and_rm_refuses_them(setup, capsys):
    """checkpoints_dir = models_dir (or inside it): resumable runs, never "Not usable ... rm to clean up"."""
    models, cfg = setup["models"], str(setup["config"])
    run = models / "demo-20260101-100000"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-4" / "adapter.safetensors").write_bytes(b"\0" * 500)
    (run / "checkpoint-4" / "config.json").write_text('{"preset": "demo"}')
    (models / "ckpt" / "demo-20260101-110000-2" / "checkpoint-2").mkdir(parents=True)  # a whole checkpoints_dir
    assert main(["models", "--config", cfg]) == 0
    out = capsys.readouterr().out
    unusable = out.split("Not usable")[1].split("\n\n")[0]
    assert run.name not in unusable and "ckpt" not in unusable
    held = out.split("Training checkpoints, not models")[1]
    rows = {line.split()[0]: line.split(None, 1)[1] for line in held.splitlines()[1:] if line.startswith("  ")}
    assert rows[run.name].startswith(f"training checkpoints (checkpoint-4), not a model; continue with hafs train "
                                     f"demo --resume {run} ")
    assert rows["ckpt"].startswith("training checkpoints (run folder demo-20260101-110000-2), not a model; continue "
                                   f"with hafs train PRESET --resume {models / 'ckpt' / 'demo-20260101-110000-2'} ")
    assert out.rstrip().endswith("3 unusable folders, 2 folders of checkpoints")
    for name in (run.name, "ckpt", str(run)):
        assert main(["models", "rm", name, "--yes", "--config", cfg]) == 2
        err = capsys.readouterr().err
        assert "refusing to remove" in err and "it holds training checkpoints" in err and " --resume " in err, err
    assert f"hafs train demo --resume {run})" in err and "Traceback" not in err
    assert (run / "checkpoint-4" / "adapter.safetensors").is_file()
    assert (models / "ckpt" / "demo-20260101-110000-2" / "checkpoint-2").is_dir()
    assert main(["models", "show", run.name, "--config", cfg, "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["entry"]["status"] == "checkpoints"
    assert main(["models", "rm", "no-metadata", "--yes", "--config", cfg]) == 0  # a true leftover still goes
