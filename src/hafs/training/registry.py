"""The trained models under `[output] models_dir`, read from their folders (`hafs models`: models_cli.py).

Each model folder describes itself in `metadata.json` (written last, so a folder without it is a
save that never finished). The listing reads only those files: it is instant and never loads a
model. Anything odd on disk (no metadata, corrupt JSON, a `.staging-*` leftover of an interrupted
save) is listed as such instead of stopping the listing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, Problem, did_you_mean
from .outputs import STAGING_PREFIX, read_metadata

OK, INCOMPLETE, BROKEN, PARTIAL = "ok", "incomplete", "broken", "partial"


@dataclass
class ModelEntry:
    """One folder of models_dir, as `hafs models` shows it."""

    name: str
    """Folder name."""
    path: str
    """Absolute path of the folder."""
    status: str = OK
    """ok, incomplete (no metadata.json), broken (unreadable metadata.json) or partial (interrupted save)."""
    problem: str = ""
    """What is wrong, when status is not ok."""
    expert: str = ""
    """Expert key in the config ([experts.KEY]); the display name when the key was not recorded."""
    expert_name: str = ""
    """The expert's display name."""
    base: str = ""
    """Base model (hub id or local path)."""
    dataset: str = ""
    """Dataset key ([datasets.KEY]), else the dataset folder's name."""
    preset: str = ""
    """Preset the model was trained with."""
    created: str = ""
    """ISO time the model was saved."""
    samples: int | None = None
    """Training samples after filtering."""
    train_loss: float | None = None
    """Training loss of the last step."""
    eval_loss: float | None = None
    """Loss after training on val (else test, else the last evaluation during training)."""
    size_bytes: int = 0
    """Bytes on disk."""
    loss_curve: str = ""
    """Path of loss_curve.png, when there is one."""
    registered: bool | None = None
    """Whether the user's registry points at this folder (None: no registry to check)."""

    def sort_time(self) -> float:
        """Seconds since the epoch: the recorded creation time, else the folder's mtime."""
        try:
            return dt.datetime.fromisoformat(self.created).timestamp()
        except (TypeError, ValueError):
            try:
                return os.stat(self.path).st_mtime
            except OSError:
                return 0.0


# ----------------------------------------------------------------------------- reading folders

def folder_size(path: Path) -> int:
    """Bytes of the regular files under `path` (links not followed; unreadable entries skipped)."""
    total = 0
    for root, _dirs, files in os.walk(path, onerror=lambda e: None):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


def _staging_pid(name: str) -> int | None:
    """The pid that staging folders end with (outputs.staging_dir: `.staging-NAME-PID`)."""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def eval_loss_of(meta: dict) -> float | None:
    """The model's headline eval loss: after-training val, else test, else the last in-training eval."""
    after = ((meta.get("evaluation") or {}).get("after") or {}) if isinstance(meta.get("evaluation"), dict) else {}
    for split in ("val", "test"):
        value = (after.get(split) or {}).get("loss") if isinstance(after.get(split), dict) else None
        if isinstance(value, (int, float)):
            return float(value)
    history = (meta.get("losses") or {}).get("eval") or []
    try:
        return float(history[-1][1])
    except (IndexError, TypeError, ValueError):
        return None


def read_entry(path: Path) -> ModelEntry:
    """The entry for one folder; never raises for anything found on disk."""
    path = Path(path)
    entry = ModelEntry(name=path.name, path=str(path.resolve()), size_bytes=folder_size(path))
    if path.name.startswith(STAGING_PREFIX):
        pid = _staging_pid(path.name)
        entry.status = PARTIAL
        entry.problem = (f"being written by process {pid} right now" if pid and _alive(pid)
                         else "leftover of an interrupted save (safe to remove)")
        return entry
    meta_path = path / "metadata.json"
    if not meta_path.exists():
        entry.status = INCOMPLETE
        entry.problem = "no metadata.json (not a finished hafs model)"
        return entry
    meta = read_metadata(path)
    if not isinstance(meta, dict):
        entry.status, entry.problem = BROKEN, "metadata.json is unreadable or not JSON"
        return entry
    try:
        _fill(entry, meta)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        entry.status, entry.problem = BROKEN, f"metadata.json has an unexpected shape ({type(exc).__name__}: {exc})"
    curve = path / "loss_curve.png"
    entry.loss_curve = str(curve.resolve()) if curve.is_file() else ""
    return entry


