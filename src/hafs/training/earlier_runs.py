"""A dry run's time estimate, from the speed the user's own earlier runs recorded.

hafs does not estimate training time from FLOPs: where a step waits on the host (LoRA at small batches on
a GPU: the H200 benchmark used 3% of its matmul rate) such an estimate is off by 10x or more, and on a
CPU the rate moves with sequence lengths and the machine's phase. What is reliable is what this machine
did: every finished run writes its trained tokens and seconds to metadata.json. The newest model folder
of the same base model, device and precision gives tokens per second; the dry run scales it by the
tokens this plan trains, and says which run it went by. No earlier run: no estimate. Pure: no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SCAN_LIMIT = 200
"""Model folders read at most (the newest by metadata.json's modification time): a dry run stays instant."""


@dataclass(frozen=True)
class EarlierRun:
    """A finished run whose recorded speed stands for this plan's."""

    model_dir: Path
    """Its model folder."""
    tokens_per_second: float
    """Trained tokens ÷ its training seconds (evaluations during training included, as the user waits for them)."""
    created: str
    """When it finished (metadata.json's ISO time)."""


def find_earlier_run(models_dir: Path, *, base_model: str, device: str, precision: str,
                     world_size: int = 1, checkpointing: bool | None = None) -> EarlierRun | None:
    """The newest finished run in `models_dir` of `base_model` on `device` (Capabilities.describe's line,
    the machine and its device) in `precision` with `world_size` workers (its tokens are all workers'
    together) and, unless None, gradient checkpointing on or off as `checkpointing` (it costs a second
    forward per checkpointed layer: 2.1x on the GPU benchmark); None when there is none (or none
    recorded its speed). How many layers is not compared: a run re-decides it for its data's lengths."""
    try:
        files = sorted(Path(models_dir).glob("*/metadata.json"), key=_mtime, reverse=True)[:SCAN_LIMIT]
    except OSError:
        return None
    for path in files:
        try:
            meta = json.loads(path.read_text())
            training, hardware = meta["training"], meta["hardware"]
            if (meta["model"]["base"] != base_model or hardware.get("device_name") != device
                    or training.get("precision") != precision or training.get("world_size", 1) != world_size
                    or (checkpointing is not None
                        and bool((meta.get("run_settings") or {}).get("gradient_checkpointing")) != checkpointing)):
                continue
            seconds, tokens = float(training["duration_seconds"]), float(training["tokens_trained"])
            created = str((meta.get("metadata") or {}).get("created") or "")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # another tool's folder, a partial write, a run without timing: not evidence
        if seconds > 0 and tokens > 0:
            return EarlierRun(path.parent, tokens / seconds, created)
    return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def describe_estimate(tokens: int, run: EarlierRun) -> str:
    """'~12 min (58,868 tokens at 1,577 tokens/s, as <folder> did on 2026-11-27)'."""
    seconds = tokens / run.tokens_per_second
    when = f" on {run.created[:10]}" if run.created else ""
    return (f"~{_duration(seconds)} ({tokens:,} tokens at {run.tokens_per_second:,.0f} tokens/s, "
            f"as {run.model_dir.name} did{when})")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
