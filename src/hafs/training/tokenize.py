"""Samples → token ids with a loss mask, cached on disk; `prepare_data` runs the whole data step.

Every example is `prefix + prompt + response + EOS`, where `prefix` is what the tokenizer adds in
front of a text (a BOS for Llama-style tokenizers, nothing for Qwen). Prompt and response are
tokenized separately, exactly as they are at inference (the prompt is encoded alone, then the model
continues), so the boundary is never blurred by a merge across it.

The loss mask is True on response tokens and EOS only. The first token of every example is never a
target, so when examples are packed into one row the last token of one example is never trained
to predict the first token of the next.

Samples longer than `sequence_length`:
- `long_samples = "truncate"`: the prompt is kept whole and the response is cut to fit; no EOS is
  appended (the text did not end there, the model must not learn to stop there). If the prompt
  leaves fewer than `MIN_RESPONSE_TOKENS` tokens for the response, the sample is dropped instead.
- `long_samples = "drop"`: the sample is dropped.
Both are counted (`truncated`, `dropped_too_long`) and printed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass

import numpy as np

from . import datacache
from .data import (
    BAD_ROWS_SHOWN,
    SPLITS,
    RawSplit,
    SplitStats,
    file_sha256,
    read_split,
    render,
    split_path,
)
from .errors import ConfigError, DatasetError, Problem
from .keypaths import dotted
from .templates import has_chat_template, prompt_template, system_prompt

MIN_RESPONSE_TOKENS = 16
"""Truncation keeps at least this many response tokens (capped at half of sequence_length), else drops."""
ENCODE_CHUNK = 4096
"""Texts per batched tokenizer call."""
CACHE_VERSION = 2
"""Bump when the layout or the meaning of cached arrays changes (2: no file paths in the entry)."""


def min_response_room(sequence_length: int) -> int:
    """Response tokens a truncated sample must keep within `sequence_length`, else it is dropped."""
    return min(MIN_RESPONSE_TOKENS, max(1, sequence_length // 2))


@dataclass
class TokenStats:
    """What tokenizing one split produced."""

    examples: int = 0
    """Examples kept."""
    tokens: int = 0
    """Tokens over all examples (prompt + response + EOS)."""
    response_tokens: int = 0
    """Tokens the loss is computed on."""
    truncated: int = 0
    """Examples whose response was cut to fit sequence_length."""
    dropped_too_long: int = 0
    """Examples dropped because they did not fit sequence_length."""
    sequence_length: int = 0
    """The limit applied."""
    long_samples: str = "truncate"
    """The policy applied to samples over the limit."""
    p50: int = 0
    """Median example length in tokens."""
    p90: int = 0
    """90th percentile example length."""
    p99: int = 0
    """99th percentile example length."""
    max: int = 0
    """Longest example."""

    def summary(self, split: str = "") -> str:
        """One line: counts, truncation and length percentiles."""
        head = f"{split}: " if split else ""
        text = (f"{head}{self.examples} samples, {self.tokens:,} tokens ({self.response_tokens:,} trained on); "
                f"length p50 {self.p50} / p90 {self.p90} / max {self.max}")
        if self.truncated:
            text += f"; {self.truncated} truncated to {self.sequence_length} tokens"
        if self.dropped_too_long:
            text += f"; {self.dropped_too_long} dropped as longer than {self.sequence_length} tokens"
            if self.long_samples == "truncate":  # only a prompt that leaves no room for the response drops one
                room = min_response_room(self.sequence_length)
                text += f" (their prompt leaves fewer than {room} tokens for the response)"
        return text

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class TokenizedSplit:
    """One split as flat token arrays: example i is `input_ids[offsets[i]:offsets[i+1]]`."""

    split: str
    """train, val or test."""
    input_ids: np.ndarray
    """All examples' token ids, concatenated (int32)."""
    label_mask: np.ndarray
    """True where the token is a training target (response and EOS), same shape as input_ids."""
    offsets: np.ndarray
    """Start of each example in input_ids, plus the total at the end (int64, len = examples + 1)."""
    lines: np.ndarray
    """Source line of each example in the split's file (int32)."""
    raw: SplitStats
    """How reading and filtering went."""
    stats: TokenStats
    """How tokenizing went."""
    cache_hit: bool = False
    """Whether this came from the on-disk cache."""

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example (int64)."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, label_mask) of example i."""
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[s:e], self.label_mask[s:e]

    def summary(self) -> str:
        return self.stats.summary(self.split) + (" [cached]" if self.cache_hit else "")


