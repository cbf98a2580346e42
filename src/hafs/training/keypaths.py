"""Key paths of TOML text: how they are spelt in messages, and on which line each one is.

tomllib keeps no positions, so `key_lines` scans the text once (only text tomllib accepted) to
map every key path to its line. Nothing here knows the hafs schema.
"""

from __future__ import annotations

import re

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_INDEX = re.compile(r"\[\d+\]")


def dotted(keypath) -> str:
    """['presets', 'my run', 'report_to', '[0]'] → 'presets."my run".report_to[0]' (TOML spelling)."""
    out = ""
    for part in keypath:
        if _INDEX.fullmatch(part):
            out += part
        else:
            quoted = part if _BARE.fullmatch(part) else '"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"'
            out += ("." if out else "") + quoted
    return out


def nearest_line(index: dict[tuple[str, ...], int], keypath) -> int | None:
    """Line of the longest prefix of `keypath` found in `index` (list indices like '[0]' included)."""
    parts = tuple(keypath)
    for end in range(len(parts), 0, -1):
        if parts[:end] in index:
            return index[parts[:end]]
    return None


def split_dotted(key: str) -> list[str]:
    """Inverse of the loader's dotted key paths: 'presets."a.b".lora[0]' → ['presets', 'a.b', 'lora', '[0]']."""
    return [_unescape(m.group(1)) if m.group(1) is not None else m.group(2) or m.group(3)
            for m in re.finditer(r'"((?:[^"\\]|\\.)*)"|(\[\d+\])|([^."\[]+)', key)]


_SCALAR = re.compile(r"[^,\]}#\n]*")
_ESCAPE = re.compile(r'\\(?:u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|(.))', re.S)
_SIMPLE_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\", "e": "\x1b"}


def key_lines(text: str, repeats: list | None = None) -> dict[tuple[str, ...], int]:
    """Map every key path of valid TOML text to the 1-based line that defines it.

    Tables, dotted keys, quoted keys, inline tables and array items (as '[i]') are indexed, and
    every prefix of a path points at the line where that prefix first appeared. Multi-line strings
    and arrays are skipped correctly, so a `[table]`-looking line inside a string is not a header.
    `repeats`, when given, receives (path, first line, line) for each key or table defined again
    (TOML forbids that; tomllib's error names neither the key nor the first definition).
    """
    index: dict[tuple[str, ...], int] = {}
    # For `repeats`: paths given a value (key = value), [table] headers, and every path seen so far;
    # unlike `index`, each element of an array of tables starts them afresh.
    assigned: dict[tuple[str, ...], int] = {}
    headers: dict[tuple[str, ...], int] = {}
    seen: dict[tuple[str, ...], int] = {}

    def repeated(path: tuple[str, ...], at: int, first_of) -> None:
        if repeats is None:
            return
        clash = next((path[:end] for end in range(1, len(path) + 1) if path[:end] in assigned), None)
        if clash is not None:
            repeats.append((clash, assigned[clash], at))
        elif path in first_of:
            repeats.append((path, first_of[path], at))
        for end in range(1, len(path) + 1):
            seen.setdefault(path[:end], at)

    def assign(path: tuple[str, ...], at: int) -> None:
        repeated(path, at, seen)
        assigned[path] = at
    pos, n = 0, len(text)
    counted = [0, 1]  # offset up to which newlines are counted, line number there (pos only grows)

    def line() -> int:
        counted[1] += text.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    def record(path: tuple[str, ...], at: int) -> None:
        for end in range(1, len(path) + 1):
            index.setdefault(path[:end], at)

    def skip_space(newlines: bool = False) -> None:
        nonlocal pos
        while pos < n:
            c = text[pos]
            if c in " \t\r" or (newlines and c == "\n"):
                pos += 1
            elif c == "#" and newlines:
                end = text.find("\n", pos)
                pos = n if end < 0 else end
            else:
                return

    def read_key() -> list[str]:
        nonlocal pos
        parts = []
        while True:
            skip_space()
            if text.startswith('"', pos):
                end = pos + 1
                while text[end] != '"':
                    end += 2 if text[end] == "\\" else 1
                parts.append(_unescape(text[pos + 1:end]))
                pos = end + 1
            elif text.startswith("'", pos):
                end = text.index("'", pos + 1)
                parts.append(text[pos + 1:end])
                pos = end + 1
            else:
                m = _BARE.match(text, pos)
                if not m:
                    raise ValueError(f"no key at offset {pos}")
                parts.append(m.group())
                pos = m.end()
            skip_space()
            if not text.startswith(".", pos):
                return parts
            pos += 1

    def skip_value(path: tuple[str, ...]) -> None:
        nonlocal pos
        skip_space()
        for quote in ('"""', "'''"):
            if text.startswith(quote, pos):
                end = pos + 3
                while not text.startswith(quote, end):
                    end += 2 if quote == '"""' and text[end] == "\\" else 1
                while text.startswith(quote[0], end + 3):  # up to two quotes may end the content
                    end += 1
                pos = end + 3
                return
        c = text[pos]
        if c in "\"'":
            end = pos + 1
            while text[end] != c:
                end += 2 if c == '"' and text[end] == "\\" else 1
            pos = end + 1
        elif c == "[":
            pos += 1
            i = 0
            while True:
                skip_space(newlines=True)
                if text[pos] == "]":
                    pos += 1
                    return
                record(path + (f"[{i}]",), line())
                skip_value(path + (f"[{i}]",))
                skip_space(newlines=True)
                if text[pos] == ",":
                    pos += 1
                i += 1
        elif c == "{":
            pos += 1
            while True:
                skip_space(newlines=True)
                if text[pos] == "}":
                    pos += 1
                    return
                at = line()
                key = path + tuple(read_key())
                record(key, at)
                pos += 1  # '='
                skip_value(key)
                skip_space(newlines=True)
                if text[pos] == ",":
                    pos += 1
        else:  # number, boolean or date-time: runs to a delimiter (date-times may hold a space)
            pos = _SCALAR.match(text, pos).end()

    table: tuple[str, ...] = ()
    while True:
        skip_space(newlines=True)
        if pos >= n:
            return index
        at = line()
        if text[pos] == "[":
            double = text.startswith("[[", pos)
            pos += 2 if double else 1
            table = tuple(read_key())
            pos += 2 if double else 1
            if double:  # a new element of an array of tables: its keys start afresh
                for done in (assigned, headers, seen):
                    for path in [p for p in done if len(p) > len(table) and p[:len(table)] == table]:
                        del done[path]
            else:
                repeated(table, at, headers)
                headers[table] = at
            record(table, at)
        else:
            key = table + tuple(read_key())
            assign(key, at)
            record(key, at)
            pos += 1  # '='
            skip_value(key)


def _unescape(raw: str) -> str:
    def one(m: re.Match) -> str:
        if m.group(3) is not None:
            return _SIMPLE_ESCAPES.get(m.group(3), m.group(3))
        return chr(int(m.group(1) or m.group(2), 16))

    return _ESCAPE.sub(one, raw)
