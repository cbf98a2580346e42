"""TOML → typed sections. Every problem in the file is collected and reported at once.

Each problem names the file, the line where we can find it, and the key path spelled the way the
user typed it (`presets.my-run.lora`). Unknown keys get a did-you-mean. Nothing here imports torch.
"""

from __future__ import annotations

import datetime
import math
import re
import tomllib
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

from .errors import ConfigError, Problem, did_you_mean
from .keypaths import dotted as _dotted
from .keypaths import key_lines, nearest_line
from .schema import NAMED_TABLES, SINGLE_TABLES, TrainingFile

DEFAULT_CONFIG = Path("config") / "training.toml"
SECTIONS = tuple(NAMED_TABLES) + tuple(SINGLE_TABLES) + ("tuning",)
INT_LIMIT = 2**63 - 1
"""Whole numbers beyond int64 would overflow torch and the JSON readers of metadata.json."""


def default_config_path() -> Path:
    """`config/training.toml` of the current directory, else the one shipped beside the package."""
    here = Path.cwd() / DEFAULT_CONFIG
    if here.exists():
        return here
    shipped = Path(__file__).resolve().parents[3] / DEFAULT_CONFIG
    return shipped if shipped.exists() else here


def load_config(path: str | Path | None = None, *, references: bool = True) -> TrainingFile:
    """Read and validate a training.toml; raises ConfigError listing every problem.

    `references=False` leaves a preset naming an undefined table to plan.resolve, which reports it for
    that preset alone (the preset list shows it INVALID beside the others instead of refusing them all)."""
    try:
        path = Path(path).expanduser() if path else default_config_path()
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([Problem("config file not found", file=str(path),
                                   hint="pass --config FILE, or run from the project directory")]) from None
    except (OSError, ValueError, RuntimeError) as exc:  # a directory, no permission, a NUL in the name, no $HOME
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError([Problem(f"cannot read config file: {reason}", file=str(path))]) from None
    from .data import wide_encoding  # the JSONL reader's check: PowerShell 5's `>` writes UTF-16

    wide = wide_encoding(raw[:4])
    if wide:  # BOM-less UTF-16 of ASCII text is valid UTF-8 full of NULs: tomllib's error would not say why
        raise ConfigError([Problem(f"the file is {wide} text, not UTF-8", file=str(path), line=1,
                                   hint="save the file as UTF-8")])
    try:
        # utf-8-sig: Windows editors (the user trains on Windows) may prepend a byte-order mark.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([Problem(f"file is not valid UTF-8 text (byte {exc.start})", file=str(path), line=line,
                                   hint="save the file as UTF-8")]) from None
    return load_config_text(text, str(path), references=references)


