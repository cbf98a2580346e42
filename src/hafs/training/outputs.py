"""Where a run's results go: safe names, writable folders, staged model directories, atomic files, metadata.json.

A model directory only ever appears complete: it is written under a hidden staging name in the
same folder and renamed into place after `metadata.json` (written last). An existing directory is
never overwritten: a second run the same day gets a `-2`, `-3`... suffix.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from .errors import Problem, TrainingError

STAGING_PREFIX = ".staging-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_component(text: str, fallback: str = "run") -> str:
    """One path component from user text: no separators, no `..`, no leading dots or dashes."""
    cleaned = _UNSAFE.sub("-", str(text)).strip(".-_")
    cleaned = re.sub(r"-{2,}", "-", cleaned)[:120]
    return cleaned or fallback


def model_dir_name(plan, now: dt.datetime | None = None) -> str:
    """The model folder's name from `[output] name_template` (sanitised: it can never escape models_dir)."""
    now = now or dt.datetime.now()
    expert = plan.expert_name
    fields = {
        "name": expert[len("oracle-"):] if expert.startswith("oracle-") else expert,
        "expert": expert, "role": plan.expert.role, "base_short": plan.base_short(),
        "date": now.strftime(plan.output.date_format), "preset": plan.preset,
    }
    return safe_component(plan.output.name_template.format(**fields), fallback=safe_component(expert))


def run_id(plan, now: dt.datetime | None = None) -> str:
    """Identifier of one training run (checkpoint folder name): preset + timestamp (see new_run_dir)."""
    now = now or dt.datetime.now()
    return f"{safe_component(plan.preset)}-{now.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(plan, now: dt.datetime | None = None) -> Path:
    """Create this run's own folder under checkpoints_dir: `run_id`, or `run_id-2`, `-3`... when taken.

    Two runs of a preset started in the same second get the same run_id; sharing its folder, each
    would replace the other's checkpoints and could resume from them. mkdir fails when the folder
    exists, so whichever run creates it owns it and the other moves on to the next suffix.
    """
    root = Path(plan.output.checkpoints_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        return _first_free(root, run_id(plan, now), os.mkdir)
    except OSError as exc:  # preflight checked checkpoints_dir; something replaced it since
        raise disk_error(exc, root) from None


def folder_problem(folder: Path, *, create: bool = False) -> str:
    """Why hafs cannot write into `folder`, naming the path at fault; '' when it can.

    The one check behind every "can this folder be written" question (output folders in preflight,
    the data and demo-model cache), so each says the same thing about the same cause:

    - `F is a file, not a folder` (or `a broken symbolic link`): the folder itself is in the way;
    - `P (a parent of F) is a file, not a folder`: a parent is in the way;
    - `P is not writable by this user (so F cannot be created in it)`: F does not exist yet;
    - `F is not readable and writable by this user`: F exists, or was just created;
    - `F cannot be created: <why>`: only with `create`, mkdir failed for another reason.

    Without `create` nothing is made (preflight must leave no trace); with it, `folder` and its parents
    are created. The caller adds what the folder is for and what happens now (an error or a warning).
    os.path's predicates, not Path's: they answer False instead of raising on an unreadable parent.
    """
    folder = Path(os.path.abspath(folder))
    for path in (folder, *folder.parents):
        if os.path.isdir(path):
            break
        if os.path.lexists(path):  # a file, or a link to nothing: mkdir would fail on it; hafs never replaces it
            kind = "a broken symbolic link" if os.path.islink(path) else "a file, not a folder"
            return f"{path} is {kind}" if path == folder else f"{path} (a parent of {folder}) is {kind}"
    if path != folder:  # `folder` is still to be made, inside `path`
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable by this user (so {folder} cannot be created in it)"
        if not create:
            return ""
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"{folder} cannot be created: {exc.strerror or exc}"
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):  # hafs reads back what it writes (resume, cache)
        return f"{folder} is not readable and writable by this user"
    return ""


def staging_path(models_dir: Path, name: str) -> Path:
    """Where this process stages model `name` (see staging_dir)."""
    return Path(models_dir) / f"{STAGING_PREFIX}{name}-{os.getpid()}"


def staging_dir(models_dir: Path, name: str) -> Path:
    """A fresh hidden folder beside the final one, on the same filesystem so the rename is atomic."""
    path = staging_path(models_dir, name)
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir()
    except OSError as exc:  # preflight checked models_dir; something replaced it during the run
        raise disk_error(exc, models_dir) from None
    return path


