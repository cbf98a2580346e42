"""Dataset splits → validated, filtered `Sample`s, and samples → (prompt, response) text.

Pure Python (no torch, no tokenizer needed to read): `--dry-run` uses `read_split` for counts.
Rows are JSONL, one object per line, in one of three formats detected per row:

- Alpaca: `{"instruction", "input" (optional), "output"}`
- chat:   `{"messages": [{"role", "content"}, ...]}` (the last message is the assistant's answer)
- text:   `{"text"}` (trained on in full)

The user's exporter writes `text` next to the structured fields; the structured fields win.
`domain` / `quality_score` are read at the top level or under `_metadata`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DatasetError, Problem
from .templates import fill_template, has_chat_template, prompt_template, system_prompt

SPLITS = ("train", "val", "test")
FORMATS = ("alpaca", "chat", "text")
MAX_LINE_BYTES = 8 << 20
"""Longer lines are reported as bad rows instead of being parsed (a runaway export, not a sample)."""
BAD_ROWS_SHOWN = 5
"""Bad rows listed by location in an error; the rest are counted."""

CHAT_ROLES = ("system", "user", "assistant", "tool")
_FORBIDDEN_CHARS = re.compile("[\x00\ud800-\udfff]")  # NUL, and lone surrogates the tokenizer cannot encode
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),  # before UTF-16: FF FE 00 00
              (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


@dataclass
class Sample:
    """One valid row, with what is needed to render it."""

    format: str
    """alpaca, chat or text."""
    line: int
    """1-based line of the row in its file."""
    instruction: str = ""
    """Alpaca instruction."""
    input: str = ""
    """Alpaca input ('' when absent)."""
    output: str = ""
    """Alpaca output: the response that is learned."""
    messages: list[dict] | None = None
    """Chat messages, each {"role", "content"}; the last one is the assistant's answer."""
    text: str = ""
    """Plain-text rows: the whole text (learned in full)."""
    domain: str | None = None
    """Domain tag, when the row has one."""
    quality: float | None = None
    """quality_score, when the row has one."""


@dataclass
class SplitStats:
    """What reading one split kept and dropped, and why."""

    split: str
    """train, val or test."""
    path: str
    """The JSONL file read."""
    sha256: str = ""
    """Hash of the file's bytes (part of the tokenization cache key)."""
    read: int = 0
    """Non-blank lines read, bad ones included."""
    kept: int = 0
    """Rows that passed every filter."""
    dropped_quality: int = 0
    """Rows whose quality_score is below quality_threshold."""
    dropped_domain: int = 0
    """Rows whose domain is not in domains."""
    bad_skipped: int = 0
    """Invalid rows skipped because on_bad_rows = "skip"."""
    by_format: dict[str, int] = field(default_factory=dict)
    """Kept rows per format (alpaca, chat, text)."""
    quality_threshold: float | None = None
    """The threshold applied (for the summary)."""
    bad_examples: list[str] = field(default_factory=list)
    """The first few skipped bad rows as 'file:line: what'."""

    def summary(self) -> str:
        """One line: 'train: 300 rows read, 251 kept (31 below quality 0.5, 18 outside domains)'."""
        why = []
        if self.dropped_quality:
            why.append(f"{self.dropped_quality} below quality {self.quality_threshold:g}")
        if self.dropped_domain:
            why.append(f"{self.dropped_domain} outside domains")
        if self.bad_skipped:
            why.append(f"{self.bad_skipped} bad row{'s' * (self.bad_skipped != 1)} skipped")
        text = f"{self.split}: {self.read} rows read, {self.kept} kept"
        return text + (f" ({', '.join(why)})" if why else "")

    def to_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: dict) -> SplitStats:
        return cls(**data)


@dataclass
class RawSplit:
    """A split read from disk: its valid, filtered rows and the counts."""

    rows: list[Sample]
    """Kept rows, in file order."""
    stats: SplitStats
    """Counts and file hash."""


