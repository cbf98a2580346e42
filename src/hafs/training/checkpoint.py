"""Resumable checkpoints: written atomically, verified by checksum, rotated, and resumed exactly.

A checkpoint is a folder `checkpoint-<step>/` inside a run folder (`checkpoints_dir/<preset>-<time>/`):

    adapter.safetensors   trainable parameters only, by their names in the model
    optimizer.pt          optimizer state           (torch.save, loads with weights_only=True)
    scheduler.pt          LR scheduler state        (idem)
    scaler.pt             fp16 GradScaler state     (only when a scaler is used)
    rng.pt                python / numpy / torch CPU / CUDA / MPS generator states (idem)
    state.json            TrainState (step, epoch, micro-batch position, tokens, losses), dataset hash,
                          the evaluation before training (so a resumed run reports it like an uninterrupted one)
    config.json           the resolved plan (`TrainingConfig.to_dict()`)
    manifest.json         sha256 and size of every file above: written last, the completeness marker

It is built under `.tmp-checkpoint-<step>-<pid>/` and renamed into place once complete, so a kill at
any moment leaves either the previous checkpoints or a complete new one (a stale temp folder is
ignored and cleaned later). Every byte goes through `_write_file`, so a full disk surfaces as an
OSError we turn into a TrainingError, never torch's opaque "file write failed". A run whose folder
cannot be written (a file put in its place, a full disk) saves in `rescue_for` instead and trains on
(recipe.run); `--resume auto` takes a run's checkpoints from both folders together.

Resume is exact because everything that decides the next step is saved: weights, optimizer moments,
scheduler step, every RNG (dropout), and the data position (epoch, micro-batch) — the order of an
epoch is a pure function of (seed, epoch). Checkpoints are only taken at optimizer-step boundaries.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from .data import file_sha256
from .errors import Problem, TrainingError
from .outputs import _fsync_dir, disk_error, folder_problem

FORMAT = 1
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
MANIFEST = "manifest.json"
REQUIRED = ("adapter.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.json")
_CKPT = re.compile(rf"^{PREFIX}(\d+)$")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- writing


def save_checkpoint(run_dir: Path, *, model, optimizer, scheduler, state, plan, scaler=None,
                    dataset_fingerprint: str = "", evaluation_before: dict | None = None) -> Path:
    """Write `run_dir/checkpoint-<step>/` atomically, then keep the newest `plan.save_total_limit`.

    Call only at an optimizer-step boundary (no half-accumulated gradients). A failed write
    (disk full, read-only, permissions, a file where a folder should be) raises TrainingError;
    earlier checkpoints stay untouched. `evaluation_before` is the recipe's "before" evaluation
    (JSON-able), kept in state.json for the resumed run's report.
    """
    import torch
    from safetensors.torch import save as st_save

    run_dir = Path(run_dir)
    step = int(state.step)
    final = run_dir / f"{PREFIX}{step}"
    tmp = run_dir / f"{TMP_PREFIX}{step}-{os.getpid()}"
    try:
        if not run_dir.is_dir():
            run_dir.mkdir(parents=True)
            _fsync_dir(run_dir.parent)  # the new run folder must survive a power cut too
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {
            "adapter.safetensors": st_save(trainable_state(model), metadata={"step": str(step)}),
            "optimizer.pt": _torch_bytes(optimizer.state_dict()),
            "rng.pt": _torch_bytes(rng_state()),
            "state.json": _json_bytes(_state_record(state, dataset_fingerprint, evaluation_before)),
            "config.json": _json_bytes(plan.to_dict()),
        }
        if scheduler is not None:
            files["scheduler.pt"] = _torch_bytes(scheduler.state_dict())
        if scaler is not None:
            files["scaler.pt"] = _torch_bytes(scaler.state_dict())
        manifest = {"format": FORMAT, "step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "torch": torch.__version__, "files": {}}
        for name, data in files.items():
            _write_file(tmp / name, data)
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        _write_file(tmp / MANIFEST, _json_bytes(manifest))
        _fsync_dir(tmp)
        _move_into_place(tmp, final)
        _fsync_dir(run_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(exc, run_dir, tmp, step) from None
    except BaseException:  # a second Ctrl-C mid-save: leave no half folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        rotate(run_dir, keep=plan.save_total_limit, protect=final)
    except OSError as exc:  # the new checkpoint is complete: failing to delete old ones only keeps them
        _warn(f"could not remove old checkpoints of {run_dir}: {exc.strerror or exc}")
    return final


def _save_error(exc: OSError, run_dir: Path, tmp: Path, step: int) -> TrainingError:
    """The TrainingError for a failed checkpoint write; names the file in the way when there is one.

    A folder replaced by a file mid-run surfaces as ENOTDIR, EEXIST or (the temp folder having gone
    with its parent) ENOENT, from whichever call came first: none of them names the culprit.
    """
    blocked = folder_problem(run_dir) if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT) else ""
    if blocked:
        return TrainingError([Problem(
            f"cannot save checkpoint-{step}: {blocked}", file=str(run_dir),
            hint="move the file named above out of the way (hafs never deletes it), or set [output] checkpoints_dir to "
                 "another folder")])
    return disk_error(exc, Path(exc.filename or tmp))


RESCUE_SUFFIX = "-rescued"


def rescue_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints go when its own folder cannot be written: `<checkpoints_dir>-rescued/<run>/`.

    Beside the configured folder, not in it: whatever blocked that folder (a file put in its place, a
    permission change) is left as it is, and the run keeps a resumable checkpoint. For a run that is
    writing, ask `rescue_for`: from a rescued folder this would give a second `-rescued-rescued` hop,
    which `--resume auto` does not search.
    """
    run_dir = Path(os.path.abspath(run_dir))
    if not run_dir.parent.name:  # a run folder at the file system's root has no folder to sit beside
        return run_dir.with_name(run_dir.name + RESCUE_SUFFIX)
    return rescue_root(run_dir.parent) / run_dir.name


