"""`hafs tune`: a few very short Optuna trials on a tiny local model, a resumed study, and bad search spaces."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from argparse import Namespace
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from conftest import tiny_config

from hafs.training.errors import ConfigError
from hafs.training.loader import load_config

REPO = Path(__file__).resolve().parents[1]
PRESET = "tune-test"

HYPERPARAMETERS = """
max_steps = 4
learning_rate = 1e-3
logging_steps = 2
eval_steps = 2
seed = 7
"""

SPACE = f"""
[tuning.{PRESET}]
learning_rate = {{type = "loguniform", low = 1e-4, high = 1e-2}}
"lora.r" = {{type = "categorical", choices = [2, 4, 8]}}
warmup_steps = {{type = "int", low = 0, high = 2}}
"""


def write_config(root: Path, model: Path, tuning: str = SPACE) -> Path:
    return tiny_config(root, model, preset=PRESET, batch_size=4, max_lora_rank=16, hyperparameters=HYPERPARAMETERS,
                       hyperparameters_name="short", extra=tuning)


def tune_args(config: Path, trials: int, **kw) -> Namespace:
    return Namespace(config=str(config), preset=PRESET, trials=trials, space=kw.get("space"),
                     keep_models=kw.get("keep_models", False), overrides=kw.get("overrides", []), verbose=False,
                     json=False)


def test_search_resumes_and_writes_a_ready_preset(tmp_path, tiny_model, capsys):
    from hafs.training.tune import best_path, cmd_tune

    config = write_config(tmp_path, tiny_model)
    assert cmd_tune(tune_args(config, 2)) == 0
    db = tmp_path / "logs" / "tuning" / f"{PRESET}-{PRESET}.db"
    (name,) = optuna.get_all_study_names(storage=f"sqlite:///{db}")
    assert re.fullmatch(rf"{PRESET}:{PRESET}:[0-9a-f]{{8}}", name)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    first = [(t.number, t.params) for t in study.trials]
    assert len(first) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    # every evaluation (steps 2 and 4) was reported for pruning
    assert all(sorted(t.intermediate_values) == [2, 4] for t in study.trials)
    assert all(t.value == t.intermediate_values[4] for t in study.trials)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())  # trial models discarded

    capsys.readouterr()
    assert cmd_tune(tune_args(config, 3)) == 0  # the same study, one more trial
    out = capsys.readouterr().out
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    assert len(study.trials) == 3 and [(t.number, t.params) for t in study.trials[:2]] == first
    assert study.trials[2].params != study.trials[0].params  # not a replay of the first search's samples
    assert "2 finished trial(s), running 1 more" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"^\*?\s+\d+\s+(complete|pruned)", line)]
    assert [r[-6] for r in rows] == ["0", "1", "2"]  # the table: one row per trial
    assert sum(r[0] == "*" for r in rows) == 1 and rows[[r[0] for r in rows].index("*")][1] == \
        str(study.best_trial.number)

    # the preset block parses and resolves to the best trial's settings
    block = best_path(_plan(config), PRESET, name.rsplit(":", 1)[1]).read_text()
    assert block in out
    parsed = tomllib.loads(block)
    assert parsed["presets"][f"{PRESET}-tuned"]["hyperparameters"] == f"{PRESET}-tuned"
    config.write_text(config.read_text() + "\n" + block)
    from hafs.training.plan import resolve

    tuned = resolve(load_config(config), f"{PRESET}-tuned")
    best = study.best_trial.params
    assert tuned.learning_rate == pytest.approx(best["learning_rate"])
    assert tuned.lora.r == best["lora.r"] and tuned.warmup_steps == best["warmup_steps"]
    assert tuned.max_steps == 4 and tuned.batch_size == 4


def _plan(config: Path):
    from hafs.training.plan import resolve

    return resolve(load_config(config), PRESET)


def test_keep_models_puts_every_trial_model_in_models_dir(tmp_path, tiny_model):
    from hafs.training.tune import tune

    config = write_config(tmp_path, tiny_model, tuning="""
[tuning.lr]
learning_rate = {type = "uniform", low = 1e-3, high = 2e-3}
""")
    study = tune(load_config(config), PRESET, trials=1, space="lr", keep_models=True, log=lambda *a: None)
    dirs = list((tmp_path / "models").iterdir())
    assert len(dirs) == 1 and (dirs[0] / "metadata.json").is_file()
    assert study.trials[0].user_attrs["model_dir"] == str(dirs[0])


def test_pruner_stops_a_trial_worse_than_the_median(tmp_path, tiny_model):
    from hafs.training.tune import tune

    # Two good trials first, then a learning rate too small to move the loss: pruned at step 2.
    config = write_config(tmp_path, tiny_model, tuning="""
