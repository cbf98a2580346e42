"""The corpus of broken configs in tests/configs/: each must fail with ConfigError, located.

Each file is a complete training.toml with one kind of mistake (or several) and says what it expects:

    # stage: load | resolve PRESET        where the mistake must be caught
    # expect: KEY | MESSAGE FRAGMENT      one per problem; KEY '(file)' for the whole file

A line ending in `#<-- KEY` is where the problem with that key must be reported.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hafs.training.errors import ConfigError, HafsError
from hafs.training.loader import load_config
from hafs.training.plan import resolve

CORPUS = Path(__file__).parent / "configs"
FILES = sorted(CORPUS.glob("*.toml"))


def _expectations(path: Path):
    raw = path.read_bytes()
    header = raw.split(b"\n\n", 1)[0].decode("utf-8")
    stage = re.search(r"^# stage: (.*)$", header, re.M).group(1).split()
    expects = [tuple(s.strip() for s in m.group(1).split("|", 1))
               for m in re.finditer(r"^# expect: (.*)$", header, re.M)]
    markers: dict[str, int] = {}
    for number, line in enumerate(raw.split(b"\n"), 1):
        m = re.search(rb"#<-- (\S+)\s*$", line)
        if m:
            markers.setdefault(m.group(1).decode(), number)
    return stage, expects, markers


def _fail(path: Path, stage: list[str]) -> ConfigError:
    if stage[0] == "load":
        with pytest.raises(ConfigError) as info:
            load_config(path)
    else:
        cfg = load_config(path)  # the file itself is valid: the preset breaks a hardware rule
        with pytest.raises(ConfigError) as info:
            resolve(cfg, stage[1])
    return info.value


def test_corpus_is_large_and_covers_every_kind():
    kinds = {f.name.split("_")[0] for f in FILES}
    assert len(FILES) >= 35
    assert {"syntax", "unknown", "type", "range", "enum", "ref", "missing", "template", "hw"} <= kinds


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_broken_config_is_reported_with_key_file_and_line(path: Path):
    stage, expects, markers = _expectations(path)
    assert expects, "corpus file declares no expectation"
    error = _fail(path, stage)
    assert type(error) is ConfigError and error.exit_code == 2
    rendered = error.render()
    assert "Traceback" not in rendered
    for key, fragment in expects:
        key = "" if key == "(file)" else key
        matches = [p for p in error.problems if p.key == key and fragment in p.message + " " + p.hint]
        assert matches, f"no problem {key!r} ~ {fragment!r} in:\n{rendered}"
        problem = matches[0]
        assert problem.file == str(path)
        marker = markers.get(key or "(file)")
        if marker is not None:
            assert problem.line == marker, f"{key}: reported at line {problem.line}, expected {marker}"
        assert key in rendered and fragment.split("'")[0] in rendered
    # Every problem is located: a key path, or the whole file with a line number.
    for problem in error.problems:
        assert problem.file == str(path)
        assert problem.line is not None, problem.render()
    assert len(error.problems) >= len({key for key, _ in expects})  # all reported at once, none dropped


def test_corpus_markers_all_expected():
    """A `#<--` marker without a matching expectation is a typo in the corpus, not a passing test."""
    for path in FILES:
        _, expects, markers = _expectations(path)
        keys = {k for k, _ in expects}
        assert set(markers) <= keys, f"{path.name}: markers {set(markers) - keys} have no expect line"


def test_every_file_fails_only_with_the_config_error_type():
    """No corpus file may escape as another exception (a traceback for the user)."""
    for path in FILES:
        stage, _, _ = _expectations(path)
        try:
            cfg = load_config(path)
            resolve(cfg, stage[1] if len(stage) > 1 else "run")
        except HafsError as exc:
            assert isinstance(exc, ConfigError)
        else:
            pytest.fail(f"{path.name} was accepted")
