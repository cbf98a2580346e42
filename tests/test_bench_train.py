"""bench/bench_train.py runs end to end: its table is what README figures are copied from, so a broken
row or a ratio line gone missing would only show at the next hand-run benchmark."""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_train(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # its sibling modules (fixture, peers, probes), as when run by path
    return importlib.import_module("bench_train")


def test_table_compares_hafs_with_each_peer(bench_train):
    row = {"dataset_tokens": 1000, "tokens_trained": 1000, "cpu_seconds": 2.0, "lengths": [50, 90, 200]}
    results = [dict(row, row="hafs", tokens_per_second=200.0, seconds=5.0, peak_rss_gb=1.0, val_loss=2.2,
                    flops=1e12),
               dict(row, row="trl", tokens_per_second=100.0, seconds=10.0, peak_rss_gb=2.0, val_loss=2.0),
               {"row": "earlier", "error": ["Traceback", "ValueError: boom"]}]
    text = bench_train.table(results, bench_train.SPECS["tiny"], peak=1e12, device="cpu")
    assert "hafs vs trl      : 2.00x tokens/s, 0.50x memory, val loss +10.0%" in text
    assert "earlier    ERROR: Traceback | ValueError: boom" in text
    assert "hafs vs earlier" not in text
    assert "hafs achieved 200 GFLOP/s = 20% of the measured bf16 matmul rate" in text


@pytest.mark.slow
def test_tiny_benchmark_runs_hafs_and_trl(tmp_path):
    pytest.importorskip("trl")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OUT=str(tmp_path))
    # A few steps per row: enough to train both, time them and score each adapter; --profile adds the
    # profiler path of the hafs row (its table lands in $OUT).
    done = subprocess.run([sys.executable, str(BENCH / "bench_train.py"), "--tiny", "--rows", "hafs,trl",
                           "--steps", "3", "--profile", "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "ERROR" not in out, out
    rows = {m["row"]: m for m in re.finditer(
        r"^(?P<row>hafs|trl) +(?P<tps>[\d,]+) +[\d,]+ +[\d.]+ +[\d.]+ +(?P<loss>\S+)  ", out, re.MULTILINE)}
    assert set(rows) == {"hafs", "trl"}, out
    for m in rows.values():
        assert float(m["tps"].replace(",", "")) > 0, out
        assert math.isfinite(float(m["loss"])), out
    assert re.search(r"^hafs vs trl +: [\d.]+x tokens/s, [\d.]+x memory, val loss [+-][\d.]+%$", out, re.MULTILINE), out
    assert "dataset: 96 train rows" in out
    assert "steps in" in (tmp_path / "profile_hafs.txt").read_text()