@dataclass
class PreparedData:
    """The tokenized splits of a plan; val and test are None when their files are absent."""

    train: TokenizedSplit
    """Training examples."""
    val: TokenizedSplit | None = None
    """Validation examples (None: evaluation during training is skipped)."""
    test: TokenizedSplit | None = None
    """Test examples (None: evaluation after training is skipped)."""

    def stats(self) -> dict:
        """Per-split counts for metadata.json."""
        return {s.split: {"rows": s.raw.to_dict(), "tokens": s.stats.to_dict()}
                for s in (self.train, self.val, self.test) if s is not None}


def tokenize_split(raw: RawSplit, plan, tokenizer, *, cache: bool = True, _fingerprint: str = "") -> TokenizedSplit:
    """Render and tokenize a split (batched), with the loss mask; cached on disk by content."""
    fingerprint = _fingerprint or tokenizer_fingerprint(tokenizer)
    key = cache_key(plan, raw.stats.split, raw.stats.sha256, fingerprint)
    if cache:
        hit = load_cached(key, raw.stats.split, raw.stats.path)
        if hit is not None:
            return hit
    out = _tokenize(raw, plan, tokenizer)
    if cache:
        save_cached(key, out)
    return out


def _tokenize(raw: RawSplit, plan, tokenizer) -> TokenizedSplit:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError([Problem(f"the tokenizer of {plan.expert.base_model} has no EOS token",
                                   key=f"experts.{plan.expert_name}.base_model",
                                   hint="samples end with EOS so the model learns to stop; use a model whose "
                                        "tokenizer defines eos_token")])
    prefix = special_prefix(tokenizer)
    encode = _encoder(tokenizer)
    limit = plan.sequence_length
    min_room = min_response_room(limit)
    drop_long = plan.dataset.long_samples == "drop"
    stats = TokenStats(sequence_length=limit, long_samples=plan.dataset.long_samples)

    pieces: list[list[int]] = []  # prefix, prompt, response[, eos] per kept example
    seg_lens: list[int] = []      # [masked, labelled] token counts per kept example
    lines: list[int] = []
    dropped: list[tuple[int, int]] = []  # (prompt, whole) tokens of each dropped example, for the error
    bad: list[Problem] = []
    eos_list = [eos]
    # Chat-template prompts carry their own special tokens (as apply_chat_template(tokenize=True)
    # does); everything else gets the tokenizer's usual prefix.
    chat_prefix = [] if has_chat_template(tokenizer) else prefix
    rows = raw.rows
    for start in range(0, len(rows), ENCODE_CHUNK):
        chunk, rendered = _render_chunk(rows[start:start + ENCODE_CHUNK], plan, tokenizer, bad, raw.stats.path)
        encoded = encode([p for p, _ in rendered] + [r for _, r in rendered])  # one call: better thread balance
        prompts, responses = encoded[:len(chunk)], encoded[len(chunk):]
        for sample, p_ids, r_ids in zip(chunk, prompts, responses):
            pre = chat_prefix if sample.format == "chat" else prefix
            n_prompt = len(pre) + len(p_ids)
            n_resp = len(r_ids) + 1
            tail = eos_list
            if n_prompt + n_resp > limit:
                room = limit - n_prompt
                if drop_long or room < min_room:
                    stats.dropped_too_long += 1
                    dropped.append((n_prompt, n_prompt + n_resp))
                    continue
                r_ids, n_resp, tail = r_ids[:room], room, []
                stats.truncated += 1
            pieces += (pre, p_ids, r_ids, tail)
            seg_lens += (n_prompt, n_resp)
            lines.append(sample.line)

    key = f"datasets.{plan.dataset_name}"
    where = f"{raw.stats.split} split"
    if bad:
        if plan.dataset.on_bad_rows != "skip":
            tail_problem = Problem(f"{len(bad)} row{'s' * (len(bad) != 1)} in total", key=f"{key}.on_bad_rows",
                                   hint=f'fix the rows, or set on_bad_rows = "skip" in [{key}] to skip them')
            raise DatasetError(bad[:BAD_ROWS_SHOWN] + [tail_problem],
                               title=f"{where} has chat rows the tokenizer's chat template rejects: {raw.stats.path}")
        _count_skipped(raw.stats, bad)
    n = len(lines)
    if n == 0:
        problem = (Problem(f"all {len(rows)} chat rows were rejected by the chat template and skipped",
                           key=f"{key}.on_bad_rows") if len(bad) == len(rows) else
                   _all_too_long(plan, raw.stats.split, dropped, drop_long, min_room))
        raise DatasetError([problem], title=f"{where} is empty after tokenizing: {raw.stats.path}")
    seg = np.asarray(seg_lens, dtype=np.int64)
    total = int(seg.sum())
    input_ids = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=total)
    label_mask = np.repeat(np.tile(np.array([False, True]), n), seg)
    lengths = seg[0::2] + seg[1::2]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    label_mask[offsets[:-1]] = False  # never learn an example's first token (see module docstring)

    stats.examples = n
    stats.tokens = total
    stats.response_tokens = int(label_mask.sum())
    stats.p50, stats.p90, stats.p99 = (int(v) for v in np.percentile(lengths, [50, 90, 99], method="nearest"))
    stats.max = int(lengths.max())
    return TokenizedSplit(split=raw.stats.split, input_ids=input_ids, label_mask=label_mask, offsets=offsets,
                          lines=np.asarray(lines, dtype=np.int32), raw=raw.stats, stats=stats)


