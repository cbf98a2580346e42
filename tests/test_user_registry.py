"""The user's model registry: only the expert's entry changes, updates never duplicate, bad files stay untouched."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path

import pytest

from hafs.training.errors import ConfigError, TrainingError
from hafs.training.user_registry import (
    NEW_FILE_HEADER,
    eval_figures,
    register_trained_model,
    registered_experts,
    update_registry,
)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT.parent / "shared" / "seed" / "model_registry.toml"
CONFIG = ROOT / "config" / "training.toml"


@pytest.fixture
def registry(tmp_path) -> Path:
    """A copy of the user's registry template (their ~/.context/models/registry.toml)."""
    if not TEMPLATE.is_file():
        pytest.skip(f"registry template not found at {TEMPLATE}")
    path = tmp_path / "registry.toml"
    path.write_bytes(TEMPLATE.read_bytes())
    return path


def _split_around(text: str, header: str) -> tuple[str, str, str]:
    """(before the table, the table, from the next table header on)."""
    start = text.index(header)
    nxt = re.search(r"^\[", text[start + len(header):], re.M)
    end = start + len(header) + nxt.start() if nxt else len(text)
    return text[:start], text[start:end], text[end:]


def test_update_changes_only_the_experts_entry(registry):
    original = registry.read_text()
    update_registry(registry, expert_name="oracle-rauru-assembler", log=lambda *_: None,
                    entry={"status": "trained", "model_dir": "/models/rauru-1", "eval_loss": 1.25})
    new = registry.read_text()
    header = "[models.oracle-rauru-assembler]\n"
    before_o, entry_o, after_o = _split_around(original, header)
    before_n, entry_n, after_n = _split_around(new, header)
    assert before_n == before_o and after_n == after_o  # every other byte, comments and ensembles included
    assert 'status = "trained"' in entry_n and 'status = "planned"' not in entry_n
    # The user's own keys keep their values and order; ours follow them.
    assert entry_n.startswith(entry_o.rstrip("\n").replace('status = "planned"', 'status = "trained"'))
    data = tomllib.loads(new)["models"]["oracle-rauru-assembler"]
    assert data["model_dir"] == "/models/rauru-1" and data["eval_loss"] == 1.25
    assert data["tags"] == ["rom-tooling", "asm", "patching", "65816"]


def test_second_update_updates_not_duplicates(registry):
    for i in (1, 2):
        update_registry(registry, expert_name="oracle-rauru-assembler", log=lambda *_: None,
                        entry={"status": "trained", "model_dir": f"/models/run-{i}", "perplexity": 3.0 + i})
    text = registry.read_text()
    assert text.count("[models.oracle-rauru-assembler]") == 1
    assert text.count("model_dir =") == 1 and text.count("perplexity =") == 1
    entry = registered_experts(registry)["oracle-rauru-assembler"]
    assert entry["model_dir"] == "/models/run-2" and entry["perplexity"] == 5.0


def test_new_expert_is_added_and_nothing_else_moves(registry):
    original = registry.read_text()
    entry = {"status": "trained", "model_dir": "/m/demo", "base_model": "hafs-demo/tiny-qwen2"}
    defaults = {"display_name": "Demo: 65816 Assembler", "role": "asm", "default_provider": "llamacpp",
                "tags": ["demo", "asm"], "notes": None}
    update_registry(registry, expert_name="demo-asm", entry=entry, defaults=defaults, log=lambda *_: None)
    update_registry(registry, expert_name="demo-asm", entry={**entry, "model_dir": "/m/demo-2"},
                    defaults={"display_name": "changed"}, log=lambda *_: None)
    new = registry.read_text()
    before, block, after = _split_around(new, "[models.demo-asm]\n")
    assert before + after == original  # the new table was inserted whole; no other byte changed
    assert block.endswith("\n\n")  # separated from the next table like the user's own entries
    got = tomllib.loads(new)["models"]["demo-asm"]
    # Template order for the user's fields, then ours; defaults only on creation; None skipped.
    assert list(got) == ["display_name", "role", "status", "default_provider", "tags", "model_dir", "base_model"]
    assert got["display_name"] == "Demo: 65816 Assembler" and got["model_dir"] == "/m/demo-2"
    assert len(registered_experts(registry)) == 13


@pytest.mark.parametrize("bad, line", [
    ('[models.oracle-x]\nstatus = "planned\n', 2),       # unterminated string
    ('[metadata]\nschema_version = 1\n[models.a\n', 3),  # unterminated table header
    ('models = "not a table"\n', 1),
    ('[models.oracle-x]\nstatus = "a"\nstatus = "b"\n', 3),  # duplicate key (tomlkit alone accepts it late)
])
def test_malformed_registry_is_refused_and_left_untouched(tmp_path, bad, line):
    path = tmp_path / "registry.toml"
    path.write_text(bad)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    with pytest.raises(ConfigError) as err:
        update_registry(path, expert_name="oracle-x", entry={"status": "trained"}, log=lambda *_: None)
    problem = err.value.problems[0]
    assert problem.file == str(path) and problem.line == line
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.toml"]  # no temp file left behind