def rescue_root(checkpoints_dir) -> Path:
    """The folder beside `checkpoints_dir` that holds its runs' rescued checkpoints (see rescue_dir)."""
    root = Path(os.path.abspath(checkpoints_dir))
    return root.with_name(root.name + RESCUE_SUFFIX) if root.name else root


def run_folders(checkpoints_dir, name: str) -> tuple[Path, Path]:
    """The two folders that hold checkpoints of run `name`: its own under checkpoints_dir, and its rescue folder."""
    own = Path(checkpoints_dir) / name
    return own, rescue_dir(own)


def rescue_for(checkpoints_dir, run_dir: Path) -> Path:
    """Where a run writing to `run_dir` saves a checkpoint that run_dir cannot take: its namesake (`run_folders`).

    A run resumed from its rescue folder goes back to its own one: both are where `--resume auto` looks.
    """
    own, rescued = run_folders(checkpoints_dir, Path(run_dir).name)
    return own if Path(os.path.abspath(run_dir)) == rescued else rescued


def newest_checkpoint(folders, log=None) -> Path | None:
    """Newest verified checkpoint over `folders` (one run's namesakes, `run_folders`); a tie goes to the later folder.

    A run's steps may be split between its folder and the rescue folder (rescued after a failed save, or
    resumed from either one): which checkpoint is newest is a question about both.
    """
    best = None
    for folder in folders:
        found = latest_checkpoint(folder, log=log or _warn)
        if found is not None and (best is None or checkpoint_step(found) >= checkpoint_step(best)):
            best = found
    return best


def _write_file(path: Path, data: bytes) -> None:
    """The one place checkpoint bytes hit the disk (fsynced)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename tmp → final; a folder already there (a skipped corrupt one) is replaced, not merged."""
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()


def _state_record(state, dataset_fingerprint: str, evaluation_before: dict | None = None) -> dict:
    data = state.to_dict()
    # evaluation_before is optional on read: checkpoints of earlier versions lack it (FORMAT stays 1).
    return {"format": FORMAT, "step": int(state.step), "train_state": data,
            "data_position": {k: data.get(k) for k in ("epoch", "micro_batch")},
            "dataset_fingerprint": dataset_fingerprint,
            "elapsed_seconds": float(data.get("elapsed_seconds") or 0.0),
            "evaluation_before": evaluation_before}