def finalize_dir(staged: Path, models_dir: Path, name: str) -> Path:
    """Rename the staged folder to `name` (or `name-2`, ...): never onto an existing model."""
    return _first_free(models_dir, name, lambda final: os.rename(staged, final))


def _first_free(folder: Path, name: str, claim) -> Path:
    """`folder/name`, else `name-2`, `name-3`...: the first one `claim(path)` takes.

    `claim` must fail with EEXIST (or ENOTEMPTY) when the name is taken: the check before it only
    skips known names, the claim itself is what two processes cannot both win.
    """
    for i in range(1, 1000):
        path = folder / (name if i == 1 else f"{name}-{i}")
        if os.path.lexists(path):
            continue
        try:
            claim(path)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue  # another run took it between our check and the claim
            raise
        _fsync_dir(folder)
        return path
    raise TrainingError(f"could not find a free name for {name} in {folder}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file + fsync + rename: readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(exc, path) from None
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def disk_error(exc: OSError, path: Path) -> TrainingError:
    """A user-facing error for a failed write (disk full, read-only, permissions)."""
    why = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
           errno.EACCES: "permission denied",
           errno.EDQUOT: "disk quota exceeded", errno.EEXIST: "a file is in the way of a folder",
           errno.ENOTDIR: "part of the path is a file, not a folder"}.get(exc.errno, exc.strerror or str(exc))
    return TrainingError([Problem(f"cannot write {path}: {why}", file=str(path),
                                  hint="free space or point [output] at a writable folder; "
                                       "existing checkpoints and models were left intact")])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def git_commit(cwd: Path | None = None) -> str | None:
    """Short commit of the working directory's repository, if any."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


SECRET_ENV = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD)", re.I)


def scrub(obj):
    """Remove values that look like secrets from the environment (HF/W&B tokens) before logging."""
    secrets = [v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 8]
    text = json.dumps(obj, default=str)
    for s in secrets:
        text = text.replace(s, "***")
    return json.loads(text)


def build_metadata(plan, *, num_samples: int, duration_seconds: float, hardware_info: dict,
                   num_epochs: float | None = None, extra: dict | None = None,
                   created: dt.datetime | None = None) -> dict:
    """metadata.json in the seed's exact shape (expert, model, training, hardware, metadata), plus extras.

    `num_samples` and `num_epochs` are what the run trained on (engine.BatchSource.trained): a max_steps
    run stops inside an epoch; `num_epochs` defaults to the plan's for callers that describe a plan."""
    flags = plan.output.metadata
    created = created or dt.datetime.now()
    training = {
        "dataset": plan.dataset_dir,
        "num_samples": num_samples,
        "num_epochs": plan.num_epochs if num_epochs is None else num_epochs,
        "batch_size": plan.batch_size,
        "gradient_accumulation": plan.gradient_accumulation,
        "learning_rate": plan.learning_rate,
        "sequence_length": plan.sequence_length,
    }
    if flags.include_training_duration:
        training["duration_seconds"] = round(duration_seconds, 1)
        training["duration_minutes"] = round(duration_seconds / 60, 2)
    meta = {
        "expert": {"name": plan.expert.display_name, "role": plan.expert.role, "group": plan.expert.group,
                   "specialization": plan.expert.specialization},
        "model": {"base": plan.expert.base_model, "lora_rank": plan.lora.r, "lora_alpha": plan.lora.lora_alpha},
        "training": training,
        "hardware": {"name": plan.hardware.name, "device": plan.device,
                     "fp16": plan.precision == "fp16", "bf16": plan.precision == "bf16"},
        "metadata": {"created": created.isoformat(), "git_commit": git_commit() if flags.include_git_commit else None},
    }
    if flags.include_hardware_info:
        info = dict(hardware_info)
        if "device" in info:  # the seed's "device" is the kind (mps, cuda, cpu); keep the description too
            info["device_name"] = info.pop("device")
        meta["hardware"].update(info)
    if flags.include_hyperparameters:
        meta["config"] = plan.to_dict()
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            meta[key].update(value)
        else:
            meta[key] = value
    meta["metadata"]["hafs_version"] = _version()
    return scrub(meta)


def _version() -> str:
    from hafs import __version__

    return __version__


def read_metadata(model_dir: Path) -> dict | None:
    """metadata.json of a model folder, or None when missing/corrupt (a partial directory)."""
    try:
        return json.loads((Path(model_dir) / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
