"""Output folders and the model registry are checked before training: a run never trains only to lose its model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hafs.training.loader import load_config
from hafs.training.plan import resolve
from hafs.training.preflight import output_problems, registry_problems

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """The user's layout: cfg/training.toml (shipped), ../data/demo, outputs beside it; a valid registry."""
    monkeypatch.setenv("HAFS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(REPO / "data" / "demo")
    text = (REPO / "config" / "training.toml").read_text()
    assert '# registry = "' in text
    text = text.replace('# registry = "', 'registry = "reg.toml"  # was: "', 1)
    (tmp_path / "cfg" / "training.toml").write_text(text)
    (tmp_path / "cfg" / "reg.toml").write_text("[metadata]\nschema_version = 1\n")
    return tmp_path


def _plan(project: Path, *overrides: str):
    return resolve(load_config(project / "cfg" / "training.toml"), "demo", list(overrides))


def _cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HAFS_CACHE_DIR": str(project / "cache")}
    return subprocess.run([sys.executable, str(TRAIN), "--config", str(project / "cfg" / "training.toml"), "demo",
                           *args], capture_output=True, text=True, env=env, cwd=project, timeout=300)


def test_models_dir_that_is_a_file_stops_dry_run_and_training_before_the_model_loads(project):
    blocker = project / "models"
    blocker.write_text("the user's notes\n")
    for args in (["--dry-run"], ["--no-eval", "--set", "max_steps=1"]):
        out = _cli(project, *args)
        text = out.stdout + out.stderr
        assert out.returncode == 2, text
        assert "output.models_dir" in text, text
        assert f"{blocker} is a file, not a folder: the trained model cannot be saved there" in text, text
        assert "hint: set output.models_dir to a folder" in text
        assert "Ready to train" not in text and "Internal error" not in text and "Traceback" not in text
        assert "step 1/" not in text  # refused before training
    assert blocker.read_text() == "the user's notes\n"


@pytest.mark.parametrize("key", ["models_dir", "checkpoints_dir"])
def test_output_dir_under_a_file_names_the_key_and_the_file(project, key):
    blocker = project / "blocker"
    blocker.write_text("x")
    problems = output_problems(_plan(project, f"output.{key}={blocker / 'a' / 'b'}"))
    assert [p.key for p in problems] == [f"output.{key}"]
    assert f"{blocker} (a parent of {blocker / 'a' / 'b'}) is a file, not a folder" in problems[0].message
    assert problems[0].file == str(project / "cfg" / "training.toml") and problems[0].hint


def test_logs_dir_is_checked_when_a_tracker_writes_there(project):
    blocker = project / "logs-file"
    blocker.write_text("x")
    plan = _plan(project, f"output.logs_dir={blocker}")
    assert output_problems(plan) == []  # no tracker: nothing is written there
    plan.report_to = ["tensorboard"]
    assert [p.key for p in output_problems(plan)] == ["output.logs_dir"]


def test_broken_symlink_as_output_dir_is_reported(project):
    (project / "dangling").symlink_to(project / "nowhere")
    problems = output_problems(_plan(project, f"output.checkpoints_dir={project / 'dangling'}"))
    assert [p.key for p in problems] == ["output.checkpoints_dir"]
    assert problems[0].message.startswith(f"{project / 'dangling'} is a broken symbolic link: checkpoints cannot")


def test_unwritable_parent_is_reported(project, monkeypatch):
    locked = project / "locked"
    locked.mkdir()
    # root ignores permission bits, so stand in for a read-only folder at the permission check itself
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    problems = output_problems(_plan(project, f"output.models_dir={locked / 'models'}"))
    assert [p.key for p in problems] == ["output.models_dir"]
    assert problems[0].message == (f"{locked} is not writable by this user (so {locked / 'models'} cannot be "
                                   f"created in it): the trained model cannot be saved there")


def test_folders_still_to_create_pass_and_the_check_creates_nothing(project):
    target = project / "new" / "deeper"
    plan = _plan(project, f"output.models_dir={target / 'models'}", f"output.checkpoints_dir={target / 'ckpt'}")
    plan.report_to = ["tensorboard"]
    assert output_problems(plan) == [] and registry_problems(plan) == []
    assert not (project / "new").exists()


def _set_output(project: Path, **folders: str) -> Path:
    """Point the config's [output] folders at `folders` (TOML values), in the file: problems then carry lines."""
    config = project / "cfg" / "training.toml"
    text = config.read_text()
    for key, value in folders.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f'{key} = "{value}"', text, count=1)
        assert n == 1, key
    config.write_text(text)
    return config


def _line(config: Path, key: str) -> int:
    return next(i for i, line in enumerate(config.read_text().splitlines(), 1) if line.startswith(f"{key} ="))


def test_models_dir_shared_with_checkpoints_dir_stops_dry_run_and_training(project):
    """Checkpoint runs inside models_dir would be listed by `hafs models` as leftovers to rm."""
    config = _set_output(project, models_dir="../out", checkpoints_dir="../out")
    out_dir = project / "out"
    for args in (["--dry-run"], ["--no-eval", "--set", "max_steps=1"]):
        out = _cli(project, *args)
        text = out.stdout + out.stderr
        assert out.returncode == 2, text
        assert (f"{config}:{_line(config, 'checkpoints_dir')}: output.checkpoints_dir: {out_dir} is also "
                f"output.models_dir ({config}:{_line(config, 'models_dir')})") in text, text
        assert "hafs models rm" in text and "hint: give output.checkpoints_dir and output.models_dir separate" in text
        assert "Ready to train" not in text and "Traceback" not in text and "step 1/" not in text
    assert not out_dir.exists()  # refused before anything was written