def _all_too_long(plan, split: str, dropped: list[tuple[int, int]], drop_long: bool, min_room: int) -> Problem:
    """Why every sample was dropped, in figures, and the sequence_length that would keep them."""
    limit = plan.sequence_length
    if drop_long:
        shortest = min(whole for _, whole in dropped)
        return Problem(f"all {len(dropped)} samples are longer than sequence_length {limit} tokens "
                       f"(long_samples = \"drop\"): the shortest {split} sample is {shortest} tokens",
                       key=f"datasets.{plan.dataset_name}.long_samples",
                       hint=f"raise sequence_length to at least {shortest}, or set long_samples = \"truncate\" "
                            "to cut long responses to fit")
    # Truncation cuts responses, never prompts: a prompt that leaves no room for an answer teaches nothing.
    prompts = [p for p, _ in dropped]
    low, mid, high = (int(v) for v in np.percentile(prompts, [0, 50, 100], method="nearest"))
    return Problem(f"all {len(dropped)} samples of the {split} split were dropped: their prompts (all but the "
                   f"response) are {low} to {high} tokens (median {mid}), leaving fewer than {min_room} tokens for "
                   f"the response within sequence_length {limit}",
                   key=dotted(["presets", plan.preset, "sequence_length"]), file=plan.config_file(),
                   hint=f"raise sequence_length to at least {low + MIN_RESPONSE_TOKENS} "
                        f"({high + MIN_RESPONSE_TOKENS} keeps every sample), or shorten the prompt template")


def _render_chunk(chunk: list, plan, tokenizer, bad: list[Problem], path: str) -> tuple[list, list[tuple[str, str]]]:
    """(samples, their (prompt, response)); a row the chat template rejects goes to `bad` instead."""
    kept, rendered = [], []
    for sample in chunk:
        try:
            rendered.append(render(sample, plan.expert, tokenizer))
        except Exception as exc:  # jinja raises its own errors, e.g. "roles must alternate"
            if sample.format != "chat":
                raise
            bad.append(Problem(f"the chat template failed: {str(exc)[:200]}", file=path,
                               line=sample.line))
            continue
        kept.append(sample)
    return kept, rendered


def _count_skipped(stats: SplitStats, bad: list[Problem]) -> None:
    """Move rows skipped at render time from `kept` to `bad_skipped` so the summary stays true."""
    stats.bad_skipped += len(bad)
    stats.kept -= len(bad)
    stats.by_format["chat"] = stats.by_format.get("chat", 0) - len(bad)
    room = max(0, BAD_ROWS_SHOWN - len(stats.bad_examples))
    stats.bad_examples += [p.render() for p in bad[:room]]


def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts in front of a text (e.g. [BOS]); [] for Qwen."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k])
    return []