def load_config_text(text: str, filename: str = "<string>", *, references: bool = True) -> TrainingFile:
    """Validate TOML text; `filename` is used in messages and to resolve relative paths."""
    text = text.removeprefix("\ufeff")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        repeated = _repeated_key(text) if msg.startswith("Cannot") else None
        if repeated:
            path, first, again = repeated
            raise ConfigError([Problem(f"TOML syntax error: '{_dotted(path)}' is defined twice "
                                       f"(first on line {first})",
                                       file=filename, line=again, hint=f"keep one of lines {first} and {again}")]) \
                from None
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = int(m.group(1)) if m else None
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg) if m else msg
        raise ConfigError([Problem(f"TOML syntax error: {msg}", file=filename, line=line,
                                   hint="see https://toml.io for the syntax")]) from None
    except RecursionError:
        raise ConfigError([Problem("TOML could not be parsed: arrays or tables nested too deeply", file=filename,
                                   line=_worst_line(text, lambda ln: ln.count("[") + ln.count("{")))]) from None
    except ValueError as exc:  # tomllib lets int()'s 4300-digit limit through as a bare ValueError
        raise ConfigError([Problem(f"TOML could not be parsed: {str(exc)[:120]}", file=filename,
                                   line=_worst_line(text, lambda ln: max(map(len, re.findall(r"[0-9_]+", ln)),
                                                                        default=0)))]) from None
    locate = _Locator(text)
    problems: list[Problem] = []

    def report(keypath: list[str], message: str, hint: str = "") -> None:
        problems.append(Problem(message, key=_dotted(keypath), file=filename, line=locate(keypath), hint=hint))

    result = TrainingFile(path=filename, locations=locate.index)
    for section, value in data.items():
        if section not in SECTIONS:
            report([section], f"unknown section{did_you_mean(section, SECTIONS)}",
                   hint="sections are: " + ", ".join(SECTIONS))
            continue
        if not isinstance(value, dict):
            report([section], f"must be a table ([{section}]), got {_describe(value)}")
            continue
        if section in SINGLE_TABLES:
            built = build_section(SINGLE_TABLES[section], value, [section], report)
            if built is not None:
                setattr(result, section, built)
        elif section == "tuning":
            result.tuning = {k: v for k, v in value.items() if isinstance(v, dict)}
            for k, v in value.items():
                if not isinstance(v, dict):
                    report([section, k], f"must be a table ([tuning.{k}]), got {_describe(v)}")
        else:
            entries = getattr(result, section)
            for name, table in value.items():
                if not isinstance(table, dict):
                    report([section, name], f"must be a table ([{section}.{name}]), got {_describe(table)}")
                    continue
                built = build_section(NAMED_TABLES[section], table, [section, name], report)
                if built is not None:
                    entries[name] = built
    _check_references(result, data, report if references else lambda *a, **k: None)
    if problems:
        problems.sort(key=lambda p: p.line or 0)  # file order; problems without a line first
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(problems, title=f"{filename}: {len(problems)} {noun} in the training config")
    return result


def _repeated_key(text: str) -> tuple[tuple[str, ...], int, int] | None:
    """(key path, first line, repeated line) of the first key or table the text defines twice.

    Why: tomllib says only "Cannot overwrite a value", often "at end of document"."""
    repeats: list = []
    try:
        key_lines(text, repeats)
    except Exception:  # noqa: BLE001 - the scanner could not follow the text: tomllib's own message stays
        return None
    return repeats[0] if repeats else None


def _worst_line(text: str, score) -> int | None:
    """The line scoring highest (tomllib gives no position for these errors; this is where to look)."""
    scores = [score(line) for line in text.split("\n")]
    best = max(scores, default=0)
    return scores.index(best) + 1 if best else None


REFERENCES = {"expert": "experts", "hardware": "hardware", "dataset": "datasets", "lora": "lora",
              "hyperparameters": "hyperparameters"}
"""Preset key → the section whose table it names."""


def _check_references(result: TrainingFile, data: dict, report) -> None:
    for name, preset in result.presets.items():
        for key, section in REFERENCES.items():
            target = getattr(preset, key)
            table = getattr(result, section)
            if target in table:
                continue
            raw_section = data.get(section) if isinstance(data.get(section), dict) else {}
            if target in raw_section:
                continue  # exists but is itself invalid: reported where it is
            names = sorted(set(table) | set(raw_section))  # invalid ones too: they exist, they need fixing
            report(["presets", name, key], f"{key} '{target}' is not defined{did_you_mean(target, names)}",
                   hint=f"[{section}.*] has: {', '.join(names) or 'none defined'}")


