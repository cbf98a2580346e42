"""`hafs tune`: a few very short Optuna trials on a tiny local model, a resumed study, and bad search spaces."""

from __future__ import annotations

import re
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
    from hafs.training.tune import cmd_tune, study_path

    config = write_config(tmp_path, tiny_model)
    assert cmd_tune(tune_args(config, 2)) == 0
    db = tmp_path / "logs" / "tuning" / f"{PRESET}-{PRESET}.db"
    study = optuna.load_study(study_name=f"{PRESET}:{PRESET}", storage=f"sqlite:///{db}")
    first = [(t.number, t.params) for t in study.trials]
    assert len(first) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    # every evaluation (steps 2 and 4) was reported for pruning
    assert all(sorted(t.intermediate_values) == [2, 4] for t in study.trials)
    assert all(t.value == t.intermediate_values[4] for t in study.trials)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())  # trial models discarded

    capsys.readouterr()
    assert cmd_tune(tune_args(config, 3)) == 0  # the same study, one more trial
    out = capsys.readouterr().out
    study = optuna.load_study(study_name=f"{PRESET}:{PRESET}", storage=f"sqlite:///{db}")
    assert len(study.trials) == 3 and [(t.number, t.params) for t in study.trials[:2]] == first
    assert study.trials[2].params != study.trials[0].params  # not a replay of the first search's samples
    assert "2 finished trial(s), running 1 more" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"^\*?\s+\d+\s+(complete|pruned)", line)]
    assert [r[-6] for r in rows] == ["0", "1", "2"]  # the table: one row per trial
    assert sum(r[0] == "*" for r in rows) == 1 and rows[[r[0] for r in rows].index("*")][1] == \
        str(study.best_trial.number)

    # the preset block parses and resolves to the best trial's settings
    block = (study_path(_plan(config), PRESET)).with_suffix(".best.toml").read_text()
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
    db = tmp_path / "logs" / "tuning" / f"{PRESET}-lr.db"
    db.parent.mkdir(parents=True)
    study = optuna.create_study(study_name=f"{PRESET}:lr", direction="minimize", storage=f"sqlite:///{db}")
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