def _encoder(tokenizer):
    """Batched text → ids without special tokens; the Rust backend directly when it is safe."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None \
            and hasattr(backend, "encode_batch_fast"):
        split_special = getattr(tokenizer, "split_special_tokens", None)

        def encode(texts: list[str]) -> list[list[int]]:
            # transformers sets this flag on the backend before each call; do the same for parity.
            if split_special is not None and backend.encode_special_tokens != split_special:
                backend.encode_special_tokens = split_special
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return encode

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return encode


def prepare_data(plan, tokenizer, log=print, *, cache: bool = True) -> PreparedData:
    """Read, filter, render and tokenize every split of `plan`, printing what was kept and why.

    An unchanged re-run (same files, tokenizer, template, sequence_length and filters) loads the
    tokenized arrays from the cache without reading the JSONL again.
    """
    fingerprint = tokenizer_fingerprint(tokenizer)
    out: dict[str, TokenizedSplit | None] = {}
    for split in SPLITS:
        path = split_path(plan, split)
        hit = None
        if cache and path is not None and path.is_file():
            key = cache_key(plan, split, file_sha256(path), fingerprint)
            hit = load_cached(key, split, str(path))
        if hit is None:
            raw = read_split(plan, split)
            if raw is None:
                out[split] = None
                what = "evaluation during training" if split == "val" else "evaluation after training"
                log(f"{split}: no {getattr(plan.dataset, f'{split}_split') or 'file'} in {plan.dataset_dir}; "
                    f"{what} is skipped")
                continue
            hit = tokenize_split(raw, plan, tokenizer, cache=cache, _fingerprint=fingerprint)
        out[split] = hit
        log(hit.raw.summary())
        log(hit.summary())
    return PreparedData(**out)


# ----------------------------------------------------------------------------- cache

def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything about the tokenizer that changes the ids: vocab, merges, specials, chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None) or "", tokenizer.eos_token_id,
             special_prefix(tokenizer), getattr(tokenizer, "split_special_tokens", None)]
    digest.update(json.dumps(extra, default=str).encode())
    return digest.hexdigest()


def cache_key(plan, split: str, sha256: str, fingerprint: str) -> str:
    """Key of a tokenized split: changes whenever any input of reading or tokenizing changes."""
    parts = {
        "version": CACHE_VERSION, "split": split, "file": sha256, "tokenizer": fingerprint,
        "template": prompt_template(plan.expert), "system": system_prompt(plan.expert),
        "sequence_length": plan.sequence_length, "long_samples": plan.dataset.long_samples,
        "min_response": MIN_RESPONSE_TOKENS, "quality_threshold": plan.dataset.quality_threshold,
        "domains": sorted(d.casefold() for d in plan.dataset.domains), "on_bad_rows": plan.dataset.on_bad_rows,
    }
    return f"{split}-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


_ARRAYS = ("input_ids", "label_mask", "offsets", "lines")


def save_cached(key: str, split: TokenizedSplit) -> None:
    meta = {"version": CACHE_VERSION, "raw": _without_path(split.raw), "stats": split.stats.to_dict()}
    datacache.save_entry(key, {name: getattr(split, name) for name in _ARRAYS}, meta)


def _without_path(raw: SplitStats) -> dict:
    """`raw` for the cache: the key is the file's content, so the same entry serves every copy of the
    file, and a path stored here would name wherever it happened to be tokenized first."""
    out = raw.to_dict()
    prefix = raw.path + ":"
    out["path"] = ""
    out["bad_examples"] = [{"after_path": e[len(prefix):]} if e.startswith(prefix) else e for e in raw.bad_examples]
    return out


def _with_path(data: dict, path: str) -> SplitStats:
    """The inverse of `_without_path`, naming the file being loaded now."""
    data = dict(data, path=path)
    data["bad_examples"] = [f"{path}:{e['after_path']}" if isinstance(e, dict) else e for e in data["bad_examples"]]
    return SplitStats.from_dict(data)


def load_cached(key: str, split: str, path: str) -> TokenizedSplit | None:
    """The cached split for `key` as read from `path`, or None (absent, unreadable or inconsistent: rebuilt)."""
    entry = datacache.load_entry(key, _ARRAYS)
    if entry is None:
        return None
    arrays, meta = entry
    try:
        out = TokenizedSplit(split=split, raw=_with_path(meta["raw"], path), stats=TokenStats(**meta["stats"]),
                             cache_hit=True, **arrays)
        n = len(out.offsets) - 1
        ok = (meta["version"] == CACHE_VERSION and out.input_ids.dtype == np.int32
              and out.input_ids.shape == out.label_mask.shape and out.offsets[0] == 0
              and out.offsets[-1] == len(out.input_ids) and len(out.lines) == n == out.stats.examples)
    except (KeyError, TypeError, IndexError, ValueError):  # hand-edited or foreign meta.json
        ok = False
    if not ok:
        datacache.drop_entry(key)
        return None
    return out
