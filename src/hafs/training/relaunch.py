"""`python scripts/train.py PRESET` on a multi-worker profile: this command again, under torchrun.

The launcher stays in front of torchrun for the length of the run, so that stopping it stops the
workers the way stopping a one-process run does: a first Ctrl-C or SIGTERM makes them save a
checkpoint and print the resume command, and the launcher exits 130 / 143. Why not simply
`subprocess.run(torchrun ...)`: a SIGTERM killed the launcher alone and left torchrun and its
workers training on as orphans; a Ctrl-C reached torchrun's agent as well, which re-sent it to the
workers (a second signal aborts a checkpoint in progress) and then printed its own traceback.

So torchrun runs in a session of its own (a terminal's Ctrl-C reaches only the launcher), and the
launcher hands each signal it receives to the workers themselves, once. A worker that was stopped
reports its exit status in a file the launcher names (STATUS_ENV) and leaves with 0, which torchrun
reports as a clean end; the launcher then exits with the reported status.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
from pathlib import Path

from .distributed import relaunch_command
from .errors import ConfigError, Problem

STATUS_ENV = "HAFS_LAUNCH_STATUS"
"""File in which rank 0 of a relaunched run writes the exit status of a stopped run."""
FORWARDED = (signal.SIGINT, signal.SIGTERM)


def relaunch(plan, argv: list[str] | None = None, log=print) -> int:
    """Run this command under torchrun with the plan's worker count; returns the run's exit status."""
    if plan.hardware.num_nodes > 1:
        raise ConfigError([Problem(f"a {plan.hardware.num_nodes}-node profile cannot be started from one machine",
                                   key=f"hardware.{plan.hardware_name}.num_nodes",
                                   hint="run the torchrun command that --dry-run prints on every node")])
    cmd = relaunch_command(plan, argv)
    log(f"Launching {plan.world_size()} workers: {' '.join(map(shlex.quote, cmd))}")
    with tempfile.TemporaryDirectory(prefix="hafs-launch-") as tmp:
        status = Path(tmp) / "status"
        # The handlers go in before torchrun starts: a signal in between would otherwise stop this process
        # alone (the CLI's "nothing was saved") and leave torchrun, in its own session, training on.
        started: list[subprocess.Popen] = []
        pending: list[int] = []

        def forward(signum, _frame):
            if started:
                signal_workers(started[0].pid, signum)
            else:
                pending.append(signum)

        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
        try:
            if pending:  # stopped before anything started: nothing to hand the signal to
                return 128 + int(pending[0])
            started.append(subprocess.Popen(cmd, env=dict(os.environ, **{STATUS_ENV: str(status)}),
                                            start_new_session=True))
            if pending:  # arrived while Popen ran: the agent passes it on to the workers it starts
                signal_workers(started[0].pid, pending[0])
            code = started[0].wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        reported = status.read_text().strip() if status.is_file() else ""
        return int(reported) if reported.isdigit() else code


def signal_workers(agent: int, signum: int) -> None:
    """Send `signum` to the workers torchrun's agent started (its child processes), or to the agent itself
    where they cannot be listed (before they start, or without Linux's /proc): it passes signals on."""
    children = worker_pids(agent)
    for pid in children or [agent]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def worker_pids(agent: int) -> list[int]:
    """The agent's child processes (Linux /proc; [] elsewhere or once it has gone)."""
    try:
        return [int(p) for p in Path(f"/proc/{agent}/task/{agent}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def report_stop(code: int, main: bool) -> int:
    """In a worker of a relaunched run that was stopped (exit status 130 / 143): rank 0 writes the status
    for the launcher, and every rank then leaves with 0 (see the module doc). Elsewhere returns `code`."""
    target = os.environ.get(STATUS_ENV)
    if not target or code not in tuple(128 + int(s) for s in FORWARDED):
        return code
    if main:
        with contextlib.suppress(OSError):
            Path(target).write_text(str(code))
    return 0