[tuning.lr]
learning_rate = {type = "categorical", choices = [5e-3, 1e-9]}
""")
    cfg = load_config(config)
    study = tune(cfg, PRESET, trials=0, space="lr", log=lambda *a: None)  # creates the study, runs nothing
    for lr in (5e-3, 5e-3, 1e-9):
        study.enqueue_trial({"learning_rate": lr})
    study = tune(cfg, PRESET, trials=3, space="lr", log=lambda *a: None)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"], states
    assert sorted(study.trials[2].intermediate_values) == [2]


@pytest.mark.parametrize("table, key, words", [
    ('learning_rate = {type = "loguniform", low = 0.0, high = 1e-3}', "tuning.bad.learning_rate", "> 0"),
    ('learning_rate = {type = "gaussian", low = 1e-5, high = 1e-3}', "tuning.bad.learning_rate", "type must be"),
    ('"lora.r" = {type = "categorical", choices = [4, 64]}', 'tuning.bad."lora.r"', "max_lora_rank"),
    ('learnin_rate = {type = "uniform", low = 0.1, high = 0.2}', "tuning.bad.learnin_rate", "learning_rate"),
    ('warmup_steps = {type = "int", low = 0, high = 2.5}', "tuning.bad.warmup_steps", "integer"),
    ('"dataset.path" = {type = "categorical", choices = ["a"]}', 'tuning.bad."dataset.path"', "lora"),
    ('warmup_steps = {type = "int", low = 5, high = 1}', "tuning.bad.warmup_steps", "above high"),
])
def test_bad_tuning_table_is_a_located_config_error(tmp_path, tiny_model, table, key, words):
    from hafs.training.tune import tune

    config = write_config(tmp_path, tiny_model, tuning=f"[tuning.bad]\n{table}\n")
    with pytest.raises(ConfigError) as err:
        tune(load_config(config), PRESET, trials=1, space="bad", log=lambda *a: None)
    problem = err.value.problems[0]
    assert problem.key == key and words in problem.render(), problem.render()
    assert problem.line == config.read_text().splitlines().index(table) + 1


def test_missing_space_names_the_defined_ones(tmp_path, tiny_model):
    from hafs.training.tune import tune

    config = write_config(tmp_path, tiny_model)
    with pytest.raises(ConfigError) as err:
        tune(load_config(config), PRESET, trials=1, space="nope", log=lambda *a: None)
    assert "tuning.nope" in err.value.render() and PRESET in err.value.render()


def test_other_overrides_start_a_separate_study_whose_best_block_keeps_its_own_settings(tmp_path, tiny_model,
                                                                                         capsys):
    from hafs.training.tune import cmd_tune

    config = write_config(tmp_path, tiny_model, tuning="""