def _fill(entry: ModelEntry, meta: dict) -> None:
    config = meta.get("config") or {}
    expert = meta.get("expert") or {}
    training = meta.get("training") or {}
    entry.expert_name = str(expert.get("name") or "")
    entry.expert = str(config.get("expert_name") or entry.expert_name)
    entry.base = str((meta.get("model") or {}).get("base") or "")
    dataset_dir = str(training.get("dataset") or "")
    entry.dataset = str(config.get("dataset_name") or Path(dataset_dir).name)
    entry.preset = str(config.get("preset") or "")
    entry.created = str((meta.get("metadata") or {}).get("created") or "")
    samples = training.get("num_samples")
    entry.samples = int(samples) if isinstance(samples, (int, float)) else None
    final = training.get("final_loss")
    entry.train_loss = float(final) if isinstance(final, (int, float)) else None
    entry.eval_loss = eval_loss_of(meta)


def scan_models(models_dir: Path, *, registry_path: Path | None = None) -> list[ModelEntry]:
    """Every folder of models_dir, newest first; odd folders are listed with their status, never raised."""
    models_dir = Path(models_dir)
    try:
        children = [p for p in models_dir.iterdir() if p.is_dir()]
    except OSError:
        return []
    # Hidden folders are not models, except our own staging leftovers, which the user should see.
    children = [p for p in children if not p.name.startswith(".") or p.name.startswith(STAGING_PREFIX)]
    entries = [read_entry(p) for p in children]
    registered = _registered_dirs(registry_path)
    if registered is not None:
        for e in entries:
            e.registered = e.path in registered
    entries.sort(key=lambda e: (e.sort_time(), e.name), reverse=True)
    return entries


def _registered_dirs(registry_path: Path | None) -> set[str] | None:
    """Resolved model_dir paths named in the user's registry; None when there is none to read."""
    if registry_path is None or not Path(registry_path).expanduser().is_file():
        return None
    try:
        from .user_registry import registered_experts

        entries = registered_experts(Path(registry_path))
    except Exception:  # the listing must not fail because of the user's registry file
        return None
    return {str(Path(e["model_dir"]).expanduser().resolve()) for e in entries.values()
            if isinstance(e.get("model_dir"), str)}


def matches(entry: ModelEntry, *, expert: str | None = None, dataset: str | None = None) -> bool:
    """Filter: case-insensitive substring of the expert key / display name, and of the dataset."""
    if expert and expert.casefold() not in f"{entry.expert}\n{entry.expert_name}".casefold():
        return False
    if dataset and dataset.casefold() not in entry.dataset.casefold():
        return False
    return True


def find_model(models_dir: Path, name: str) -> Path:
    """The folder `name` in models_dir, or a path to a model folder; ConfigError with suggestions."""
    candidate = Path(name).expanduser()
    if (os.sep in name or name.startswith(".")) and candidate.is_dir() and not name.startswith(STAGING_PREFIX):
        return candidate
    inside = models_dir / name
    if os.sep not in name and name not in (".", "..") and inside.is_dir():
        return inside
    names = [e.name for e in scan_models(models_dir)]
    raise ConfigError([Problem(f"no model '{name}' in {models_dir}{did_you_mean(name, names)}",
                               hint="hafs models   lists them")])


