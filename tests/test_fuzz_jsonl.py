"""Hostile dataset files: `read_split` either reads them or raises a DatasetError — nothing else.

Random bytes, structured rows with random values, deep nesting, huge numbers, other encodings, NUL
bytes, BOMs and over-long lines. Every error message must also be printable as UTF-8 (a lone
surrogate from a `\\ud800` escape must not crash the CLI when it prints the error).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hafs.training.data import MAX_LINE_BYTES, read_split
from hafs.training.errors import DatasetError, HafsError
from hafs.training.schema import DatasetSection

GOOD = {"instruction": "Explain LDA #$01", "output": "Loads 1 into A.", "_metadata": {"domain": "asm",
                                                                                       "quality_score": 0.9}}
GOOD_LINE = json.dumps(GOOD).encode()


def plan_for(folder: Path, on_bad_rows: str = "error", threshold: float | None = 0.5, domains=("asm",)):
    dataset = DatasetSection(path=str(folder), on_bad_rows=on_bad_rows, quality_threshold=threshold,
                             domains=list(domains))
    return SimpleNamespace(dataset=dataset, dataset_dir=str(folder), dataset_name="fuzz")


def read_bytes(content: bytes, **plan_kw):
    """read_split on `content`; returns the RawSplit or the HafsError; anything else propagates."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.jsonl").write_bytes(content)
        try:
            result = read_split(plan_for(Path(tmp), **plan_kw), "train")
        except HafsError as exc:
            exc.render().encode("utf-8")  # printable
            return exc
    assert result.stats.kept == len(result.rows) <= result.stats.read
    for row in result.rows:
        for text in (row.instruction, row.output, row.input, row.text):
            assert isinstance(text, str) and "\x00" not in text
            text.encode("utf-8")  # the tokenizer gets valid text
        assert row.quality is None or isinstance(row.quality, float)
    return result


# --------------------------------------------------------------------------- hypothesis

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
KEYS = ["instruction", "input", "output", "text", "messages", "_metadata", "quality_score", "domain", "role",
        "content"]
rows = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", 3]),
                                           "content": json_values}), max_size=3).map(lambda m: {"messages": m})
huge = st.sampled_from([b"1" * 5000, b"1" + b"0" * 400, b"1e999", b"-1e999", b"NaN", b"Infinity", b"-0",
                        b"123456789012345678901234567890.5e-400"])


@st.composite
def hostile_line(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "row", "chat", "number", "nest", "encoding", "nul", "escape"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)).replace(b"\n", b"")
    if kind == "row":
        return json.dumps(draw(rows)).encode("utf-8", "surrogatepass")
    if kind == "chat":
        return json.dumps(draw(messages)).encode("utf-8", "surrogatepass")
    if kind == "number":
        key = draw(st.sampled_from(["quality_score", "output", "instruction", "x"]))
        number = draw(huge)
        row = b'{"instruction": "i", "output": "o", "%s": %s}' % (key.encode(), number)
        return row if key != "quality_score" or draw(st.booleans()) else (
            b'{"instruction": "i", "output": "o", "_metadata": {"quality_score": %s}}' % number)
    if kind == "nest":
        depth = draw(st.sampled_from([50, 900, 1100, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        inner = opener * depth + b"1" + closer * depth
        return b'{"instruction": "i", "output": "o", "_metadata": {"quality_score": %s}}' % inner \
            if draw(st.booleans()) else inner
    if kind == "encoding":
        text = json.dumps({"instruction": draw(st.text(max_size=10)) + "é", "output": "ÿ ok"}, ensure_ascii=False)
        return text.encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "utf-8-sig",
                                                 "cp1252"])), "replace")
    if kind == "nul":
        line = bytearray(GOOD_LINE)
        line.insert(draw(st.integers(0, len(line))), 0)
        return bytes(line)
    escape = draw(st.sampled_from([r"\u0000", r"\ud800", r"\udfff", r"\ud83d\ude00", r"\uffff", "\\", r"\x41"]))
    field = draw(st.sampled_from(["instruction", "output", "domain", "text"]))
    return ('{"instruction": "i", "output": "o", "' + field + '": "a' + escape + 'b"}').encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(hostile_line(), min_size=1, max_size=6), good=st.booleans(),
       policy=st.sampled_from(["error", "skip"]), newline=st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_any_file_is_read_or_refused_with_a_dataset_error(lines, good, policy, newline):
    content = newline.join(([GOOD_LINE] if good else []) + lines)
    read_bytes(content, on_bad_rows=policy)


@settings(max_examples=100, deadline=None)
@given(content=st.binary(max_size=2000), policy=st.sampled_from(["error", "skip"]))
def test_random_bytes_are_read_or_refused(content, policy):
    read_bytes(content, on_bad_rows=policy)


# --------------------------------------------------------------------------- named cases


@pytest.mark.parametrize("line", [
    b'{"instruction": "i", "output": "o", "n": ' + b"1" * 5000 + b"}",       # int over Python's 4300 digits
    b'{"instruction": "i", "output": "o", "quality_score": 1' + b"0" * 400 + b"}",  # int too large for float
    b'{"instruction": "i", "output": "o", "_metadata": {"quality_score": 1' + b"0" * 400 + b"}}",
    b"[" * 100_000 + b"]" * 100_000,
])
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_named_hostile_rows(line, policy):
    result = read_bytes(GOOD_LINE + b"\n" + line, on_bad_rows=policy, domains=())
    if policy == "error":
        assert isinstance(result, DatasetError) and ":2" in result.render()  # located at line 2
    else:
        assert not isinstance(result, HafsError) and result.stats.bad_skipped == 1 and result.stats.kept == 1


def test_a_lone_surrogate_domain_only_row_gives_a_printable_error():
    result = read_bytes(b'{"instruction": "i", "output": "o", "domain": "\\ud800x"}', domains=("asm",))
    assert isinstance(result, DatasetError)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "latin-1"])
def test_other_encodings_are_refused_with_a_location(encoding):
    text = json.dumps({"instruction": "Erklär LDA", "output": "Lädt 1 in A.", "domain": "asm"}, ensure_ascii=False)
    result = read_bytes(text.encode(encoding) + b"\n")
    assert isinstance(result, DatasetError)
    assert "train.jsonl:1" in result.render() and ("UTF-8" in result.render() or "NUL" in result.render())


def test_a_bom_at_the_start_is_accepted():
    result = read_bytes(b"\xef\xbb\xbf" + GOOD_LINE + b"\n" + GOOD_LINE)
    assert result.stats.kept == 2


def test_a_ten_megabyte_line_is_a_bad_row_not_a_memory_spike():
    big = json.dumps({"instruction": "i", "output": "x" * (10 << 20)}).encode()
    assert len(big) > MAX_LINE_BYTES
    result = read_bytes(GOOD_LINE + b"\n" + big + b"\n" + GOOD_LINE, on_bad_rows="error")
    assert isinstance(result, DatasetError) and "train.jsonl:2" in result.render() and "MiB" in result.render()
    result = read_bytes(GOOD_LINE + b"\n" + big + b"\n" + GOOD_LINE, on_bad_rows="skip")
    assert result.stats.kept == 2 and result.stats.bad_skipped == 1 and [r.line for r in result.rows] == [1, 3]


def test_nan_quality_score_does_not_slip_past_the_threshold():
    result = read_bytes(GOOD_LINE + b'\n{"instruction": "i", "output": "o", "quality_score": NaN}',
                        on_bad_rows="skip")
    assert result.stats.kept == 1
