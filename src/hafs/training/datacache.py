"""On-disk cache of prepared data: one directory of .npy arrays and a meta.json per entry.

No pickle anywhere: arrays are saved and loaded with `allow_pickle=False`, metadata is JSON, so a
cache directory from elsewhere can at worst fail to load, never run code. An entry is written into
a temporary directory and renamed into place, so a crash (or two workers writing the same entry at
once) never leaves a half-written entry that a later run would trust. What goes into the key is
the caller's business (see `tokenize.cache_key`).

The cache is only a speed-up: when its folder cannot be used (HAFS_CACHE_DIR names a file, a
read-only or unreadable folder) one warning is printed and everything runs without it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import HafsError, Problem
from .outputs import folder_problem

STALE_TEMP_S = 3600
"""Temporary directories older than this were left by a crashed writer and are removed."""


ENV = "HAFS_CACHE_DIR"
_warned: set[str] = set()


class CacheDirError(HafsError):
    """The cache folder (HAFS_CACHE_DIR or ~/.cache/hafs) cannot hold what must be stored there."""

    kind = "environment"


def cache_root() -> Path:
    """`$HAFS_CACHE_DIR`, else `~/.cache/hafs`: the folder every hafs cache lives under."""
    return Path(os.environ.get(ENV) or "~/.cache/hafs").expanduser()


def cache_dir() -> Path:
    """`$HAFS_CACHE_DIR/data`, else `~/.cache/hafs/data`."""
    return cache_root() / "data"


def _fix_hint() -> str:
    if os.environ.get(ENV):
        return f"point {ENV} at a folder you can write to, or unset it to use ~/.cache/hafs"
    return f"make ~/.cache/hafs writable, or set {ENV} to a folder you can write to"


def require_dir(sub: str) -> Path:
    """`<cache root>/<sub>`, created; CacheDirError when it cannot be (for things that must be stored)."""
    try:
        folder = cache_root() / sub
    except RuntimeError as exc:  # expanduser() with no home directory
        raise CacheDirError([Problem(str(exc), key=ENV, hint=f"set {ENV} to a folder you can write to")]) from None
    reason = folder_problem(folder, create=True)
    if reason:
        raise CacheDirError([Problem(reason, key=ENV, file=str(cache_root()), hint=_fix_hint())],
                            title="the hafs cache folder cannot be used")
    return folder


def _usable_data_dir() -> Path | None:
    """The data cache folder, or None (after one warning per folder) when it cannot be used."""
    try:
        root = cache_dir()
    except RuntimeError as exc:  # expanduser() with no home directory
        reason, where = str(exc), "~/.cache/hafs"
    else:
        reason, where = folder_problem(root, create=True), str(root)
        if not reason:
            return root
    if where not in _warned:
        _warned.add(where)
        setting = f"{ENV}={os.environ[ENV]}" if os.environ.get(ENV) else "the default cache folder"
        print(f"warning: {setting}: {reason}; tokenized data is not cached this run ({_fix_hint()})",
              file=sys.stderr, flush=True)
    return None


def save_entry(name: str, arrays: dict[str, np.ndarray], meta: dict) -> Path | None:
    """Store an entry atomically; None when the cache is not writable (caching is only a speed-up)."""
    root = _usable_data_dir()
    if root is None:
        return None
    final = root / name
    if final.exists():
        return final
    tmp = None
    try:
        _remove_stale_temps(root)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        for key, array in arrays.items():
            np.save(tmp / f"{key}.npy", array, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, final)  # fails if another writer got there first: theirs is as good
        return final
    except OSError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return final if final.exists() else None


def load_entry(name: str, array_names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, meta) of an entry, or None when absent; an unreadable entry is deleted and None returned."""
    root = _usable_data_dir()
    if root is None:
        return None
    folder = root / name
    try:
        if not folder.is_dir():
            return None
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        arrays = {key: np.load(folder / f"{key}.npy", allow_pickle=False) for key in array_names}
        return arrays, meta
    except (OSError, ValueError):
        drop_entry(name)
        return None


def drop_entry(name: str) -> None:
    """Delete an entry (e.g. one that loaded but failed its consistency checks)."""
    root = _usable_data_dir()
    if root is not None:
        shutil.rmtree(root / name, ignore_errors=True)


def _remove_stale_temps(root: Path) -> None:
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