[tuning.lr]
learning_rate = {type = "uniform", low = 1e-3, high = 2e-3}
""")
    storage = f"sqlite:///{tmp_path / 'logs' / 'tuning' / f'{PRESET}-lr.db'}"
    assert cmd_tune(tune_args(config, 1, space="lr")) == 0
    (long_name,) = optuna.get_all_study_names(storage=storage)
    best_files = list((tmp_path / "logs" / "tuning").glob("*.best.toml"))
    long_block = best_files[0].read_text()
    capsys.readouterr()

    # Trials of 2 steps are not ranked against the 4-step ones: a study of their own, named in the output.
    assert cmd_tune(tune_args(config, 1, space="lr", overrides=["max_steps=2"])) == 0
    out = capsys.readouterr().out
    names = optuna.get_all_study_names(storage=storage)
    (short_name,) = set(names) - {long_name}
    assert f"Study {short_name} " in out and "0 finished trial(s), running 1 more" in out and long_name in out
    long, short = (optuna.load_study(study_name=n, storage=storage) for n in (long_name, short_name))
    assert len(long.trials) == 1 and len(short.trials) == 1
    assert short.trials[0].user_attrs["overrides"] == {"max_steps": 2}
    assert long.trials[0].user_attrs["overrides"] == {}
    assert all(sorted(t.intermediate_values) == [2] for t in short.trials)

    # Each study keeps its own best block, holding the settings its best trial ran with.
    assert best_files[0].read_text() == long_block
    assert tomllib.loads(long_block)["hyperparameters"][f"{PRESET}-tuned"]["max_steps"] == 4
    (short_file,) = set((tmp_path / "logs" / "tuning").glob("*.best.toml")) - set(best_files)
    assert tomllib.loads(short_file.read_text())["hyperparameters"][f"{PRESET}-tuned"]["max_steps"] == 2

    capsys.readouterr()
    assert cmd_tune(tune_args(config, 2, space="lr")) == 0  # the same settings again: the first study resumes
    assert f"Study {long_name} " in capsys.readouterr().out
    assert len(optuna.load_study(study_name=long_name, storage=storage).trials) == 2


@pytest.mark.parametrize("space, overrides, key, words", [
    ("", ["max_steps=1"], "hyperparameters.short.eval_steps", "eval_steps 2 is above max_steps 1 from --set max_steps"),
    ('max_steps = {type = "int", low = 1, high = 4}', [], "hyperparameters.short.eval_steps",
     "max_steps 1 (the smallest of the search space) from tuning.ev.max_steps"),
    ('eval_steps = {type = "categorical", choices = [2, 8]}', [], "tuning.ev.eval_steps", "eval_steps 8 is above"),
])
def test_an_eval_interval_longer_than_a_trial_is_refused_before_trial_0(tmp_path, tiny_model, space, overrides,
                                                                        key, words):
    from hafs.training.tune import tune

    config = write_config(tmp_path, tiny_model, tuning=f"""
