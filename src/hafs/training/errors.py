"""One error type per kind of user mistake; the CLI renders each as a short message and exits 2.

Tracebacks are reserved for bugs: anything that is not a `HafsError` is a bug in hafs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input, located as precisely as we can."""

    message: str
    """What is wrong, in the user's words (keys spelled as they typed them)."""
    key: str = ""
    """TOML key path (`presets.my-run.lora`) or field name; empty when it concerns the whole input."""
    file: str = ""
    """File the problem is in, when there is one."""
    line: int | None = None
    """1-based line number in `file`, when known."""
    hint: str = ""
    """What to do about it."""

    def render(self) -> str:
        where = self.file
        if where and self.line:
            where = f"{where}:{self.line}"
        head = ": ".join(p for p in (where, self.key) if p)
        text = f"{head}: {self.message}" if head else self.message
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


class HafsError(Exception):
    """Base of every error caused by user input or the environment, never by a bug."""

    kind = "error"
    exit_code = 2

    def __init__(self, problems: list[Problem] | str, *, title: str = ""):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        self.problems = list(problems)
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        lines = []
        if self.title:
            lines.append(self.title)
        shown = self.problems[:25]
        prefix = "  - " if (self.title or len(shown) > 1) else ""
        lines += [prefix + p.render() for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)


class ConfigError(HafsError):
    """The TOML file, a preset name or an override is wrong."""

    kind = "config"


class DatasetError(HafsError):
    """A dataset file is missing, unreadable, or has bad rows."""

    kind = "dataset"


class HardwareError(HafsError):
    """The plan cannot run on this machine (device missing, memory too small, unsupported GPU)."""

    kind = "hardware"


class TrainingError(HafsError):
    """Training stopped for a reason the user can act on (NaN loss, out of memory, disk full)."""

    kind = "training"
    exit_code = 3


class ResumeError(HafsError):
    """A checkpoint cannot be resumed (missing, corrupt, or made with another config)."""

    kind = "resume"


def did_you_mean(word: str, choices) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
