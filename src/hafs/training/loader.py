"""TOML → typed sections. Every problem in the file is collected and reported at once.

Each problem names the file, the line where we can find it, and the key path spelled the way the
user typed it (`presets.my-run.lora`). Unknown keys get a did-you-mean. Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
import tomllib
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

from .errors import ConfigError, Problem, did_you_mean
from .schema import NAMED_TABLES, SINGLE_TABLES, TrainingFile

DEFAULT_CONFIG = Path("config") / "training.toml"
SECTIONS = tuple(NAMED_TABLES) + tuple(SINGLE_TABLES) + ("tuning",)


def default_config_path() -> Path:
    """`config/training.toml` of the current directory, else the one shipped beside the package."""
    here = Path.cwd() / DEFAULT_CONFIG
    if here.exists():
        return here
    shipped = Path(__file__).resolve().parents[3] / DEFAULT_CONFIG
    return shipped if shipped.exists() else here


def load_config(path: str | Path | None = None) -> TrainingFile:
    """Read and validate a training.toml; raises ConfigError listing every problem."""
    path = Path(path).expanduser() if path else default_config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([Problem("config file not found", file=str(path),
                                   hint="pass --config FILE, or run from the project directory")]) from None
    except OSError as exc:
        raise ConfigError([Problem(f"cannot read config file: {exc.strerror or exc}", file=str(path))]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([Problem("file is not valid UTF-8 text", file=str(path), line=line)]) from None
    return load_config_text(text, str(path))


def load_config_text(text: str, filename: str = "<string>") -> TrainingFile:
    """Validate TOML text; `filename` is used in messages and to resolve relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = int(m.group(1)) if m else None
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg) if m else msg
        raise ConfigError([Problem(f"TOML syntax error: {msg}", file=filename, line=line,
                                   hint="see https://toml.io for the syntax")]) from None
    except (RecursionError, ValueError) as exc:  # pathological nesting or numbers
        raise ConfigError([Problem(f"TOML could not be parsed: {type(exc).__name__}", file=filename)]) from None
    locate = _Locator(text)
    problems: list[Problem] = []

    def report(keypath: list[str], message: str, hint: str = "") -> None:
        problems.append(Problem(message, key=_dotted(keypath), file=filename, line=locate(keypath), hint=hint))

    result = TrainingFile(path=filename)
    for section, value in data.items():
        if section not in SECTIONS:
            report([section], f"unknown section{did_you_mean(section, SECTIONS)}",
                   hint="sections are: " + ", ".join(SECTIONS))
            continue
        if not isinstance(value, dict):
            report([section], "must be a table")
            continue
        if section in SINGLE_TABLES:
            built = build_section(SINGLE_TABLES[section], value, [section], report)
            if built is not None:
                setattr(result, section, built)
        elif section == "tuning":
            result.tuning = {k: v for k, v in value.items() if isinstance(v, dict)}
            for k, v in value.items():
                if not isinstance(v, dict):
                    report([section, k], "must be a table")
        else:
            entries = getattr(result, section)
            for name, table in value.items():
                if not isinstance(table, dict):
                    report([section, name], f"must be a table ([{section}.{name}])")
                    continue
                built = build_section(NAMED_TABLES[section], table, [section, name], report)
                if built is not None:
                    entries[name] = built
    _check_references(result, data, report)
    if problems:
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(problems, title=f"{filename}: {len(problems)} {noun} in the training config")
    return result


def _check_references(result: TrainingFile, data: dict, report) -> None:
    refs = {"expert": "experts", "hardware": "hardware", "dataset": "datasets", "lora": "lora",
            "hyperparameters": "hyperparameters"}
    for name, preset in result.presets.items():
        for key, section in refs.items():
            target = getattr(preset, key)
            table = getattr(result, section)
            if target in table:
                continue
            raw_section = data.get(section) if isinstance(data.get(section), dict) else {}
            if target in raw_section:
                continue  # exists but is itself invalid: reported where it is
            available = ", ".join(sorted(table)) or "none defined"
            report(["presets", name, key], f"{key} '{target}' is not defined{did_you_mean(target, table)}",
                   hint=f"[{section}.*] has: {available}")


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
        converted, error = coerce(value, hints[key], keypath + [key], report)
        if error:
            report(keypath + [key], error)
            ok = False
        elif converted is not _INVALID:
            kwargs[key] = converted
        else:
            ok = False
    for name, f in known.items():
        if name not in raw and f.default is MISSING and f.default_factory is MISSING:
            report(keypath, f"missing required key '{name}'")
            ok = False
    if not ok:
        return None
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    for key, message in (check() if check else []):
        report(keypath + [key.split("[")[0]] if "[" in key else keypath + [key], message)
        ok = False
    return obj if ok else None


_INVALID = object()


def coerce(value, tp, keypath: list[str], report=None):
    """(converted value, error message or None) for `value` against annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return coerce(value, inner[0], keypath, report)
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value, None
        if not isinstance(value, dict):
            return None, f"must be a table, got {_describe(value)}"
        built = build_section(tp, value, keypath, report)
        return (built if built is not None else _INVALID), None
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            return None, f"must be a list of {_name(item_type)}, got {_describe(value)}"
        out = []
        for i, item in enumerate(value):
            got, err = coerce(item, item_type, keypath + [f"[{i}]"], report)
            if err:
                return None, f"item {i}: {err}"
            out.append(got)
        return out, None
    if origin is dict or tp is dict:
        return (value, None) if isinstance(value, dict) else (None, f"must be a table, got {_describe(value)}")
    if tp is bool:
        return (value, None) if isinstance(value, bool) else (None, f"must be true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value), None
        return None, f"must be a whole number, got {_describe(value)}"
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                as_float = float(value)
            except OverflowError:
                return None, f"number is too large: {str(value)[:30]}"
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
    kind = {bool: "a boolean", int: "a whole number", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    shown = repr(value)
    if isinstance(value, dict):
        return kind
    return f"{kind} ({shown[:40]}{'...' if len(shown) > 40 else ''})"


def _dotted(keypath: list[str]) -> str:
    out = ""
    for part in keypath:
        if part.startswith("["):
            out += part
        else:
            quoted = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else '"%s"' % part
            out += ("." if out else "") + quoted
    return out


class _Locator:
    """Finds the line of a key path in TOML text (tomllib keeps no positions)."""

    _header = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
    _key = re.compile(r'^\s*("?)([A-Za-z0-9_.-]+)\1\s*=')

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def __call__(self, keypath: list[str]) -> int | None:
        keypath = [p for p in keypath if not p.startswith("[")]
        for split in range(len(keypath), 0, -1):
            table, key = keypath[:split], keypath[split:]
            line = self._find(table, key[0] if key else None)
            if line:
                return line
        return None

    def _find(self, table: list[str], key: str | None) -> int | None:
        current: list[str] | None = []
        header_line = None
        for number, text in enumerate(self.lines, 1):
            m = self._header.match(text)
            if m:
                current = [p.strip().strip('"') for p in m.group(1).split(".")]
                if current == table and key is None:
                    return number
                if current == table:
                    header_line = number
                continue
            if key is not None and current == table:
                k = self._key.match(text)
                if k and k.group(2) == key:
                    return number
        return header_line
