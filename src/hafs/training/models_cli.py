"""`hafs models [list | show NAME | compare A B | rm NAME]`: the command and its text output.

The folders are read by registry.py (metadata.json only: instant, never loads a model); this module
turns what it found into tables and `--json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from .errors import ConfigError, Problem
from .registry import (
    OK,
    ModelEntry,
    compare_models,
    find_model,
    human_size,
    matches,
    remove_model,
    scan_models,
    show_data,
)


def models_dir_from_config(config_path: str | None) -> tuple[Path, str]:
    """(models_dir, the user's registry file) of the config, resolved like the plan resolves them.

    The registry is `[output] registry`, else the default `--register` writes to.
    """
    from .loader import load_config
    from .plan import resolve_path
    from .user_registry import DEFAULT_REGISTRY

    cfg = load_config(config_path)
    base = Path(cfg.path).resolve().parent
    registry = resolve_path(cfg.output.registry, base) if cfg.output.registry else Path(DEFAULT_REGISTRY).expanduser()
    return Path(os.path.normpath(resolve_path(cfg.output.models_dir, base))), os.path.normpath(registry)


def cmd_models(args) -> int:
    """`hafs models [list|show NAME|compare A B|rm NAME]`."""
    models_dir, registry = models_dir_from_config(getattr(args, "config", None))
    action, names = args.action, list(args.names or [])
    wanted = {"list": 0, "show": 1, "compare": 2, "rm": 1}[action]
    if len(names) != wanted:
        usage = {"list": "hafs models [--expert X] [--dataset Y]", "show": "hafs models show NAME",
                 "compare": "hafs models compare A B", "rm": "hafs models rm NAME [--yes]"}[action]
        raise ConfigError([Problem(f"'{action}' takes {wanted} model name{'s' * (wanted != 1)}, got {len(names)}",
                                   hint=f"usage: {usage}")])
    if action == "list":
        entries = [_mark_checkpoints(e) for e in scan_models(models_dir, registry_path=Path(registry) if registry
                                                             else None)]
        if args.expert or args.dataset:
            entries = [e for e in entries if e.status == OK and matches(e, expert=args.expert, dataset=args.dataset)]
        if args.json:
            print(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
        else:
            print(render_list(entries, models_dir))
        return 0
    if action == "show":
        path = find_model(models_dir, names[0])
        data = show_data(path)
        data["entry"] = dataclasses.asdict(_mark_checkpoints(ModelEntry(**data["entry"])))
        print(json.dumps(data, indent=2, default=str) if args.json else render_show(data))
        return 0 if data["entry"]["status"] == OK else 2
    if action == "compare":
        a, b = (find_model(models_dir, n) for n in names)
        diff = compare_models(a, b)
        print(json.dumps(diff, indent=2, default=str) if args.json else render_compare(diff))
        return 0
    target = os.path.normpath(Path(models_dir, names[0]).expanduser().absolute())
    what, how = checkpoints_in(Path(target)) if not os.path.islink(target) else ("", "")
    if what:
        raise ConfigError([Problem(
            f"refusing to remove {target}: it holds training checkpoints ({what}), not a model",
            hint=f"a checkpoint continues its run (hafs train {how}); delete the folder yourself once "
                 "it is not needed, and keep [output] checkpoints_dir out of models_dir")])
    removed = remove_model(models_dir, names[0], yes=args.yes)
    if removed and registry:
        _warn_registry_points_at(Path(registry), target)
    return 0 if removed else 1


CHECKPOINTS = "checkpoints"
"""The status `hafs models` gives a folder of training checkpoints found in models_dir."""


def checkpoints_in(folder: Path) -> tuple[str, str]:
    """(what, how) when `folder` holds training checkpoints, else ('', ''): what they are, for messages, and
    the `hafs train` arguments that continue one (`PRESET --resume PATH`).

    A run folder holds checkpoint-<step>/ folders; a whole checkpoints_dir holds such run folders. They end
    up in models_dir when checkpoints_dir was models_dir or inside it: resumable runs, which `hafs models`
    must neither list as leftovers to clean up nor delete.
    """
    from .checkpoint import list_checkpoints
    from .resume import saved_preset

    if not folder.is_dir():
        return "", ""
    steps = list_checkpoints(folder)
    if steps:
        return ", ".join(p.name for p in steps), f"{saved_preset(steps[0]) or 'PRESET'} --resume {folder}"
    try:
        runs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and list_checkpoints(p))
    except OSError:
        return "", ""
    if not runs:
        return "", ""
    what = f"run folder{'s' * (len(runs) != 1)} {', '.join(p.name for p in runs)}"
    return what, (checkpoints_in(runs[0])[1] if len(runs) == 1 else f"PRESET --resume {folder}{os.sep}RUN")


def _mark_checkpoints(entry: ModelEntry) -> ModelEntry:
    """A folder that is not a model but holds checkpoints shows as such, not as a leftover to remove."""
    what, how = checkpoints_in(Path(entry.path)) if entry.status != OK else ("", "")
    if what:
        entry.status = CHECKPOINTS
        entry.problem = f"training checkpoints ({what}), not a model; continue with hafs train {how}"
    return entry


def _warn_registry_points_at(registry: Path, removed: str) -> None:
    """Registry entries whose model_dir was the removed folder: the user's file is theirs to edit, so say
    which entries a llama.cpp server would now fail to load, rather than rewrite them."""
    from .errors import HafsError
    from .user_registry import registered_experts

    try:
        entries = registered_experts(registry)
    except HafsError:
        return
    for name, entry in entries.items():
        where = entry.get("model_dir")
        if isinstance(where, str) and os.path.normpath(Path(where).expanduser().absolute()) == removed:
            print(f"warning: {registry}: models.{name}.model_dir still names the removed {removed}; "
                  "train that expert again (it updates the entry) or edit the entry", file=sys.stderr)


def render_list(entries: list[ModelEntry], models_dir: Path) -> str:
    """The table of `hafs models`: finished models newest first, then folders that are not usable."""
    if not entries:
        return f"No models in {models_dir} (train one: python scripts/train.py demo)"
    good = [e for e in entries if e.status == OK]
    held = [e for e in entries if e.status == CHECKPOINTS]
    odd = [e for e in entries if e.status not in (OK, CHECKPOINTS)]
    headers = ["NAME", "EXPERT", "BASE", "DATASET", "DATE", "SAMPLES", "EVAL LOSS", "SIZE"]
    rows = [[e.name + (" *" if e.registered else ""), e.expert, _short(e.base), e.dataset,
             e.created[:16].replace("T", " "), "" if e.samples is None else str(e.samples),
             "" if e.eval_loss is None else f"{e.eval_loss:.4f}", human_size(e.size_bytes)] for e in good]
    lines = []
    if rows:
        widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [headers] + rows]
    if odd:
        lines += ([""] if lines else []) + ["Not usable (hafs models rm NAME to clean up):"]
        width = max(len(e.name) for e in odd)
        lines += [f"  {e.name.ljust(width)}  {e.status}: {e.problem} ({human_size(e.size_bytes)})" for e in odd]
    if held:
        lines += ([""] if lines else []) + [
            "Training checkpoints, not models ([output] checkpoints_dir belongs outside models_dir; "
            "hafs models rm leaves them):"]
        width = max(len(e.name) for e in held)
        lines += [f"  {e.name.ljust(width)}  {e.problem} ({human_size(e.size_bytes)})" for e in held]
    foot = f"{len(good)} model{'s' * (len(good) != 1)} in {models_dir}"
    if odd:
        foot += f", {len(odd)} unusable folder{'s' * (len(odd) != 1)}"
    if held:
        foot += f", {len(held)} folder{'s' * (len(held) != 1)} of checkpoints"
    if any(e.registered for e in good):
        foot += "  (* = in your model registry)"
    return "\n".join(lines + ["", foot])


def _short(base: str) -> str:
    """A local path's last two components; hub ids as they are."""
    return "/".join(Path(base).parts[-2:]) if os.sep in base and len(Path(base).parts) > 2 else base


def render_show(data: dict) -> str:
    """`hafs models show NAME` as text."""
    e = data["entry"]
    lines = [f"{e['name']}", f"  path:        {e['path']}"]
    if e["status"] != OK:
        return "\n".join(lines + [f"  status:      {e['status']}: {e['problem']}",
                                  f"  files:       {', '.join(data['files']) or 'none'}"])
    training, model = data.get("training") or {}, data.get("model") or {}
    lines += [
        f"  expert:      {e['expert_name']} ({e['expert']})" if e["expert"] != e["expert_name"] else
        f"  expert:      {e['expert']}",
        f"  base model:  {model.get('base')}  (LoRA r={model.get('lora_rank')}, alpha={model.get('lora_alpha')})",
        f"  dataset:     {e['dataset']}  ({os.path.normpath(str(training.get('dataset')))})",
        f"  trained:     {e['created'][:19].replace('T', ' ')}, preset {e['preset'] or '?'}, "
        f"{training.get('num_samples')} samples, {training.get('num_epochs')} epochs, "
        f"lr {training.get('learning_rate')}, {training.get('duration_minutes', '?')} min",
        f"  size:        {human_size(e['size_bytes'])}",
    ]
    metrics = data.get("metrics") or {}
    if "training.final_loss" in metrics:
        lines.append(f"  train loss:  {metrics['training.final_loss']:.4f} (last step)")
    for split in ("val", "test"):
        before, after = metrics.get(f"eval.before.{split}.loss"), metrics.get(f"eval.after.{split}.loss")
        if after is not None:
            ppl = metrics.get(f"eval.after.{split}.perplexity")
            text = f"  {split + ' loss:':<13}{after:.4f}" + (f" (perplexity {ppl:.2f})" if ppl is not None else "")
            if before is not None:
                text += f", before training {before:.4f} ({after - before:+.4f})"
            lines.append(text)
    scores = {k.rsplit(".", 1)[1]: v for k, v in metrics.items() if k.startswith("eval.after.generation.")}
    count = scores.pop("count", None)
    if scores:
        head = f"{count:.0f} samples, " if count else ""
        lines.append("  generations: " + head + ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())))
    lines.append(f"  loss curve:  {e['loss_curve'] or 'none (no loss_curve.png)'}")
    if "eval/generations.jsonl" in data["files"]:
        lines.append(f"  samples:     {Path(e['path']) / 'eval' / 'generations.jsonl'}")
    return "\n".join(lines)


def render_compare(diff: dict) -> str:
    """`hafs models compare A B` as text."""
    a, b = diff["a"], diff["b"]
    lines = [f"A: {a}", f"B: {b}", "", f"Config differences ({len(diff['config'])}):"]
    if not diff["config"]:
        lines.append("  none: same plan")
    width = max([len(k) for k in diff["config"]] + [len(k) for k in diff["metrics"]] + [6])
    for key, (va, vb) in diff["config"].items():
        lines.append(f"  {key.ljust(width)}  {_fmt(va)}  ->  {_fmt(vb)}")
    lines += ["", "Metrics:", f"  {'':{width}}  {'A':>12}  {'B':>12}  {'B - A':>10}"]
    for key, (va, vb) in diff["metrics"].items():
        delta = ""
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            delta = f"{vb - va:+d}" if isinstance(va, int) and isinstance(vb, int) else f"{vb - va:+.4f}"
        lines.append(f"  {key.ljust(width)}  {_fmt(va):>12}  {_fmt(vb):>12}  {delta:>10}")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