def build_section(cls, raw: dict, keypath: list[str], report):
    """Build dataclass `cls` from a raw table, reporting unknown/missing/mistyped keys and `check()`."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.name.startswith("_")}
    ok = True
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            report(keypath + [key], f"unknown key{did_you_mean(key, known)}",
                   hint=f"[{_dotted(keypath)}] takes: {', '.join(known)}")
            ok = False
            continue
        converted, where, error = coerce_at(value, hints[key], keypath + [key], report)
        if error:
            report(keypath + [key] + where, error)
            ok = False
        elif converted is not _INVALID:
            kwargs[key] = converted
        else:
            ok = False
    for name, f in known.items():
        if name not in raw and f.default is MISSING and f.default_factory is MISSING:
            report(keypath + [name], "required key is missing",
                   hint=f"add {name} = ... to [{_dotted(keypath)}]")
            ok = False
    if not ok:
        return None
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    for key, message in (check() if check else []):
        name, _, index = key.partition("[")
        report(keypath + [name] + ([f"[{index}"] if index else []), message)
        ok = False
    return obj if ok else None


_INVALID = object()


def coerce(value, tp, keypath: list[str], report=None):
    """(converted value, error message or None) for `value` against annotation `tp`."""
    converted, _, error = coerce_at(value, tp, keypath, report)
    return converted, error


def coerce_at(value, tp, keypath: list[str], report=None):
    """Like `coerce`, plus where the error is below the key: ['[2]'] for item 2 of a list, else []."""
    converted, error = _coerce(value, tp, keypath, report)
    if isinstance(error, tuple):
        return converted, error[0], error[1]
    return converted, [], error


def _coerce(value, tp, keypath: list[str], report=None):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None, None  # never from TOML (it has no null); from a plan edited in Python
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], keypath, report)
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value, None
        if not isinstance(value, dict):
            return None, f"must be a table, got {_describe(value)}"
        if report is None:  # a plan edited in Python: sections are objects there, not tables
            return None, f"must be a {tp.__name__}, got {_describe(value)}"
        built = build_section(tp, value, keypath, report)
        return (built if built is not None else _INVALID), None
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            return None, f"must be a list of {_name(item_type)}, got {_describe(value)}"
        out = []
        for i, item in enumerate(value):
            got, err = _coerce(item, item_type, keypath + [f"[{i}]"], report)
            if err:
                return None, ([f"[{i}]"], f"item {i} {err}")
            out.append(got)
        return out, None
    if origin is dict or tp is dict:
        return (value, None) if isinstance(value, dict) else (None, f"must be a table, got {_describe(value)}")
    if tp is bool:
        return (value, None) if isinstance(value, bool) else (None, f"must be true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            return None, f"must be a whole number, got {_describe(value)}"
        if abs(value) > INT_LIMIT:
            return None, f"number is too large: {_describe(value)}"
        return value, None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                as_float = float(value)
            except OverflowError:
                return None, f"number is too large: {_describe(value)}"
            if not math.isfinite(as_float):
                return None, f"must be a finite number, got {value}"
            return as_float, None
        return None, f"must be a number, got {_describe(value)}"
    if tp is str:
        return (value, None) if isinstance(value, str) else (None, f"must be a string, got {_describe(value)}")
    return value, None


def _name(tp) -> str:
    return {str: "strings", int: "whole numbers", float: "numbers", bool: "booleans"}.get(tp, str(tp))


def _describe(value) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"a whole number with {len(str(abs(value)))} digits"
    kinds = {bool: "a boolean", int: "a whole number", float: "a number", str: "a string", list: "a list",
             datetime.datetime: "a date-time", datetime.date: "a date", datetime.time: "a time"}
    try:
        shown = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    except RecursionError:
        shown = "..."
    return f"{kinds.get(type(value), type(value).__name__)} ({shown[:40]}{'...' if len(shown) > 40 else ''})"


class _Locator:
    """Finds the line of a key path in TOML text (tomllib keeps no positions).

    Line numbers are a courtesy: if the scanner cannot follow the text, messages go without them
    rather than hiding the real problem behind a scanner error.
    """

    def __init__(self, text: str):
        try:
            self.index = key_lines(text)
        except Exception:  # noqa: BLE001 - see the class docstring; tests run key_lines directly
            self.index = {}

    def __call__(self, keypath) -> int | None:
        return nearest_line(self.index, keypath)
