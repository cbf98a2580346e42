"""The loss curve of a run (train and eval loss against optimizer step) as a PNG in the model folder.

matplotlib is optional (`pip install 'hafs[plots]'`): without it the run still completes and says
that no picture was drawn.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

PLOTS_HINT = "pip install 'hafs[plots]'"


def _points(history) -> tuple[list[float], list[float]]:
    """(steps, losses) of a [[step, loss], ...] history, without non-finite losses (a NaN breaks the line)."""
    steps, losses = [], []
    for item in history or []:
        try:
            step, loss = float(item[0]), float(item[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(step) and math.isfinite(loss):
            steps.append(step)
            losses.append(loss)
    return steps, losses


def plot_losses(train, eval, path: Path, *, title: str = "", log=print) -> Path | None:
    """Draw train (line) and eval (markers) loss against step into `path` (PNG); None when nothing was drawn.

    `train` and `eval` are lists of (step, loss). The file is written atomically, so a model folder
    never holds half a PNG.
    """
    path = Path(path)
    train_xy, eval_xy = _points(train), _points(eval)
    if not train_xy[0] and not eval_xy[0]:
        log("note: no losses were logged; no loss curve drawn")
        return None
    try:
        # Figure + FigureCanvasAgg directly, not pyplot: no global backend switch (a user's
        # notebook keeps its backend), no display needed, and nothing to close afterwards.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log(f"note: matplotlib is not installed, so no loss curve was drawn ({PLOTS_HINT})")
        return None

    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train_xy[0]:
        ax.plot(*train_xy, label="train", color="tab:blue", linewidth=1.5)
    if eval_xy[0]:
        ax.plot(*eval_xy, label="eval", color="tab:orange", marker="o", markersize=4, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per response token")
    ax.set_title(title or "Loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")

    from .outputs import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())
    return path
