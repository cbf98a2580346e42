"""On-disk cache of prepared data: one directory of .npy arrays and a meta.json per entry.

No pickle anywhere: arrays are saved and loaded with `allow_pickle=False`, metadata is JSON, so a
cache directory from elsewhere can at worst fail to load, never run code. An entry is written into
a temporary directory and renamed into place, so a crash (or two workers writing the same entry at
once) never leaves a half-written entry that a later run would trust. What goes into the key is
the caller's business (see `tokenize.cache_key`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

STALE_TEMP_S = 3600
"""Temporary directories older than this were left by a crashed writer and are removed."""


def cache_dir() -> Path:
    """`$HAFS_CACHE_DIR/data`, else `~/.cache/hafs/data`."""
    return Path(os.environ.get("HAFS_CACHE_DIR") or "~/.cache/hafs").expanduser() / "data"


def save_entry(name: str, arrays: dict[str, np.ndarray], meta: dict) -> Path | None:
    """Store an entry atomically; None when the cache is not writable (caching is only a speed-up)."""
    root = cache_dir()
    final = root / name
    if final.exists():
        return final
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
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
    folder = cache_dir() / name
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        arrays = {key: np.load(folder / f"{key}.npy", allow_pickle=False) for key in array_names}
        return arrays, meta
    except (OSError, ValueError):
        drop_entry(name)
        return None


def drop_entry(name: str) -> None:
    """Delete an entry (e.g. one that loaded but failed its consistency checks)."""
    shutil.rmtree(cache_dir() / name, ignore_errors=True)


def _remove_stale_temps(root: Path) -> None:
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