def metrics_of(meta: dict) -> dict:
    """The numbers worth comparing between two models, flat: training figures and eval results."""
    training = meta.get("training") or {}
    out = {f"training.{k}": training.get(k) for k in
           ("num_samples", "final_loss", "tokens_trained", "optimizer_steps", "duration_minutes")}
    evaluation = meta.get("evaluation") or {}
    for when in ("before", "after"):
        result = evaluation.get(when) or {}
        for split in ("val", "test"):
            for key in ("loss", "perplexity"):
                out[f"eval.{when}.{split}.{key}"] = (result.get(split) or {}).get(key)
        for key, value in (result.get("generation_scores") or {}).items():
            out[f"eval.{when}.generation.{key}"] = value
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def show_data(path: Path) -> dict:
    """What `hafs models show` prints: the entry, the metadata's key sections and the files."""
    entry = read_entry(path)
    meta = read_metadata(path) if entry.status == OK else None
    files = sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file())
    data = {"entry": dataclasses.asdict(entry), "files": files}
    if meta:
        data.update({k: meta.get(k) for k in ("expert", "model", "training", "hardware", "metadata")})
        data["metrics"] = metrics_of(meta)
        data["lora"] = (meta.get("config") or {}).get("lora")
    return data


def compare_models(a: Path, b: Path) -> dict:
    """Config and metric differences between two model folders."""
    metas = []
    for path in (a, b):
        meta = read_metadata(path)
        if not isinstance(meta, dict):
            raise ConfigError([Problem("cannot compare: metadata.json is missing or unreadable",
                                       file=str(Path(path) / "metadata.json"))])
        metas.append(meta)
    from .trackers import flatten

    config_a, config_b = (flatten(m.get("config") or {}) for m in metas)
    config = {k: [config_a.get(k), config_b.get(k)] for k in sorted(set(config_a) | set(config_b))
              if config_a.get(k) != config_b.get(k) and not k.startswith("config_path")}
    metrics_a, metrics_b = (metrics_of(m) for m in metas)
    metrics = {k: [metrics_a.get(k), metrics_b.get(k)] for k in sorted(set(metrics_a) | set(metrics_b))}
    return {"a": Path(a).name, "b": Path(b).name, "config": config, "metrics": metrics}


def remove_model(models_dir: Path, name: str, *, yes: bool = False, confirm=input, log=print) -> bool:
    """Delete one folder of models_dir after confirmation; refuses anything outside models_dir.

    The folder is first renamed to a `.staging-rm-*` name, so an interrupted removal leaves a
    leftover that the listing shows as partial, never a half-deleted model that looks whole.
    """
    root = Path(models_dir).resolve()
    target = Path(name).expanduser()
    if not target.is_absolute():
        if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", ".."):
            raise ConfigError([Problem(f"'{name}' is not a model name", hint=f"give a folder name inside {root}")])
        target = Path(models_dir) / name
    if target.is_symlink():
        link_parent = target.parent.resolve()
        if link_parent != root:
            raise ConfigError([Problem(f"refusing to remove {target}: it is not inside {root}")])
    elif not target.exists():
        names = [e.name for e in scan_models(models_dir)]
        raise ConfigError([Problem(f"no model '{name}' in {root}{did_you_mean(name, names)}")])
    elif target.resolve().parent != root:
        raise ConfigError([Problem(f"refusing to remove {target}: it is not inside {root}",
                                   hint="hafs models rm only deletes folders of [output] models_dir")])
    elif not target.is_dir():
        raise ConfigError([Problem(f"{target} is not a model folder")])

    entry = read_entry(target) if not target.is_symlink() else ModelEntry(name=target.name, path=str(target))
    if entry.problem.startswith("being written"):
        raise ConfigError([Problem(f"{target.name} is {entry.problem}", hint="let that run finish or stop it first")])
    what = f"{target} ({human_size(entry.size_bytes)}" + (f", {entry.status}" if entry.status != OK else "") + ")"
    if not yes:
        try:
            answer = confirm(f"Remove {what}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            log("Nothing removed.")
            return False
    if target.is_symlink():
        target.unlink()
    else:
        trash = target.parent / f"{STAGING_PREFIX}rm-{target.name}-{os.getpid()}"
        os.rename(target, trash)
        shutil.rmtree(trash)
    log(f"Removed {what}")
    return True


def human_size(n: int | None) -> str:
    """1234567 → '1.2 MB'."""
    if not n:
        return "0 B"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"