def trainable_state(model) -> dict:
    """Trainable parameters by name (the LoRA adapter plus anything else being trained), on CPU."""
    return {name: p.detach().to("cpu", copy=True).contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    """Every random generator that can affect training, as weights_only-loadable values."""
    import random

    import torch

    version, internal, gauss = random.getstate()
    out = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                      "gauss_next": gauss},
           "torch": torch.get_rng_state()}
    try:
        import numpy as np

        st = np.random.get_state(legacy=False)
        out["numpy"] = {"bit_generator": st["bit_generator"], "pos": int(st["state"]["pos"]),
                        "key": torch.from_numpy(st["state"]["key"].astype(np.int64)),
                        "has_gauss": int(st["has_gauss"]), "gauss": float(st["gauss"])}
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        out["mps"] = torch.mps.get_rng_state()
    return out


def set_rng_state(saved: dict) -> None:
    """Inverse of `rng_state`; generators of devices this machine lacks are skipped with a warning."""
    import random

    import torch

    py = saved["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))
    torch.set_rng_state(saved["torch"])
    if "numpy" in saved:
        import numpy as np

        st = saved["numpy"]
        np.random.set_state({"bit_generator": st["bit_generator"], "has_gauss": st["has_gauss"],
                             "gauss": st["gauss"],
                             "state": {"key": st["key"].numpy().astype(np.uint32), "pos": st["pos"]}})
    if "cuda" in saved:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(saved["cuda"]):
            torch.cuda.set_rng_state_all(saved["cuda"])
        else:
            _warn("checkpoint has CUDA generator states this machine cannot restore; dropout will differ")
    if "mps" in saved and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(saved["mps"])


# --------------------------------------------------------------------------- finding and verifying


def checkpoint_step(path: Path) -> int | None:
    m = _CKPT.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoint-<step>` folders of a run, newest (highest step) first; unverified."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def verify(path: Path) -> str:
    """'' when the checkpoint is complete and intact, else what is wrong with it."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json (incomplete: the run stopped while writing it)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest.json ({exc})"
    if manifest.get("format") != FORMAT:
        return f"checkpoint format {manifest.get('format')!r}, this hafs reads {FORMAT}"
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        return f"manifest lacks {', '.join(missing)}"
    for name, entry in files.items():
        if "/" in name or "\\" in name or name.startswith("."):
            return f"manifest names a file outside the checkpoint: {name!r}"
        try:
            size = (path / name).stat().st_size
            if size != entry["bytes"]:
                return f"{name} has {size} bytes, expected {entry['bytes']} (truncated?)"
            if file_sha256(path / name) != entry["sha256"]:
                return f"{name} does not match its checksum (corrupt)"
        except OSError as exc:
            return f"cannot read {name}: {exc.strerror or exc}"
    return ""


def latest_checkpoint(run_dir: Path, log=_warn) -> Path | None:
    """Newest checkpoint of `run_dir` that verifies; newer broken ones are skipped with a warning."""
    for path in list_checkpoints(run_dir):
        problem = verify(path)
        if not problem:
            return path
        log(f"skipping checkpoint {path}: {problem}")
    return None


def rotate(run_dir: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the `keep` newest complete checkpoints, and stale temp folders; returns deleted.

    With `protect` (the checkpoint just written), checkpoints of later steps are deleted first: a run
    folder only moves forward, so they are broken ones that the resume skipped.
    """
    deleted = []
    newest = checkpoint_step(protect) if protect is not None else None
    complete = []
    for path in list_checkpoints(run_dir):
        if newest is not None and checkpoint_step(path) > newest:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
        elif (path / MANIFEST).is_file():
            complete.append(path)
    for path in complete[max(keep, 1):]:
        if path == protect:
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    for path in Path(run_dir).glob(f"{TMP_PREFIX}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and int(pid) == os.getpid()) and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)  # left by a killed run
    return deleted


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
