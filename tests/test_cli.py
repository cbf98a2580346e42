"""The command line as a user meets it: exit codes, messages without tracebacks, instant listings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]
SEED = ROOT.parent / "shared" / "seed" / "original-training.toml"
CORPUS = sorted((ROOT / "tests" / "configs").glob("*.toml"))


def run(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(TRAIN + args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, **kw)


def test_list_presets_is_instant_and_imports_nothing_heavy():
    code = ("import sys, time; t=time.time(); sys.argv=['train.py','--list-presets'];"
            "from hafs.training.cli import train_script_main; train_script_main();"
            "heavy=[m for m in ('torch','transformers','peft','numpy') if m in sys.modules];"
            "print('HEAVY', heavy, time.time()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=60)
    assert out.returncode == 0, out.stderr
    line = [x for x in out.stdout.splitlines() if x.startswith("HEAVY")][0]
    assert "HEAVY []" in line, line
    assert float(line.split()[-1]) < 1.0
    assert "demo" in out.stdout and "oracle-rauru-mac" in out.stdout


@pytest.mark.parametrize("what", ["presets", "experts", "hardware", "datasets"])
def test_lists_as_json(what):
    out = run([f"--list-{what}", "--json"])
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data) >= 3


def test_a_preset_naming_a_missing_table_is_listed_invalid_beside_the_others(tmp_path):
    """The list is where a user looks for what is wrong: one typo must not hide every other preset."""
    text = (ROOT / "config" / "training.toml").read_text()
    assert 'expert = "oracle-sheik-debugger"' in text
    config = tmp_path / "training.toml"
    config.write_text(text.replace('expert = "oracle-sheik-debugger"', 'expert = "oracle-sheik-debuger"', 1))
    out = run(["--config", str(config), "--list-presets"])
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[3:] if line.strip()}
    assert rows["demo"].rstrip().endswith("ok")
    assert "INVALID: expert 'oracle-sheik-debuger' is not defined (did you mean 'oracle-sheik-debugger'?)" in \
        rows["oracle-sheik-mac"]
    # anything that trains or validates still refuses the file, at the line of the typo
    out = run(["--config", str(config), "demo", "--dry-run"])
    assert out.returncode == 2 and "presets.oracle-sheik-mac.expert" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(not SEED.exists(), reason="seed config not present")
def test_json_output_carries_refusals_and_per_preset_validity():
    out = run(["--config", str(SEED), "oracle-farore-windows", "--dry-run", "--json"])
    assert out.returncode == 2 and "max_sequence_length 2048" in out.stderr  # the human message stays on stderr
    data = json.loads(out.stdout)
    assert data["ok"] is False and data["problems"][0]["key"] == "presets.oracle-farore-windows.sequence_length"
    assert data["problems"][0]["line"] == 242
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    hafs = [sys.executable, "-c", "import sys; from hafs.training.cli import main; sys.exit(main())"]
    done = subprocess.run(hafs + ["validate", "--config", str(SEED), "--json"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    report = json.loads(done.stdout)
    assert done.returncode == 2 and report["ok"] is False
    assert report["presets"]["oracle-rauru-mac"] == {"valid": True, "problems": []}
    assert not report["presets"]["oracle-farore-windows"]["valid"]


def test_the_dry_run_checks_report_to_like_a_run():
    out = run(["demo", "--dry-run", "--report-to", "wandbx"])
    assert out.returncode == 2 and "did you mean 'wandb'" in out.stderr and "Traceback" not in out.stderr


def test_output_into_a_closed_pipe_ends_quietly():
    done = subprocess.run(f"{sys.executable} {ROOT / 'scripts' / 'train.py'} --list-presets --json | head -c 1",
                          shell=True, capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.stdout == "[" and done.stderr == ""


@pytest.mark.skipif(not SEED.exists(), reason="seed config not present")
def test_users_original_config_lists_five_presets_and_flags_farore():
    out = run(["--config", str(SEED), "--list-presets"])
    assert out.returncode == 0, out.stderr
    for name in ("oracle-rauru-mac", "oracle-rauru-windows", "oracle-rauru-cloud", "oracle-farore-windows",
                 "oracle-sheik-mac"):
        assert name in out.stdout
    farore = [line for line in out.stdout.splitlines() if line.startswith("oracle-farore-windows")][0]
    assert "INVALID" in farore and "4096" in farore and "2048" in farore
    out = run(["--config", str(SEED), "oracle-farore-windows", "--dry-run"])
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "original-training.toml:" in out.stderr and "max_sequence_length 2048" in out.stderr


def test_unknown_preset_says_not_found_with_choices():
    out = run(["oracle-rauru-macc"])
    assert out.returncode == 2
    assert "Error: Preset 'oracle-rauru-macc' not found" in out.stderr
    assert "did you mean 'oracle-rauru-mac'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("path", CORPUS[::6], ids=lambda p: p.stem)
def test_broken_configs_exit_2_without_traceback(path):
    out = run(["--config", str(path), "--list-presets"])
    if out.returncode == 0:  # a file that only fails when its preset is resolved
        out = run(["--config", str(path), "run", "--dry-run"])
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and str(path.name) in out.stderr


def test_bad_override_is_a_located_error():
    out = run(["demo", "--dry-run", "--set", "batch_size=abc", "--set", "learnig_rate=1"])
    assert out.returncode == 2
    assert "--set batch_size" in out.stderr and "learning_rate" in out.stderr
    assert "Traceback" not in out.stderr


def test_hafs_console_script_shares_the_implementation():
    from hafs.training.cli import main

    assert main(["list", "presets", "--json"]) == 0
    assert main(["validate"]) == 0
    assert main(["show", "no-such-preset"]) == 2


def test_every_module_imports_on_its_own():
    # A module imported first (as a user or a lazy import may) must not hit an import cycle.
    import pkgutil
    import subprocess
    import sys

    import hafs.training

    names = [m.name for m in pkgutil.iter_modules(hafs.training.__path__, "hafs.training.")]
    code = ("import importlib, sys\nfailed = []\nfor name in sys.argv[1:]:\n"
            "    for key in [k for k in sys.modules if k.startswith('hafs')]:\n        del sys.modules[key]\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as exc:\n        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
            "print('\\n'.join(failed))")
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300,
                          check=False)
    assert len(names) > 30 and done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


def hafs(args, **kw):
    """`hafs ARGS` in a fresh process (as the console script runs it)."""
    code = "import sys; from hafs.training.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120, **kw)


def test_train_dry_run_is_show_and_loads_no_model(capsys, monkeypatch):
    from hafs.training import cli, config_trainer

    def no_training(*a, **k):
        raise AssertionError("a dry run built a trainer")

    monkeypatch.setattr(config_trainer, "ConfigTrainer", no_training)
    for extra, code in (([], 0), (["--set", "batch_size=abc"], 2), (["--json"], 0), (["--force"], 0)):
        assert cli.main(["show", "demo", *extra]) == code
        shown = capsys.readouterr()
        assert cli.main(["train", "demo", "--dry-run", *extra]) == code
        dry = capsys.readouterr()
        assert (dry.out, dry.err) == (shown.out, shown.err) and "Model saved" not in dry.out
    # train's own options are checked as a run would check them
    assert cli.main(["train", "demo", "--dry-run", "--json", "--report-to", "wandbx"]) == 2
    refusal = capsys.readouterr()
    assert json.loads(refusal.out)["ok"] is False and "did you mean 'wandb'" in refusal.err
    assert cli.main(["train", "demo", "--dry-run", "--no-register", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert cli.main(["train", "demo", "--dry-run", "--resume", "auto"]) == 0
    assert "does not look at --resume" in capsys.readouterr().err


@pytest.mark.parametrize("args,says", [
    (["models", "show", "x", "--expert", "a"], "--expert only applies to 'hafs models list'"),
    (["models", "list", "--yes"], "--yes only applies to 'hafs models rm'"),
    (["generate", "m", "--interactive", "--json"], "--json only applies to a single reply"),
    (["merge", "m", "--out", "o", "--config", "c.toml"], "unrecognized arguments: --config"),
    (["export", "m", "--config", "c.toml"], "unrecognized arguments: --config"),
    (["launch", "demo", "--dry-run", "--json"], "unrecognized arguments: --json"),
    (["tune", "demo", "--json"], "unrecognized arguments: --json"),
    (["eval", "m", "--config", "c.toml"], "--config only applies to evaluating on another --dataset"),
])
def test_options_a_command_would_ignore_are_refused(args, says, capsys):
    from hafs.training.cli import main

    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("args,says", [
    (["--list-presets", "--set", "lr=1"], "--set applies only when training a PRESET"),
    (["--eval", "m", "--no-register", "--dry-run"], "--dry-run, --no-register apply only when training a PRESET"),
    (["demo", "--list-presets"], "give one of PRESET, --list-*, --detect or --eval, not PRESET and --list-*"),
    (["demo", "--dataset", "other"], "--dataset goes with --eval MODEL_DIR"),
    (["--eval", "m", "--config", "c.toml"], "--config only applies to evaluating on another --dataset"),
    (["--list-presets", "--force", "--no-eval", "--report-to", "wandb"],
     "--report-to, --force, --no-eval apply only when training a PRESET"),
])
def test_train_script_refuses_options_it_would_drop(args, says):
    out = run(args)
    assert out.returncode == 2 and says in out.stderr and out.stdout == ""


def test_eval_reads_config_with_dataset(tmp_path, capsys):
    from hafs.training.cli import main

    assert main(["eval", str(tmp_path / "no-model"), "--config", "c.toml", "--dataset", "d"]) == 2  # not refused
    assert "only applies" not in capsys.readouterr().err


def test_tune_says_trials_is_the_total(tmp_path, tiny_model, capsys):
    pytest.importorskip("optuna")
    from conftest import tiny_config

    from hafs.training.cli import build_parser, main

    tune = build_parser()._subparsers._group_actions[0].choices["tune"]
    assert "in all, not how many to add" in " ".join(tune.format_help().split())
    config = tiny_config(tmp_path, tiny_model, preset="t", hyperparameters="max_steps = 2\neval_steps = 1",
                         hyperparameters_name="h", extra='[tuning.t]\nlearning_rate = {type = "loguniform", '
                         'low = 1e-4, high = 1e-2}\n')
    assert main(["tune", "t", "--config", str(config), "--trials", "1"]) == 0
    capsys.readouterr()
    assert main(["tune", "t", "--config", str(config), "--trials", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 finished trial(s), running 0 more" in out and "--trials is the study's total: use --trials 2 for 1 more" \
        in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("began", [False, True])
def test_a_signal_before_training_says_nothing_was_saved_and_how_to_start_again(sig, began):
    """Loading and the first evaluation run before the training loop's guard: Python's default SIGTERM
    ended the process there with status 143 and not a word."""
    # A terminal's Ctrl-C: a shell running the tests in the background (`.ci/run &`) starts them with
    # SIGINT ignored, which Python then leaves ignored (and so does hafs: nohup-style runs keep it so).
    code = ("import os, signal, sys, time; from hafs.training import cli, faults\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "def train(args):\n"
            f"    if {began}:\n"
            "        with faults.SignalGuard(): pass\n"
            f"    os.kill(os.getpid(), {int(sig)}); time.sleep(30)\n"
            "cli.cmd_train = train\n"
            "sys.exit(cli.main(['train', 'demo', '--config', 'my config.toml', '--set', 'seed=3']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 128 + sig and "Traceback" not in done.stderr
    if began:  # stopped after the loop: checkpoints or the model may exist, so no "nothing was saved"
        assert done.stderr.strip() == f"Interrupted ({sig.name})."
    else:
        assert done.stderr.strip() == (f"Interrupted ({sig.name}) before training began: nothing was saved. "
                                       "Start again with: python scripts/train.py demo --config 'my config.toml' "
                                       "--set seed=3")


def test_train_json_prints_one_json_answer(tmp_path, tiny_model, capsys, one_thread):
    from conftest import tiny_config

    from hafs.training.cli import main

    config = tiny_config(tmp_path, tiny_model, preset="t", hyperparameters="max_steps = 2\nlogging_steps = 1",
                         hyperparameters_name="h")
    assert main(["train", "t", "--config", str(config), "--no-eval", "--json"]) == 0
    printed = capsys.readouterr()
    answer = json.loads(printed.out)  # the whole of stdout: progress went to stderr
    assert answer["ok"] is True and (Path(answer["model_dir"]) / "metadata.json").is_file()
    assert "step 2/2" in printed.err


def test_a_stop_before_training_repeats_every_train_option_and_answers_json():
    """`hafs train big --force`, Ctrl-C while loading: the printed command must pass the memory check again."""
    code = ("import os, sys, time; from hafs.training import cli\n"
            "def train(args):\n"
            f"    os.kill(os.getpid(), {int(signal.SIGTERM)}); time.sleep(30)\n"
            "cli.cmd_train = train\n"
            "sys.exit(cli.main(['train', 'demo', '--set', 'seed=3', '--force', '--no-eval', '--no-register', "
            "'--report-to', 'tensorboard', '--json']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    again = ("python scripts/train.py demo --set seed=3 --set 'report_to=[\"tensorboard\"]' --force --no-eval "
             "--no-register")
    assert done.stderr.strip() == f"Interrupted (SIGTERM) before training began: nothing was saved. Start again " \
                                  f"with: {again}"
    answer = json.loads(done.stdout)  # the one answer on stdout, as for an error
    assert answer["ok"] is False and answer["exit_code"] == 143 and again in answer["problems"][0]["message"]


def test_a_run_stopped_in_training_says_to_resume_with_its_own_options(tmp_path, tiny_model, capsys, monkeypatch,
                                                                        one_thread):
    from conftest import tiny_config

    from hafs.training import engine
    from hafs.training.cli import main

    def stopped_at_once(*args, **kwargs):  # a Ctrl-C that lands in the training loop, at step 0
        os.kill(os.getpid(), signal.SIGINT)
        return args[5]

    monkeypatch.setattr(engine, "train", stopped_at_once)
    config = tiny_config(tmp_path, tiny_model, preset="t", hyperparameters="max_steps = 2", hyperparameters_name="h")
    assert main(["train", "t", "--config", str(config), "--force", "--no-eval", "--register", "--json"]) == 130
    printed = capsys.readouterr()
    assert f"--config {config} --force --no-eval --register --resume auto" in printed.err, printed.err
    answer = json.loads(printed.out)
    assert answer["ok"] is False and answer["exit_code"] == 130 and "--force --no-eval --register --resume auto" \
        in answer["problems"][0]["message"]