[tuning.ev]
learning_rate = {{type = "uniform", low = 1e-3, high = 2e-3}}
{space}
""")
    started = []
    with pytest.raises(ConfigError) as err:
        tune(load_config(config), PRESET, trials=2, space="ev", overrides=overrides, log=started.append)
    problem = err.value.problems[0]
    assert problem.key == key and words in problem.message, problem.render()
    assert "eval_steps=" in problem.hint
    text = config.read_text().splitlines()
    assert problem.line == text.index(space if key.startswith("tuning.") else "eval_steps = 2") + 1
    assert not started and not (tmp_path / "logs" / "tuning").exists()  # no study, no trial


def test_the_cli_reports_the_refusal_without_a_traceback(tmp_path, tiny_model, capsys):
    from hafs.training.cli import main

    config = write_config(tmp_path, tiny_model)
    assert main(["tune", PRESET, "--config", str(config), "--trials", "2", "--set", "max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "eval_steps 2 is above max_steps 1" in err and "Traceback" not in err and "val split" not in err


@pytest.mark.parametrize("error", ["ConfigError", "TrainingError"])
def test_a_trial_failing_with_a_hafs_error_is_reported_without_optunas_traceback(tmp_path, tiny_model, monkeypatch,
                                                                                 caplog, error):
    import hafs.training.errors as errors
    import hafs.training.recipe as recipe
    from hafs.training.tune import tune

    exc = getattr(errors, error)
    monkeypatch.setattr(recipe, "run", lambda *a, **k: (_ for _ in ()).throw(exc("boom: what to do")))
    config = write_config(tmp_path, tiny_model)
    lines = []
    optuna.logging.enable_propagation()  # Optuna's own handler does not reach caplog
    try:
        if error == "ConfigError":  # a config mistake ends the search with its own message
            with pytest.raises(ConfigError, match="boom"):
                tune(load_config(config), PRESET, trials=2, log=lines.append)
        else:  # a training failure (out of memory, NaN) is one failed trial; the search goes on
            study = tune(load_config(config), PRESET, trials=2, log=lines.append)
            assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
            assert study.trials[0].user_attrs["error"] == "boom: what to do"
            assert "trial 1: failed: boom: what to do" in lines
    finally:
        optuna.logging.disable_propagation()
    assert not [r for r in caplog.records if r.name.startswith("optuna") and "failed" in r.getMessage()], \
        caplog.text


def test_an_unusable_logs_dir_is_refused_before_trial_0_with_its_key(tmp_path, tiny_model, capsys):
    """The study goes to logs_dir/tuning even without a tracker: check it like the run checks its folders."""
    from hafs.training.cli import main

    config = write_config(tmp_path, tiny_model)
    (tmp_path / "afile").write_text("the user's\n")
    text = config.read_text().replace(f'logs_dir = "{tmp_path}/logs"', 'logs_dir = "afile/logs"')
    config.write_text(text)
    line = text.splitlines().index('logs_dir = "afile/logs"') + 1
    assert main(["tune", PRESET, "--config", str(config), "--trials", "1"]) == 2
    out = capsys.readouterr()
    assert (f"{config}:{line}: output.logs_dir: {tmp_path / 'afile'} (a parent of {tmp_path / 'afile' / 'logs'}) "
            "is a file, not a folder") in out.err, out.err
    assert "Cannot tune:" in out.err and "Internal error" not in out.err and "Traceback" not in out.err
    assert "trial 0" not in out.out + out.err and (tmp_path / "afile").read_text() == "the user's\n"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_trial_ends_the_search_and_the_same_command_continues_it(tmp_path, tiny_model, capsys,
                                                                                   monkeypatch, signum):
    """A real Ctrl-C / SIGTERM while trial 1 trains: exit 128+N, one message, trial 1 left out of the ranking."""
    from hafs.training.tune import cmd_tune

    config = write_config(tmp_path, tiny_model)
    args = ["tune", PRESET, "--config", str(config), "--trials", "2", "--set", "save_steps=1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", HAFS_TEST_SLOW_STEP_MS="500", TMPDIR=str(tmp_path))  # trials' scratch in tmp_path
    log = tmp_path / "tune.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from hafs.training.cli import main; "
                                 "sys.exit(main())", *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.time() + 300
        while not list(tmp_path.glob("hafs-tune-1-*/checkpoints/*/checkpoint-*/manifest.json")):  # trial 1 trains
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.02)
        proc.send_signal(signum)
        code = proc.wait(timeout=120)
    text = log.read_text()
    name = signal.Signals(signum).name
    assert code == 128 + signum, text
    assert f"Received {name}: stopping the search" in text and f"Interrupted ({name}) during trial 1" in text, text
    assert "keeps its 1 finished trial(s)" in text and "run the same hafs tune command again" in text, text
    assert "trial 2:" not in text and "trial 1: failed" not in text and "Resume with" not in text, text
    assert "Traceback" not in text and "Internal error" not in text, text
    assert not list(tmp_path.glob("hafs-tune-*")), "the trial's scratch folder is left behind"

    storage = f"sqlite:///{tmp_path / 'logs' / 'tuning' / f'{PRESET}-{PRESET}.db'}"
    (study_name,) = optuna.get_all_study_names(storage=storage)
    study = optuna.load_study(study_name=study_name, storage=storage)
    # FAIL: the sampler, the pruner and best_trial ignore it, and --trials does not count it
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert study.trials[1].user_attrs["interrupted"] == name and "error" not in study.trials[1].user_attrs

    monkeypatch.delenv("HAFS_TEST_SLOW_STEP_MS", raising=False)
    capsys.readouterr()
    assert cmd_tune(tune_args(config, 2, overrides=["save_steps=1"])) == 0  # the same command continues
    out = capsys.readouterr().out
    assert "1 finished trial(s), running 1 more" in out
    study = optuna.load_study(study_name=study_name, storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.best_trial.number in (0, 2)
    assert re.search(r"^\s+1\s+interrupted\s", out, re.M), out


def test_a_signal_while_a_trial_loads_its_model_ends_the_search_too(tmp_path, tiny_model, monkeypatch):
    import hafs.training.recipe as recipe
    from hafs.training import faults
    from hafs.training.tune import tune

    def loading(*args, **kwargs):  # SIGTERM before the training loop (the CLI's terminate_as_interrupt)
        raise faults.Terminated(signal.SIGTERM)

    monkeypatch.setattr(recipe, "run", loading)
    lines = []
    with pytest.raises(faults.Interrupted) as err:
        tune(load_config(write_config(tmp_path, tiny_model)), PRESET, trials=2, log=lines.append)
    assert err.value.exit_code == 143 and "Interrupted (SIGTERM) during trial 0" in err.value.render()
    assert not [line for line in lines if line.startswith("trial 1")], lines
    storage = f"sqlite:///{tmp_path / 'logs' / 'tuning' / f'{PRESET}-{PRESET}.db'}"
    (trial,) = optuna.load_study(study_name=optuna.get_all_study_names(storage=storage)[0], storage=storage).trials
    assert trial.state.name == "FAIL" and trial.user_attrs["interrupted"] == "SIGTERM"
