"""The tree passes ruff with the project's settings (pyproject.toml [tool.ruff]): one command keeps it so."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ruff() -> list[str] | None:
    try:
        import ruff as _  # noqa: F401  (the test extra installs it)
    except ImportError:
        return [shutil.which("ruff")] if shutil.which("ruff") else None
    return [sys.executable, "-m", "ruff"]


@pytest.mark.skipif(ruff() is None, reason="ruff not installed (pip install -e '.[test]')")
def test_ruff_finds_nothing():
    done = subprocess.run([*ruff(), "check", "--no-cache", "src", "tests", "bench", "scripts"], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