@pytest.mark.parametrize("inner,outer,refused", [
    ("checkpoints_dir", "models_dir", True),
    ("models_dir", "checkpoints_dir", True),
    ("logs_dir", "models_dir", True),
    ("logs_dir", "checkpoints_dir", True),
    ("models_dir", "logs_dir", False),  # trackers only add their own folders beside it
])
def test_an_output_folder_inside_another_is_refused_where_hafs_owns_the_outer_one(project, inner, outer, refused):
    config = _set_output(project, **{outer: "../out", inner: "../out/sub"})
    plan = _plan(project)
    plan.report_to = ["tensorboard"]  # logs_dir is written
    problems = output_problems(plan)
    if not refused:
        assert problems == []
        return
    (problem,) = problems
    assert problem.key == f"output.{inner}" and problem.file == str(config)
    assert problem.line == _line(config, inner)
    assert problem.message.startswith(f"{project / 'out' / 'sub'} is inside output.{outer} ({project / 'out'}, "
                                      f"{config}:{_line(config, outer)}): "), problem.message
    plan.report_to = []
    assert (output_problems(plan) == []) == ("logs_dir" in (inner, outer))  # unused logs_dir: no clash


def test_a_symlink_to_models_dir_is_the_same_folder(project):
    (project / "models").mkdir()
    (project / "alias").symlink_to(project / "models")
    problems = output_problems(_plan(project, f"output.checkpoints_dir={project / 'alias'}"))
    assert [p.key for p in problems] == ["output.checkpoints_dir"]
    assert "is also output.models_dir" in problems[0].message


def test_unparsable_registry_is_reported_by_the_dry_run_with_its_line(project):
    registry = project / "cfg" / "reg.toml"
    broken = "[metadata]\nschema_version = 1\n\n[models.demo-asm\nrole = 'asm'\n"
    registry.write_text(broken)
    out = _cli(project, "--dry-run")
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert f"{registry}:4: cannot parse the model registry" in text and "Ready to train" not in text
    assert registry.read_text() == broken
    out = _cli(project, "--dry-run", "--no-register")  # the run would not touch the registry: neither does its check
    assert out.returncode == 0 and "cannot parse" not in out.stdout + out.stderr, out.stdout + out.stderr


def test_registry_checks_follow_the_register_option(project):
    registry = project / "cfg" / "reg.toml"
    registry.write_text("models = 3\n")
    plan = _plan(project)
    problems = registry_problems(plan)
    assert problems and problems[0].file == str(registry) and problems[0].line == 1
    assert registry_problems(plan, register=False) == []  # --no-register: the file is not touched
    registry.unlink()
    assert registry_problems(plan) == []  # a missing registry is created after training


def test_registry_broken_after_the_check_only_warns_and_the_model_path_is_printed(project, monkeypatch, capsys):
    from hafs.training import cli, model_loading

    registry = project / "cfg" / "reg.toml"
    save = model_loading.save_adapter

    def save_then_break_registry(*args, **kwargs):  # the user edits the registry while the run trains
        save(*args, **kwargs)
        registry.write_text("[models\n")

    monkeypatch.setattr(model_loading, "save_adapter", save_then_break_registry)
    code = cli.train_script_main(["--config", str(project / "cfg" / "training.toml"), "demo", "--no-eval",
                                  "--set", "max_steps=1"])
    out = capsys.readouterr()
    assert code == 0, out.err
    saved = [line for line in out.out.splitlines() if line.startswith("Model saved to: ")]
    assert saved and (Path(saved[0].split(": ", 1)[1]) / "metadata.json").is_file()
    assert "warning: the model registry was not updated" in out.out and f"{registry}:1" in out.out
    assert registry.read_text() == "[models\n"


def test_models_dir_replaced_by_a_file_during_the_run_is_a_clear_error(tmp_path):
    from hafs.training.errors import TrainingError
    from hafs.training.outputs import staging_dir

    blocker = tmp_path / "models"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match="a file is in the way of a folder"):
        staging_dir(blocker, "m")
    with pytest.raises(TrainingError, match="part of the path is a file"):
        staging_dir(blocker / "sub", "m")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("create", [False, True])
def test_one_folder_check_names_the_path_and_what_is_wrong(tmp_path, monkeypatch, create):
    """The output folders (preflight) and the cache (create=True) share one check and one wording."""
    from hafs.training.outputs import folder_problem

    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    locked, unreadable = tmp_path / "locked", tmp_path / "unreadable"
    locked.mkdir()
    unreadable.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode: False if Path(p) in (locked, unreadable) else real_access(p, mode))
    long_name = tmp_path / ("x" * 300)
    cases = {
        afile: f"{afile} is a file, not a folder",
        afile / "a" / "b": f"{afile} (a parent of {afile / 'a' / 'b'}) is a file, not a folder",
        tmp_path / "dangling": f"{tmp_path / 'dangling'} is a broken symbolic link",
        locked / "new": f"{locked} is not writable by this user (so {locked / 'new'} cannot be created in it)",
        unreadable: f"{unreadable} is not readable and writable by this user",
        long_name: f"{long_name} cannot be created: File name too long" if create else "",  # only mkdir knows
        tmp_path / "new" / "deeper": "",
    }
    assert {folder: folder_problem(folder, create=create) for folder in cases} == cases
    assert (tmp_path / "new" / "deeper").is_dir() == create  # without create, the check makes nothing
    assert afile.read_text() == "x" and not (locked / "new").exists()