def split_path(plan, split: str) -> Path | None:
    """The file of `split` ('train', 'val', 'test'), or None when the config names none."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = getattr(plan.dataset, f"{split}_split")
    return Path(plan.dataset_dir) / name if name else None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_split(plan, split: str) -> RawSplit | None:
    """Read, validate and filter one split; None when an optional (val/test) file is absent.

    Raises DatasetError for a missing train file, bad rows (unless on_bad_rows = "skip") and a
    split that the filters emptied (naming the filter that did it).
    """
    path = split_path(plan, split)
    key = f"datasets.{plan.dataset_name}"
    if path is None or not path.is_file():
        if split != "train":
            return None
        if path is not None and path.exists():
            raise DatasetError([Problem("train split is not a file", file=str(path), key=f"{key}.train_split")])
        where = Path(plan.dataset_dir)
        hint = (f"{key}.path resolves to {where}, which is a file: it must be the folder holding "
                f"{plan.dataset.train_split}" if where.is_file()
                else f"{key}.path resolves to {where}, which does not exist" if not where.is_dir()
                else f"{where} has no {plan.dataset.train_split}; check {key}.path and {key}.train_split")
        raise DatasetError([Problem(f"train split not found: {path}", file=plan.config_file(), key=f"{key}.path",
                                    hint=hint)])

    stats = SplitStats(split=split, path=str(path), quality_threshold=plan.dataset.quality_threshold)
    threshold = plan.dataset.quality_threshold
    wanted = {d.casefold() for d in plan.dataset.domains}
    rows: list[Sample] = []
    bad: list[Problem] = []  # the first few; n_bad counts them all
    n_bad = 0
    domains_seen: dict[str, int] = {}
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            encoding = wide_encoding(f.read(4))
            if encoding:  # one error for the file, not "contains a NUL byte" on every row
                raise DatasetError([Problem(
                    f"the file is {encoding} text, not UTF-8 (Windows PowerShell 5 writes UTF-16 with `>`)",
                    file=str(path), line=1,
                    hint="save it as UTF-8, e.g. in PowerShell `... | Out-File -Encoding utf8 FILE` instead of "
                         "`> FILE` (a UTF-8 byte-order mark is fine)")], title=f"{split} split is not UTF-8: {path}")
            f.seek(0)
            for number, raw in enumerate(_lines(f, digest), 1):
                if raw is not None and not raw.strip():
                    continue
                stats.read += 1
                sample = _parse_row(raw, number)
                if isinstance(sample, str):
                    n_bad += 1
                    if len(bad) < BAD_ROWS_SHOWN:
                        bad.append(Problem(sample, file=str(path), line=number))
                    continue
                if threshold is not None and sample.quality is not None and sample.quality < threshold:
                    stats.dropped_quality += 1
                    continue
                if sample.domain is not None:
                    domains_seen[sample.domain] = domains_seen.get(sample.domain, 0) + 1
                    if wanted and sample.domain.casefold() not in wanted:
                        stats.dropped_domain += 1
                        continue
                rows.append(sample)
                stats.by_format[sample.format] = stats.by_format.get(sample.format, 0) + 1
    except OSError as exc:
        raise DatasetError([Problem(f"cannot read {split} split: {exc.strerror or exc}", file=str(path))]) from None
    stats.sha256 = digest.hexdigest()
    stats.kept = len(rows)

    if n_bad and plan.dataset.on_bad_rows != "skip":
        more = n_bad - len(bad)
        tail = Problem(f"{n_bad} bad row{'s' * (n_bad != 1)} in total" + (f" ({more} not shown)" if more else ""),
                       key=f"{key}.on_bad_rows",
                       hint=f'fix the rows, or set on_bad_rows = "skip" in [{key}] to skip and count them')
        raise DatasetError(bad + [tail], title=f"{split} split has bad rows: {path}")
    stats.bad_skipped = n_bad
    stats.bad_examples = [p.render() for p in bad]
    if not rows:
        raise DatasetError([_empty_problem(stats, plan, domains_seen)], title=f"{split} split is empty: {path}")
    return RawSplit(rows=rows, stats=stats)


def wide_encoding(head: bytes) -> str:
    """'UTF-16' or 'UTF-32' when `head`, a file's first 4 bytes, starts text in one of them; else ''.

    By its byte-order mark, or without one by the zero bytes beside an ASCII character (RFC 4627's
    test: a JSON line starts with '{', and a config file with ASCII too). A UTF-8 BOM is not wide.
    """
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            return name
    if len(head) < 4:
        return ""
    zero = [b == 0 for b in head[:4]]
    if zero in ([False, True, True, True], [True, True, True, False]):
        return "UTF-32"
    if zero in ([False, True, False, True], [True, False, True, False]):
        return "UTF-16"
    return ""


def _lines(f, digest):
    """Lines of a binary file, hashing as we go; an over-long line comes back as None."""
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        digest.update(line)
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            # Swallow the rest of the runaway line without holding it in memory.
            while True:
                rest = f.readline(1 << 20)
                digest.update(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        yield line


def _parse_row(raw: bytes | None, number: int) -> Sample | str:
    """A Sample, or a short description of what is wrong with the row."""
    if raw is None:
        return f"line is longer than {MAX_LINE_BYTES >> 20} MiB"
    if b"\x00" in raw:
        return "contains a NUL byte"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"is not valid UTF-8 (byte {exc.start + 1} of the line)"
    if number == 1:
        text = text.lstrip("\ufeff")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return "invalid JSON: nested too deeply"
    except ValueError:  # an integer longer than Python's int_max_str_digits (4300)
        return "invalid JSON: a number has too many digits"
    if not isinstance(row, dict):
        return f"must be a JSON object, got {type(row).__name__}"
    meta = row.get("_metadata")
    if meta is not None and not isinstance(meta, dict):
        return "_metadata must be an object"
    meta = meta or {}
    quality = row.get("quality_score", meta.get("quality_score"))
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, (int, float))
                                or not _finite(quality)):
        return f"quality_score must be a number, got {json.dumps(quality)[:40]}"
    domain = row.get("domain", meta.get("domain"))
    if domain is not None and not isinstance(domain, str):
        return f"domain must be a string, got {json.dumps(domain)[:40]}"
    if domain is not None and _FORBIDDEN_CHARS.search(domain):
        return "domain contains a NUL character or an invalid \\u escape"
    sample = Sample(format="", line=number, domain=domain, quality=None if quality is None else float(quality))

    if "messages" in row:
        sample.format = "chat"
        error = _check_messages(row["messages"])
        if error:
            return error
        sample.messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        return sample
    if "instruction" in row or "output" in row:
        sample.format = "alpaca"
        for name in ("instruction", "output"):
            value = row.get(name)
            if value is None:
                return f"Alpaca row is missing '{name}'"
            if not isinstance(value, str):
                return f"'{name}' must be a string, got {type(value).__name__}"
            if not value.strip():
                return f"'{name}' is empty"
        value = row.get("input")
        if value is not None and not isinstance(value, str):
            return f"'input' must be a string, got {type(value).__name__}"
        sample.instruction, sample.output, sample.input = row["instruction"], row["output"], value or ""
        fields = (sample.instruction, sample.output, sample.input)
    elif "text" in row:
        sample.format = "text"
        value = row["text"]
        if not isinstance(value, str):
            return f"'text' must be a string, got {type(value).__name__}"
        if not value.strip():
            return "'text' is empty"
        sample.text = value
        fields = (value,)
    else:
        return "no 'instruction'/'output', 'messages' or 'text' field"
    if any(_FORBIDDEN_CHARS.search(v) for v in fields):
        return "contains a NUL character or an invalid \\u escape"
    return sample


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def _check_messages(messages) -> str:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object with 'role' and 'content'"
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            return f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {json.dumps(role)[:30]}"
        if not isinstance(content, str):
            return f"messages[{i}].content must be a string, got {type(content).__name__}"
        if _FORBIDDEN_CHARS.search(content):
            return f"messages[{i}].content contains a NUL character or an invalid \\u escape"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's (that is what is learned)"
    if not messages[-1]["content"].strip():
        return "the last (assistant) message is empty"
    if not any(m["role"] == "user" for m in messages[:-1]):
        return "no user message before the assistant's answer"
    return ""


def _empty_problem(stats: SplitStats, plan, domains_seen: dict[str, int]) -> Problem:
    key = f"datasets.{plan.dataset_name}"
    valid = stats.read - stats.bad_skipped
    if stats.read == 0:
        return Problem("the file has no rows", file=stats.path)
    if valid == 0:
        return Problem(f"all {stats.read} rows are bad and were skipped (on_bad_rows = \"skip\")",
                       key=f"{key}.on_bad_rows", hint=f"first: {stats.bad_examples[0]}" if stats.bad_examples else "")
    if stats.dropped_quality == valid:
        return Problem(f"all {valid} rows have quality_score < {plan.dataset.quality_threshold:g}",
                       key=f"{key}.quality_threshold", hint="lower quality_threshold, or remove it")
    if stats.dropped_domain == valid:
        found = ", ".join(f"{d} ({n})" for d, n in sorted(domains_seen.items(), key=lambda kv: -kv[1])[:8])
        return Problem(f"all {valid} rows have a domain outside {plan.dataset.domains}",
                       key=f"{key}.domains", hint=f"domains in the file: {found}")
    return Problem(f"no rows left: {stats.dropped_quality} below quality_threshold "
                   f"{plan.dataset.quality_threshold:g} ({key}.quality_threshold), "
                   f"{stats.dropped_domain} outside domains ({key}.domains)",
                   hint="loosen quality_threshold or domains")


# ----------------------------------------------------------------------------- rendering

def render(sample: Sample, expert, tokenizer=None) -> tuple[str, str]:
    """(prompt, response) text; the loss is computed on the response (plus EOS) only.

    Alpaca rows fill the expert's template. Chat rows use the tokenizer's chat template when it has
    one (the expert's system prompt is added when the row has no system message), else they are
    mapped onto the expert's template: last user message → instruction, earlier turns → input.
    Text rows have an empty prompt: the whole text is learned.
    """
    if sample.format == "alpaca":
        return fill_template(prompt_template(expert), sample.instruction, sample.input), sample.output
    if sample.format == "text":
        return "", sample.text
    messages = sample.messages or []
    answer = messages[-1]["content"]
    history = messages[:-1]
    if has_chat_template(tokenizer):
        system = system_prompt(expert)
        if system and not any(m["role"] == "system" for m in history):
            history = [{"role": "system", "content": system}] + history
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        return prompt, answer
    last_user = max(i for i, m in enumerate(history) if m["role"] == "user")
    context = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}"
                          for i, m in enumerate(history) if i != last_user)
    return fill_template(prompt_template(expert), history[last_user]["content"], context), answer
