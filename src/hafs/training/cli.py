"""The command line: `python scripts/train.py PRESET` (the seed's interface) and `hafs <command>`.

One implementation behind both: each command is a function taking parsed args. Heavy modules are
imported inside the commands that need them, so listing presets answers instantly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import signal
import sys
import traceback

from .errors import HafsError

EXAMPLES_TRAIN = """examples:
  python scripts/train.py --list-presets
  python scripts/train.py demo                      # offline demo on this CPU
  python scripts/train.py oracle-rauru-mac --dry-run
  python scripts/train.py oracle-rauru-mac --set learning_rate=3e-4 --set num_epochs=2
  python scripts/train.py oracle-rauru-mac --resume auto
"""

# command name → "module:function" (imported only when that command runs)
COMMANDS = {
    "train": "hafs.training.cli:cmd_train",
    "list": "hafs.training.cli:cmd_list",
    "show": "hafs.training.cli:cmd_show",
    "validate": "hafs.training.cli:cmd_validate",
    "detect": "hafs.training.hardware_report:cmd_detect",
    "eval": "hafs.training.evaluate:cmd_eval",
    "models": "hafs.training.models_cli:cmd_models",
    "generate": "hafs.training.generate:cmd_generate",
    "merge": "hafs.training.merge:cmd_merge",
    "export": "hafs.training.export:cmd_export",
    "launch": "hafs.training.launch:cmd_launch",
    "tune": "hafs.training.tune:cmd_tune",
}


def _common(p: argparse.ArgumentParser, *, config: bool = True, json_output: bool = True) -> None:
    """The options most commands share; a command that would ignore one does not offer it."""
    if config:
        p.add_argument("--config", metavar="FILE", help="training config (default: config/training.toml)")
    p.add_argument("-v", "--verbose", action="store_true", help="more output; tracebacks for internal errors")
    if json_output:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the resolved plan (repeatable), e.g. learning_rate=3e-4, lora.r=16")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; load no model")
    p.add_argument("--resume", metavar="auto|PATH", help="continue from the latest (auto) or a given checkpoint")
    p.add_argument("--force", action="store_true",
                   help="run despite a memory estimate over the profile's limit or a changed config on resume")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip evaluation before/after training")
    p.add_argument("--report-to", metavar="LIST", help="trackers, comma-separated: tensorboard,wandb,mlflow")
    reg = p.add_mutually_exclusive_group()
    reg.add_argument("--register", dest="register", action="store_true", default=None,
                     help="update the model registry ([output] registry) after training")
    reg.add_argument("--no-register", dest="register", action="store_false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hafs", description="Configuration-driven LoRA fine-tuning.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="run 'hafs COMMAND -h' for a command's options\n\n" + EXAMPLES_TRAIN)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="train a preset", epilog=EXAMPLES_TRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset")
    _common(p), _train_options(p)
    p = sub.add_parser("list", help="list presets, experts, hardware or datasets")
    p.add_argument("what", choices=["presets", "experts", "hardware", "datasets"], nargs="?", default="presets")
    _common(p)
    p = sub.add_parser("show", help="validate a preset and print its resolved plan (a dry run)")
    p.add_argument("preset")
    _common(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("validate", help="check the config file and every preset")
    _common(p)
    p = sub.add_parser("detect", help="detect this machine's hardware and the presets that fit it")
    _common(p)
    p = sub.add_parser("eval", help="evaluate a trained model directory")
    p.add_argument("model_dir")
    p.add_argument("--dataset", help="a dataset of the config to evaluate on (default: the one trained on)")
    _common(p)
    p = sub.add_parser("models", help="list, show, compare or remove trained models")
    p.add_argument("action", nargs="?", default="list", choices=["list", "show", "compare", "rm"])
    p.add_argument("names", nargs="*")
    p.add_argument("--expert"), p.add_argument("--dataset")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (rm)")
    _common(p)
    p = sub.add_parser("generate", help="generate a reply from a trained model")
    p.add_argument("model_dir"), p.add_argument("instruction", nargs="?")
    p.add_argument("--input", default=""), p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--interactive", action="store_true")
    _common(p, config=False)  # the model folder carries its settings
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    p.add_argument("model_dir"), p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype of the merged weights (default: the base model's)")
    _common(p, config=False)
    p = sub.add_parser("export", help="export a trained model for llama.cpp / Ollama")
    p.add_argument("model_dir"), p.add_argument("--format", choices=["gguf", "ollama"], default="gguf")
    p.add_argument("--outtype", choices=["f16", "q8_0", "f32", "bf16"], default="f16")
    reg = p.add_mutually_exclusive_group()
    reg.add_argument("--register", dest="register", action="store_true", default=None,
                     help="record the export in the model registry (default: when [output] registry is set)")
    reg.add_argument("--no-register", dest="register", action="store_false")
    _common(p, config=False)
    p = sub.add_parser("launch", help="train a preset on a cloud GPU with SkyPilot")
    p.add_argument("preset"), p.add_argument("--cloud", choices=["runpod", "lambda"], default="runpod")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _common(p, json_output=False)
    p = sub.add_parser("tune", help="search hyperparameters with Optuna")
    p.add_argument("preset")
    p.add_argument("--trials", type=int, default=10, metavar="N",
                   help="how many finished (complete or pruned) trials the study should have in all, not how many "
                        "to add (default: 10): run again with a larger N to continue a study")
    p.add_argument("--space", help="[tuning.NAME] table to use (default: the preset's name, else 'default')")
    p.add_argument("--keep-models", action="store_true", help="keep every trial's model directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _common(p, json_output=False)
    return parser


def build_train_script_parser() -> argparse.ArgumentParser:
    """The seed's flat interface: `train.py PRESET [options]` or `train.py --list-presets`."""
    p = argparse.ArgumentParser(prog="train.py", description="Train a preset of config/training.toml.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES_TRAIN)
    p.add_argument("preset", nargs="?")
    _common(p), _train_options(p)
    listing = p.add_mutually_exclusive_group()  # one list per call: two would print only the last
    for what in ("presets", "experts", "hardware", "datasets"):
        listing.add_argument(f"--list-{what}", dest="list_what", action="store_const", const=what,
                             help=f"list the config's {what}")
    p.add_argument("--detect", action="store_true", help="detect this machine and the presets that fit")
    p.add_argument("--eval", metavar="MODEL_DIR", dest="eval_dir", help="evaluate a trained model directory")
    p.add_argument("--dataset", help="with --eval: another dataset of the config")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hafs` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    _refuse_ignored(parser, args)
    return _run(COMMANDS[args.command], args)


def train_script_main(argv: list[str] | None = None) -> int:
    """Entry point of `scripts/train.py`, mapped onto the same commands as `hafs`."""
    parser = build_train_script_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # One action per call: the first of them would run and silently drop the others' options.
    actions = [name for name, given in (("PRESET", args.preset), ("--list-*", args.list_what),
                                        ("--detect", args.detect), ("--eval", args.eval_dir)) if given]
    if len(actions) > 1:
        parser.error(f"give one of PRESET, --list-*, --detect or --eval, not {' and '.join(actions)}")
    if args.dataset and not args.eval_dir:
        parser.error("--dataset goes with --eval MODEL_DIR (a training run takes its dataset from the preset)")
    from .faults import run_flags

    # train's own options (see _train_options), as typed
    training = [flag for flag, given in (("--set", args.overrides), ("--dry-run", args.dry_run),
                                         ("--resume", args.resume), ("--report-to", args.report_to)) if given]
    training += run_flags(args)  # --force, --no-eval, --register / --no-register
    if training and not args.preset:
        parser.error(f"{', '.join(training)} {'apply' if len(training) > 1 else 'applies'} only when training a PRESET")
    if args.list_what:
        args.what = args.list_what
        return _run(COMMANDS["list"], args)
    if args.detect:
        return _run(COMMANDS["detect"], args)
    if args.eval_dir:
        args.command, args.model_dir = "eval", args.eval_dir
        _refuse_ignored(parser, args)
        return _run(COMMANDS["eval"], args)
    if not args.preset:
        parser.print_help()
        return 2
    return _run(COMMANDS["train"], args)  # cmd_train turns --dry-run into `show`


# Options that argparse accepts everywhere in a command but that only some of its forms read:
# (command, option's dest, its flag, when it is read, that form) — refused elsewhere, never dropped.
_ONLY_WITH = (
    ("models", "expert", "--expert", lambda a: a.action == "list", "'hafs models list'"),
    ("models", "dataset", "--dataset", lambda a: a.action == "list", "'hafs models list'"),
    ("models", "yes", "--yes", lambda a: a.action == "rm", "'hafs models rm'"),
    ("generate", "json", "--json", lambda a: not a.interactive, "a single reply (not --interactive)"),
    # The model folder carries the settings it was trained with; the config is read for another dataset only.
    ("eval", "config", "--config", lambda a: a.dataset, "evaluating on another --dataset"),
)


def _refuse_ignored(parser: argparse.ArgumentParser, args) -> None:
    """Exit 2 (argparse's usage error) for an option the chosen form of the command would not read."""
    for command, dest, flag, read, form in _ONLY_WITH:
        if args.command == command and getattr(args, dest) not in (None, False) and not read(args):
            parser.error(f"{flag} only applies to {form}")


def _run(target: str, args) -> int:
    """Run one command (see _run_command); a torchrun worker of `train` then exits at once."""
    code = _run_command(target, args)
    if target.endswith(":cmd_train"):
        from .distributed import exit_if_worker, is_main_process
        from .relaunch import report_stop

        code = exit_if_worker(report_stop(code, is_main_process()))
    return code


def _run_command(target: str, args) -> int:
    """Run one command; user errors become a short message and exit status 2, never a traceback."""
    from . import faults

    module, func = target.split(":")
    guards = faults.SignalGuard.entered
    try:
        with faults.terminate_as_interrupt():  # SIGTERM is reported like Ctrl-C, not a silent exit 143
            return getattr(importlib.import_module(module), func)(args) or 0
    except HafsError as exc:
        from .distributed import is_main_process

        # rank 0 alone saves a checkpoint and says where
        if is_main_process() or not isinstance(exc, faults.Interrupted):
            _report(exc, args)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # outside a training loop's guard (which turns a first signal into Interrupted)
        from .distributed import is_main_process
        from .errors import Problem

        signum = getattr(exc, "signum", signal.SIGINT)
        if is_main_process():
            began = faults.SignalGuard.entered > guards
            text = _interrupted(target, args, signal.Signals(signum).name, began)
            _report(faults.Interrupted([Problem(text)], exit_code=128 + int(signum)), args, prefix="\n")
        return 128 + int(signum)
    except BrokenPipeError:  # the reader left (`| head`): not an error; keep the exit-time flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception:  # a bug in hafs: say so plainly
        if getattr(args, "verbose", False) or os.environ.get("HAFS_DEBUG"):
            traceback.print_exc()
        else:
            etype, value = sys.exc_info()[:2]
            print(f"Internal error (a bug in hafs): {etype.__name__}: {value}\n"
                  "Re-run with --verbose for the traceback, and please report it.", file=sys.stderr)
        return 1


def _report(exc: HafsError, args, prefix: str = "Error: ") -> None:
    """Print why the command stopped: to stderr, and with --json as the one JSON answer on stdout."""
    print(f"{prefix}{exc.render()}", file=sys.stderr)
    if getattr(args, "json", False):  # a program reading stdout gets the refusal too, not an empty page
        print(json.dumps({"ok": False, "error": exc.title or exc.kind, "exit_code": exc.exit_code,
                          "problems": [dataclasses.asdict(p) for p in exc.problems]}, indent=2))


def _interrupted(target: str, args, name: str, training_began: bool) -> str:
    """The line a stop by signal ends with; for a run stopped before its training loop: how to start again."""
    if target.endswith(":cmd_train") and not training_began and not args.dry_run:
        from .faults import run_flags, train_command

        again = train_command(args.preset, args.config, _overrides(args), args.resume, run_flags(args))
        return f"Interrupted ({name}) before training began: nothing was saved. Start again with: {again}"
    return f"Interrupted ({name})."


# --------------------------------------------------------------------------- commands


def _load(args):
    from .loader import load_config

    return load_config(args.config)


def cmd_list(args) -> int:
    from .listing import render_list
    from .loader import load_config

    cfg = load_config(args.config, references=False)  # a preset naming a missing table is listed INVALID

    print(render_list(cfg, args.what, as_json=args.json))
    return 0


def cmd_validate(args) -> int:
    from .errors import ConfigError
    from .plan import resolve

    cfg = _load(args)
    results = {}
    for name in cfg.presets:
        try:
            resolve(cfg, name)
            results[name] = []
        except ConfigError as exc:
            results[name] = exc.problems
    failed = sum(1 for problems in results.values() if problems)
    if args.json:
        print(json.dumps({"ok": not failed, "config": cfg.path, "presets": {
            name: {"valid": not problems, "problems": [dataclasses.asdict(p) for p in problems]}
            for name, problems in results.items()}}, indent=2))
        return 2 if failed else 0
    for name, problems in results.items():
        print(f"  FAIL  {name}\n" + "\n".join("        " + p.render() for p in problems) if problems
              else f"  ok    {name}")
    print(f"{cfg.path}: {len(cfg.presets) - failed} of {len(cfg.presets)} presets valid")
    return 2 if failed else 0


def cmd_show(args) -> int:
    from .dryrun import dry_run

    cfg = _load(args)
    report = dry_run(cfg, args.preset, _overrides(args), force=getattr(args, "force", False),
                     register=getattr(args, "register", None))
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.render())
    if report.plan.world_size() > 1 and not args.json:
        from .distributed import describe_launch

        print(describe_launch(report.plan))
    return 0 if report.ok else 2


def _overrides(args) -> list[str]:
    """--set options, and --report-to as the report_to override (a dry run checks it like a run)."""
    overrides = list(args.overrides)
    if getattr(args, "report_to", None):
        overrides.append("report_to=" + json.dumps([s.strip() for s in args.report_to.split(",") if s.strip()]))
    return overrides


def cmd_train(args) -> int:
    if args.dry_run:  # exactly `hafs show`: the same plan, checks and exit status, no model loaded
        skipped = [flag for flag, given in (("--resume", args.resume), ("--no-eval", not args.evaluate)) if given]
        if skipped:
            print(f"note: a dry run checks the config and the plan; it does not look at {' or '.join(skipped)}",
                  file=sys.stderr)
        return cmd_show(args)
    from . import distributed
    from .config_trainer import ConfigTrainer

    # --json: what a run prints (log lines, progress) goes to stderr, so stdout is the one JSON answer
    # (or the refusal _run_command prints once this has given stdout back)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        trainer = ConfigTrainer(args.config, verbose=args.verbose)
        overrides = _overrides(args)
        plan = trainer.build_training_config(args.preset, overrides)
        if distributed.needs_launch(plan):  # several workers asked for: run this command under torchrun
            from .relaunch import relaunch

            return relaunch(plan)
        out = trainer.train_with_config(plan, overrides=overrides, resume=args.resume, force=args.force,
                                        evaluate=args.evaluate, register=args.register)
    if distributed.is_main_process():
        print(json.dumps({"ok": True, "model_dir": str(out)}) if args.json else f"Model saved to: {out}")
    return 0