def test_registered_experts_reports_a_corrupt_file_with_its_line(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text('[models.a]\nstatus = "trained"\nstatus = "again"\n')
    with pytest.raises(ConfigError) as err:
        registered_experts(path)
    assert err.value.problems[0].line == 3
    assert registered_experts(tmp_path / "missing.toml") == {}


def test_missing_registry_is_created_with_metadata(tmp_path):
    path = tmp_path / "context" / "models" / "registry.toml"
    update_registry(path, expert_name="demo-asm", entry={"status": "trained", "model_dir": "/m"},
                    log=lambda *_: None)
    text = path.read_text()
    assert text.startswith(NEW_FILE_HEADER)
    data = tomllib.loads(text)
    assert data["metadata"]["schema_version"] == 1
    assert data["models"] == {"demo-asm": {"status": "trained", "model_dir": "/m"}}


def test_write_is_atomic_and_keeps_permissions(registry, monkeypatch):
    os.chmod(registry, 0o640)
    original = registry.read_bytes()

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(TrainingError):
        update_registry(registry, expert_name="oracle-rauru-assembler", entry={"status": "trained"},
                        log=lambda *_: None)
    assert registry.read_bytes() == original
    assert [p.name for p in registry.parent.iterdir()] == ["registry.toml"]
    monkeypatch.undo()
    update_registry(registry, expert_name="oracle-rauru-assembler", entry={"status": "trained"},
                    log=lambda *_: None)
    assert stat.S_IMODE(registry.stat().st_mode) == 0o640
    assert registered_experts(registry)["oracle-rauru-assembler"]["status"] == "trained"


def test_symlinked_registry_stays_a_symlink(registry, tmp_path):
    link = tmp_path / "link.toml"
    link.symlink_to(registry)
    update_registry(link, expert_name="oracle-yaze-expert", entry={"status": "trained"}, log=lambda *_: None)
    assert link.is_symlink()
    assert registered_experts(registry)["oracle-yaze-expert"]["status"] == "trained"


def test_register_trained_model_records_the_run(registry, tmp_path):
    from hafs.training.loader import load_config
    from hafs.training.plan import resolve

    plan = resolve(load_config(CONFIG), "demo")
    model_dir = tmp_path / "demo-asm-tiny-qwen2-20260101"
    model_dir.mkdir()
    meta = {"training": {"final_loss": 1.91234},
            "evaluation": {"before": {"val": {"loss": 7.5, "perplexity": 1808.0}},
                           "after": {"val": {"loss": 2.123456, "perplexity": 8.3601}}}}
    logs = []
    register_trained_model(plan, model_dir, meta, registry=str(registry), log=logs.append)
    entry = registered_experts(registry)["demo-asm"]
    assert entry["status"] == "trained" and entry["model_dir"] == str(model_dir.resolve())
    assert entry["base_model"] == "hafs-demo/tiny-qwen2" and entry["preset"] == "demo"
    assert entry["dataset"] == os.path.normpath(plan.dataset_dir) == str(ROOT / "data" / "demo")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", entry["trained"])
    assert (entry["eval_loss"], entry["perplexity"], entry["train_loss"]) == (2.1235, 8.3601, 1.9123)
    assert entry["display_name"] == "Demo: 65816 Assembler" and entry["default_provider"] == "llamacpp"
    assert any("added models.demo-asm" in line for line in logs)


def test_eval_figures_reads_flat_and_nested_shapes():
    assert eval_figures({"evaluation": {"after": {"eval_loss": 1.5, "eval_perplexity": 4.48}}}) == \
        {"eval_loss": 1.5, "perplexity": 4.48}
    assert eval_figures({"evaluation": {"after": {"test": {"loss": 2.0}}}}) == {"eval_loss": 2.0}
    assert eval_figures({"evaluation": None, "training": {"final_loss": True}}) == {}


@pytest.mark.parametrize("bad, line", [
    ('[models.oracle-x]\nstatus = "planned\n', 2),
    ('[metadata]\nschema_version = 1\nnotes = [\n', 3),  # unfinished at the end: tomllib names no line
    ('models = "not a table"\n', 1),
    ('[models]\noracle-x = 3\n', 2),
])
def test_registry_problems_finds_what_update_registry_would_refuse(tmp_path, bad, line):
    from hafs.training.user_registry import registry_problems

    path = tmp_path / "registry.toml"
    path.write_text(bad)
    problems = registry_problems(path, "oracle-x")
    assert problems and problems[0].file == str(path) and problems[0].line == line
    assert "output] registry" in problems[0].hint
    with pytest.raises(ConfigError):
        update_registry(path, expert_name="oracle-x", entry={"status": "trained"}, log=lambda *_: None)
    assert path.read_text() == bad
    assert registry_problems(tmp_path / "missing.toml", "oracle-x") == []


def test_register_after_save_warns_instead_of_raising(tmp_path):
    from hafs.training.loader import load_config
    from hafs.training.plan import resolve
    from hafs.training.user_registry import register_after_save

    plan = resolve(load_config(CONFIG), "demo")
    path = tmp_path / "registry.toml"
    path.write_text("[models\n")
    lines = []
    assert register_after_save(plan, tmp_path / "model", {}, registry=str(path), log=lines.append) is None
    assert "warning: the model registry was not updated" in lines[0] and f"{path}:1" in lines[0]
    assert path.read_text() == "[models\n"
    path.write_text("")
    assert register_after_save(plan, tmp_path / "model", {}, registry=str(path), log=lines.append) == path
    assert tomllib.loads(path.read_text())["models"]["demo-asm"]["status"] == "trained"
