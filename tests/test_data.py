"""Reading, filtering, rendering, tokenizing and caching dataset splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hafs.training import data as data_mod
from hafs.training import tokenize as tok_mod
from hafs.training.data import Sample, read_split, render
from hafs.training.errors import DatasetError
from hafs.training.loader import load_config_text
from hafs.training.plan import resolve
from hafs.training.templates import DEFAULT_PROMPT_TEMPLATE, fill_template
from hafs.training.tokenize import prepare_data, special_prefix, tokenize_split

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nWrite a routine that loads the player's health.\n### Response:\nLDA $7EF36D\nRTS",
    "LDA #$00 STA $2100 SEP #$20 REP #$30 JSL $008000 PHB PHK PLB",
    "The 65816 has a 16-bit accumulator when the m flag is clear. Link's sword is stored at $7EF359.",
    "user assistant system: You are a helpful assistant for ALTTP ROM hacking in YAZE.",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _train_tokenizer(vocab_size: int = 600, corpus=CORPUS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(corpus) * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tokenizer():
    return _train_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    tok = _train_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("HAFS_CACHE_DIR", str(tmp_path / "cache"))


def make_plan(tmp_path: Path, *, sequence_length: int = 256, template: str | None = None, **dataset):
    lines = [f"{k} = {json.dumps(v)}" for k, v in dataset.items()]
    tpl = f"prompt_template = {json.dumps(template)}" if template else ""
    text = f"""
[hardware.cpu]
name = "CPU"
device = "cpu"
max_batch_size = 8
max_sequence_length = 4096
supports_bf16 = true

[experts.e]
display_name = "E"
base_model = "local/tiny"
context_window = 4096
specialization = "65816 assembly"
{tpl}

[lora.l]
r = 4

[hyperparameters.default]

[datasets.d]
path = "data"
{chr(10).join(lines)}

[presets.p]
expert = "e"
hardware = "cpu"
dataset = "d"
lora = "l"
sequence_length = {sequence_length}
"""
    (tmp_path / "data").mkdir(exist_ok=True)
    cfg = load_config_text(text, str(tmp_path / "training.toml"))
    return resolve(cfg, "p")


def write_rows(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else (json.dumps(row) + "\n").encode())
    return path


def alpaca(i: int, **extra) -> dict:
    return {"instruction": f"Explain opcode {i}", "input": "", "output": f"LDA #${i:02X}\nRTS",
            "text": "exporter copy, ignored", **extra}


# ----------------------------------------------------------------------------- formats and filters

def test_formats_metadata_nesting_and_filters_exact_counts(tmp_path):
    plan = make_plan(tmp_path, quality_threshold=0.5, domains=["asm", "yaze"])
    rows = []
    rows += [alpaca(i, _metadata={"domain": "asm", "quality_score": 0.9, "sample_id": i}) for i in range(10)]
    rows += [alpaca(i, quality_score=0.2, domain="asm") for i in range(4)]                   # top level: low
    rows += [alpaca(i, _metadata={"domain": "asm", "quality_score": 0.3}) for i in range(3)]  # nested: low
    rows += [alpaca(i, _metadata={"domain": "cooking", "quality_score": 0.9}) for i in range(5)]
    rows += [alpaca(i, domain="Yaze") for i in range(2)]                         # no score, domain case differs
    rows += [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "NOP"}],
              "text": "flattened", "_metadata": {"domain": "yaze"}} for _ in range(6)]
    rows += [{"text": "LDA $00"} for _ in range(7)]                               # no domain, no score: kept
    write_rows(tmp_path / "data" / "train.jsonl", rows)

    raw = read_split(plan, "train")
    s = raw.stats
    assert (s.read, s.kept, s.dropped_quality, s.dropped_domain, s.bad_skipped) == (37, 25, 7, 5, 0)
    assert s.by_format == {"alpaca": 12, "chat": 6, "text": 7}
    assert s.summary() == "train: 37 rows read, 25 kept (7 below quality 0.5, 5 outside domains)"
    assert [r.format for r in raw.rows[:12]] == ["alpaca"] * 12  # structured fields win over `text`
    assert raw.rows[0].quality == 0.9 and raw.rows[0].domain == "asm" and raw.rows[0].line == 1
    assert len(s.sha256) == 64
    assert read_split(plan, "val") is None and read_split(plan, "test") is None


def test_no_filters_keeps_everything(tmp_path):
    plan = make_plan(tmp_path)
    write_rows(tmp_path / "data" / "train.jsonl",
               [alpaca(1, quality_score=0.0, domain="x"), alpaca(2), b"\n", b"   \n", alpaca(3)])
    s = read_split(plan, "train").stats
    assert (s.read, s.kept) == (3, 3)  # blank lines are not rows
    assert s.summary() == "train: 3 rows read, 3 kept"


def test_missing_train_file_names_path_and_key(tmp_path):
    plan = make_plan(tmp_path)
    with pytest.raises(DatasetError) as err:
        read_split(plan, "train")
    text = str(err.value)
    assert str(tmp_path / "data" / "train.jsonl") in text and "datasets.d.path" in text
    assert "train split not found" in text
    (tmp_path / "data").rmdir()
    (tmp_path / "data").write_text("")  # the dataset path is a file, not the folder of its splits
    with pytest.raises(DatasetError) as err:
        read_split(plan, "train")
    assert "which is a file: it must be the folder holding train.jsonl" in str(err.value)


# ----------------------------------------------------------------------------- bad rows

BAD_ROWS = [
    b"{not json\n",                                                                     # 2
    b"[1, 2]\n",                                                                        # 3
    json.dumps({"instruction": "x"}).encode() + b"\n",                                  # 4 missing output
    json.dumps({"instruction": "x", "output": 5}).encode() + b"\n",                     # 5 wrong type
    json.dumps({"instruction": "x", "output": "  "}).encode() + b"\n",                  # 6 empty output
    b'{"text": "a\x00b"}\n',                                                            # 7 NUL byte
    b'{"text": "caf\xe9"}\n',                                                           # 8 invalid UTF-8
    json.dumps({"text": "x" * 300}).encode() + b"\n",                                   # 9 too long (patched)
    json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode() + b"\n",      # 10 no answer
    json.dumps({"text": "ok", "_metadata": {"quality_score": "high"}}).encode() + b"\n",  # 11 bad score type
    json.dumps({"text": "bad \\u0000 escape"}).encode().replace(b"\\\\u", b"\\u") + b"\n",  # 12 NUL escape
]


def test_bad_rows_reported_as_file_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "MAX_LINE_BYTES", 200)
    plan = make_plan(tmp_path)
    path = write_rows(tmp_path / "data" / "train.jsonl", [alpaca(0)] + BAD_ROWS + [alpaca(1)])
    with pytest.raises(DatasetError) as err:
        read_split(plan, "train")
    text = str(err.value)
    for line in (2, 3, 4, 5, 6):
        assert f"{path}:{line}:" in text
    assert f"{path}:7:" not in text  # only the first five are listed
    assert "invalid JSON" in text and "must be a JSON object" in text and "missing 'output'" in text
    assert "11 bad rows in total (6 not shown)" in text and 'on_bad_rows = "skip"' in text


def test_each_bad_row_kind_is_detected(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "MAX_LINE_BYTES", 200)
    plan = make_plan(tmp_path, on_bad_rows="skip")
    write_rows(tmp_path / "data" / "train.jsonl", [alpaca(0)] + BAD_ROWS + [alpaca(1)])
    raw = read_split(plan, "train")
    assert (raw.stats.read, raw.stats.kept, raw.stats.bad_skipped) == (13, 2, 11)
    assert [r.line for r in raw.rows] == [1, 13]
    assert raw.stats.summary() == "train: 13 rows read, 2 kept (11 bad rows skipped)"
    assert len(raw.stats.bad_examples) == 5 and raw.stats.bad_examples[0].endswith(":2: invalid JSON: "
                                                                                   "Expecting property name "
                                                                                   "enclosed in double quotes "
                                                                                   "(column 2)")
    # every kind of bad row on its own is reported with its line and a reason
    reasons = {}
    for n, row in enumerate(BAD_ROWS, 2):
        reasons[n] = data_mod._parse_row(row if len(row) <= 200 else None, n)
        assert isinstance(reasons[n], str), (n, row)
    assert "NUL byte" in reasons[7] and "UTF-8" in reasons[8] and "longer than" in reasons[9]
    assert "last message" in reasons[10] and "quality_score" in reasons[11] and "NUL" in reasons[12]


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"),
                                            ("utf-32", "UTF-32"), ("utf-32-be", "UTF-32")])
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_utf16_or_utf32_file_is_one_error_saying_so(tmp_path, encoding, name, policy):
    # Windows PowerShell 5's `>` writes UTF-16 (with a BOM; the -le/-be cases have none). Every row used to be
    # "contains a NUL byte", with the hint to set on_bad_rows = "skip" -- which would throw the whole split away.
    plan = make_plan(tmp_path, on_bad_rows=policy)
    path = tmp_path / "data" / "train.jsonl"
    path.write_bytes("".join(json.dumps(alpaca(i)) + "\r\n" for i in range(40)).encode(encoding))
    with pytest.raises(DatasetError) as err:
        read_split(plan, "train")
    (problem,) = err.value.problems
    assert (problem.file, problem.line) == (str(path), 1)
    assert problem.message.startswith(f"the file is {name} text, not UTF-8") and "save it as UTF-8" in problem.hint
    assert "NUL" not in str(err.value) and "on_bad_rows" not in str(err.value)


def test_a_utf8_bom_is_accepted_and_other_first_bytes_are_not_taken_for_utf16(tmp_path):
    plan = make_plan(tmp_path)
    path = tmp_path / "data" / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(alpaca(i)) + "\n" for i in range(3)).encode())
    raw = read_split(plan, "train")
    assert (raw.stats.read, raw.stats.kept) == (3, 3) and raw.rows[0].instruction == "Explain opcode 0"
    for head in (b"{}", b'{"a', "\u00e9t\u00e9".encode(), b"\xef\xbb\xbf{\x00", b"{\x00\x00x"):
        assert data_mod.wide_encoding(head) == "", head


# ----------------------------------------------------------------------------- empty after filtering

def test_empty_after_quality_filter_names_the_filter(tmp_path):
    plan = make_plan(tmp_path, quality_threshold=0.9)
    write_rows(tmp_path / "data" / "train.jsonl", [alpaca(i, _metadata={"quality_score": 0.5}) for i in range(40)])
    with pytest.raises(DatasetError) as err:
        read_split(plan, "train")
    assert "all 40 rows have quality_score < 0.9" in str(err.value)
    assert "datasets.d.quality_threshold" in str(err.value)


def test_empty_after_domain_filter_lists_domains_found(tmp_path):
    plan = make_plan(tmp_path, domains=["asm"])
    write_rows(tmp_path / "data" / "train.jsonl", [alpaca(i, domain="cpp") for i in range(3)])
    with pytest.raises(DatasetError) as err:
        read_split(plan, "train")
    text = str(err.value)
    assert "all 3 rows have a domain outside ['asm']" in text and "datasets.d.domains" in text
    assert "cpp (3)" in text


def test_empty_after_both_filters(tmp_path):
    plan = make_plan(tmp_path, domains=["asm"], quality_threshold=0.5)
    write_rows(tmp_path / "data" / "val.jsonl", [alpaca(1, domain="cpp"), alpaca(2, quality_score=0.1)])
    write_rows(tmp_path / "data" / "train.jsonl", [alpaca(0)])
    with pytest.raises(DatasetError) as err:
        read_split(plan, "val")
    assert "no rows left: 1 below quality_threshold 0.5" in str(err.value)
    assert "1 outside domains (datasets.d.domains)" in str(err.value)


# ----------------------------------------------------------------------------- rendering

class _Expert:
    prompt_template = ""
    system_prompt = ""
    specialization = "65816 assembly"


def test_default_alpaca_template_exact():
    with_input = fill_template(DEFAULT_PROMPT_TEMPLATE, "Do X", "some code")
    assert with_input == ("Below is an instruction that describes a task, paired with an input that provides "
                          "further context. Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\nDo X\n\n### Input:\nsome code\n\n### Response:\n")
    without = fill_template(DEFAULT_PROMPT_TEMPLATE, "Do X", "  ")
    assert without == ("Below is an instruction that describes a task. Write a response that appropriately "
                       "completes the request.\n\n### Instruction:\nDo X\n\n### Response:\n")


def test_render_each_format(tokenizer, chat_tokenizer):
    expert = _Expert()
    expert.prompt_template = "Task{context} {{literal}}\n{instruction}\n{input_section}>>> {output}"
    a = Sample(format="alpaca", line=1, instruction="I", input="In", output="Out")
    assert render(a, expert, tokenizer) == (
        "Task, paired with an input that provides further context {literal}\nI\n\n### Input:\nIn\n>>> ", "Out")
    assert render(Sample(format="text", line=1, text="T"), expert, tokenizer) == ("", "T")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"}]
    chat = Sample(format="chat", line=1, messages=msgs)
    # without a chat template: last user turn is the instruction, earlier turns the input
    assert render(chat, expert, tokenizer) == (
        "Task, paired with an input that provides further context {literal}\nU2\n\n### Input:\n"
        "System: S\n\nUser: U1\n\nAssistant: A1\n>>> ", "A2")
    # with one: the tokenizer's template; the expert's system prompt only when the row has none
    prompt, response = render(chat, expert, chat_tokenizer)
    assert response == "A2" and prompt == chat_tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True,
                                                                            tokenize=False)
    bare = Sample(format="chat", line=1, messages=msgs[1:3])
    prompt, _ = render(bare, expert, chat_tokenizer)
    assert prompt == ("<|im_start|>system\n65816 assembly<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
                      "<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- tokenizing and masking

def test_loss_mask_covers_exactly_the_response_and_eos(tmp_path, chat_tokenizer):
    plan = make_plan(tmp_path)
    rows = [alpaca(1), {"instruction": "Add", "input": "LDA $00", "output": "CLC\nADC #$01"},
            {"messages": [{"role": "user", "content": "Why SEP?"}, {"role": "assistant", "content": "8-bit A"}]},
            {"text": "PHB PHK PLB"}]
    write_rows(tmp_path / "data" / "train.jsonl", rows)
    raw = read_split(plan, "train")
    out = tokenize_split(raw, plan, chat_tokenizer, cache=False)
    tok, eos = chat_tokenizer, chat_tokenizer.eos_token_id
    assert special_prefix(tok) == []
    assert len(out) == 4 and out.lines.tolist() == [1, 2, 3, 4]
    for i, sample in enumerate(raw.rows):
        prompt, response = render(sample, plan.expert, tok)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [eos]
        ids, mask = out.example(i)
        assert ids.tolist() == p + r
        expected = [False] * len(p) + [True] * len(r)
        expected[0] = False  # the first token is never a target (prompt-less text rows included)
        assert mask.tolist() == expected
        assert ids.dtype == np.int32 and ids[-1] == eos and mask[-1]
    assert out.stats.response_tokens == int(out.label_mask.sum())
    assert out.stats.tokens == len(out.input_ids) == out.offsets[-1]


def test_long_samples_truncate_and_drop(tmp_path, tokenizer):
    long_out = " ".join(["LDA $7EF36D"] * 60)
    rows = [alpaca(1), alpaca(2, output=long_out),                     # fits / response too long
            {"instruction": " ".join(["SEP #$20"] * 80), "output": "RTS"},   # prompt alone too long
            {"text": long_out}]
    for policy in ("truncate", "drop"):
        sub = tmp_path / policy
        sub.mkdir()
        plan = make_plan(sub, sequence_length=64, long_samples=policy)
        write_rows(sub / "data" / "train.jsonl", rows)
        out = tokenize_split(read_split(plan, "train"), plan, tokenizer, cache=False)
        eos = tokenizer.eos_token_id
        assert out.lengths.max() <= 64
        if policy == "truncate":
            assert (out.stats.truncated, out.stats.dropped_too_long, len(out)) == (2, 1, 3)
            assert out.lines.tolist() == [1, 2, 4]
            ids, mask = out.example(1)
            assert len(ids) == 64 and ids[-1] != eos and mask[-1]  # cut mid-text: no EOS taught there
            assert "2 truncated to 64 tokens; 1 dropped as longer than 64 tokens" in out.summary()
        else:
            assert (out.stats.truncated, out.stats.dropped_too_long, len(out)) == (0, 3, 1)


def test_all_too_long_is_an_error(tmp_path, tokenizer):
    plan = make_plan(tmp_path, sequence_length=16, long_samples="drop")
    write_rows(tmp_path / "data" / "train.jsonl", [alpaca(i) for i in range(3)])
    with pytest.raises(DatasetError) as err:
        tokenize_split(read_split(plan, "train"), plan, tokenizer, cache=False)
    assert "all 3 samples are longer than sequence_length 16" in str(err.value)
    assert "datasets.d.long_samples" in str(err.value)


def test_prompts_that_leave_no_room_for_a_response_are_reported_as_such(tmp_path, tokenizer):
    # With long_samples = "truncate" the message used to be "all 3 samples are longer than sequence_length 48",
    # hiding that the prompts alone leave fewer than 16 response tokens, and by how much.
    rows = [{"instruction": " ".join(["SEP #$20"] * n), "output": "LDA #$00\nRTS"} for n in (12, 20, 30)]
    prompts = [len(special_prefix(tokenizer)) + len(tokenizer(fill_template(DEFAULT_PROMPT_TEMPLATE,
                                                                             r["instruction"], ""))["input_ids"])
               for r in rows]
    low, mid, high = sorted(prompts)
    assert 32 < low < high  # each leaves fewer than 16 of 48 tokens for the response
    plan = make_plan(tmp_path, sequence_length=48)
    write_rows(tmp_path / "data" / "train.jsonl", rows)
    with pytest.raises(DatasetError) as err:
        tokenize_split(read_split(plan, "train"), plan, tokenizer, cache=False)
    (problem,) = err.value.problems
    assert problem.key == "presets.p.sequence_length" and problem.file == str(tmp_path / "training.toml")
    assert problem.message == (f"all 3 samples of the train split were dropped: their prompts (all but the response) "
                               f"are {low} to {high} tokens (median {mid}), leaving fewer than 16 tokens for the "
                               f"response within sequence_length 48")
    assert problem.hint.startswith(f"raise sequence_length to at least {low + 16} ({high + 16} keeps every sample)")
    # The figures the hint gives are the ones that work; a partial drop says why in the summary line.
    for limit, kept in ((low + 16, 1), (high + 16, 3)):
        plan = make_plan(tmp_path, sequence_length=limit)
        out = tokenize_split(read_split(plan, "train"), plan, tokenizer, cache=False)
        assert len(out) == kept
        if kept == 1:
            assert (f"2 dropped as longer than {limit} tokens (their prompt leaves fewer than 16 tokens for the "
                    f"response)") in out.summary()


def test_all_too_long_with_drop_names_the_shortest_sample(tmp_path, tokenizer):
    plan = make_plan(tmp_path, sequence_length=16, long_samples="drop")
    write_rows(tmp_path / "data" / "train.jsonl", [alpaca(i) for i in range(3)])
    raw = read_split(plan, "train")
    with pytest.raises(DatasetError) as err:
        tokenize_split(raw, plan, tokenizer, cache=False)
    shortest = min(tokenize_split(raw, make_plan(tmp_path, sequence_length=256), tokenizer, cache=False).lengths)
    (problem,) = err.value.problems
    assert problem.message.endswith(f"the shortest train sample is {shortest} tokens")
    assert problem.hint.startswith(f"raise sequence_length to at least {shortest},")


def test_chat_rows_the_template_rejects_are_bad_rows(tmp_path):
    tok = _train_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ raise_exception('no booms') }}"
                         "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: ")
    chat = lambda text: {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}
    rows = [chat("fine"), chat("BOOM"), alpaca(1), chat("BOOM again")]
    plan = make_plan(tmp_path)
    write_rows(tmp_path / "data" / "train.jsonl", rows)
    with pytest.raises(DatasetError) as err:
        tokenize_split(read_split(plan, "train"), plan, tok, cache=False)
    text = str(err.value)
    assert "train.jsonl:2: the chat template failed: no booms" in text and "train.jsonl:4:" in text
    assert "2 rows in total" in text

    sub = tmp_path / "skip"
    sub.mkdir()
    plan = make_plan(sub, on_bad_rows="skip")
    write_rows(sub / "data" / "train.jsonl", rows)
    out = tokenize_split(read_split(plan, "train"), plan, tok, cache=False)
    assert len(out) == 2 and out.lines.tolist() == [1, 3]
    assert out.raw.summary() == "train: 4 rows read, 2 kept (2 bad rows skipped)"
    assert out.raw.by_format == {"chat": 1, "alpaca": 1}


def test_bos_prefix_for_templates_but_not_for_chat_templates(tmp_path):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = _train_tokenizer()
    backend = base.backend_tokenizer
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>")
    assert special_prefix(tok) == [bos]
    plan = make_plan(tmp_path)
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    write_rows(tmp_path / "data" / "train.jsonl", [alpaca(1), {"text": "LDA"}, chat])
    raw = read_split(plan, "train")
    plain = tokenize_split(raw, plan, tok, cache=False)
    assert [plain.example(i)[0][0] for i in range(3)] == [bos] * 3  # chat mapped onto the template: BOS too
    tok.chat_template = "<s>" + CHAT_TEMPLATE
    templated = tokenize_split(raw, plan, tok, cache=False)
    ids, _ = templated.example(2)
    assert ids[0] == bos and ids[1] != bos  # the template's own <s>, not a second one


# ----------------------------------------------------------------------------- prepare_data and the cache

def test_prepare_data_logs_and_reuses_cache(tmp_path, tokenizer):
    plan = make_plan(tmp_path, quality_threshold=0.5)
    write_rows(tmp_path / "data" / "train.jsonl",
               [alpaca(i, quality_score=0.9 if i % 3 else 0.1) for i in range(30)])
    write_rows(tmp_path / "data" / "val.jsonl", [alpaca(i) for i in range(5)])
    logs: list[str] = []
    first = prepare_data(plan, tokenizer, log=logs.append)
    assert first.test is None and len(first.train) == 20 and len(first.val) == 5
    assert "train: 30 rows read, 20 kept (10 below quality 0.5)" in logs
    assert any(line.startswith("test: no test.jsonl in") and "skipped" in line for line in logs)
    assert not first.train.cache_hit
    cached = sorted(p.name for p in (tmp_path / "cache" / "data").iterdir())
    assert len(cached) == 2 and not any(n.startswith(".tmp") for n in cached)
    for folder in (tmp_path / "cache" / "data").iterdir():  # no pickles: every array loads without them
        for f in folder.glob("*.npy"):
            np.load(f, allow_pickle=False)

    logs2: list[str] = []
    second = prepare_data(plan, tokenizer, log=logs2.append)
    assert second.train.cache_hit and second.val.cache_hit
    np.testing.assert_array_equal(second.train.input_ids, first.train.input_ids)
    np.testing.assert_array_equal(second.train.label_mask, first.train.label_mask)
    assert second.train.raw.summary() == first.train.raw.summary() and logs2[0] == logs[0]
    assert second.train.stats == first.train.stats

    plan.expert.prompt_template = "Q: {instruction}{context}{input_section}\nA: {output}"
    third = prepare_data(plan, tokenizer, log=lambda *_: None)
    assert not third.train.cache_hit and len(third.train.input_ids) != len(first.train.input_ids)

    write_rows(tmp_path / "data" / "train.jsonl", [alpaca(i) for i in range(31)])
    fourth = prepare_data(plan, tokenizer, log=lambda *_: None)
    assert not fourth.train.cache_hit and len(fourth.train) == 31 and fourth.val.cache_hit


def test_corrupt_cache_entry_is_rebuilt(tmp_path, tokenizer):
    plan = make_plan(tmp_path)
    write_rows(tmp_path / "data" / "train.jsonl", [alpaca(i) for i in range(4)])
    first = prepare_data(plan, tokenizer, log=lambda *_: None)
    (folder,) = (tmp_path / "cache" / "data").iterdir()
    (folder / "offsets.npy").write_bytes(b"garbage")
    again = prepare_data(plan, tokenizer, log=lambda *_: None)
    assert not again.train.cache_hit
    np.testing.assert_array_equal(again.train.input_ids, first.train.input_ids)
    assert prepare_data(plan, tokenizer, log=lambda *_: None).train.cache_hit


def test_cache_hit_for_a_copied_dataset_names_the_copy_not_the_original(tmp_path):
    """The cache is keyed by content, so a copy of a dataset hits the entry the original wrote; every
    path in the stats and in the bad-row reports must still name the files actually read."""
    tok = _train_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ raise_exception('no booms') }}"
                         "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: ")
    boom = {"messages": [{"role": "user", "content": "BOOM"}, {"role": "assistant", "content": "ok"}]}
    rows = [alpaca(0), b"{not json\n", alpaca(1), boom, alpaca(2)]  # line 2: read-time, line 4: render-time
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    plan_a, plan_b = make_plan(a, on_bad_rows="skip"), make_plan(b, on_bad_rows="skip")
    write_rows(a / "data" / "train.jsonl", rows)
    write_rows(a / "data" / "val.jsonl", [alpaca(3), b"[]\n"])
    first = prepare_data(plan_a, tok, log=lambda *_: None)
    assert not first.train.cache_hit and first.train.raw.bad_skipped == 2
    for name in ("train.jsonl", "val.jsonl"):
        (b / "data" / name).write_bytes((a / "data" / name).read_bytes())

    logs: list[str] = []
    via_prepare = prepare_data(plan_b, tok, log=logs.append)
    via_tokenize = tokenize_split(read_split(plan_b, "train"), plan_b, tok)  # the --dry-run path
    assert via_prepare.train.cache_hit and via_prepare.val.cache_hit and via_tokenize.cache_hit
    train_b, val_b = str(b / "data" / "train.jsonl"), str(b / "data" / "val.jsonl")
    for stats in (via_prepare.stats(), {"train": {"rows": via_tokenize.raw.to_dict()}}):
        assert str(a) not in json.dumps(stats)
        assert stats["train"]["rows"]["path"] == train_b
        bad = stats["train"]["rows"]["bad_examples"]
        assert [e.split(": ")[0] for e in bad] == [f"{train_b}:2", f"{train_b}:4"]
        assert bad[1].endswith("the chat template failed: no booms")
    assert via_prepare.val.raw.path == val_b and via_prepare.val.raw.bad_examples[0].startswith(f"{val_b}:2: ")
    assert str(a) not in "\n".join(logs)
    # and the entry keeps serving the original too
    again = prepare_data(plan_a, tok, log=lambda *_: None)
    assert again.train.cache_hit and again.train.raw.to_dict() == first.train.raw.to_dict()


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_cache_dir_that_is_a_file_warns_once_and_runs_without_the_cache(tmp_path, monkeypatch, capsys, tokenizer,
                                                                      where):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    monkeypatch.setenv("HAFS_CACHE_DIR", str(afile if where == "a file" else afile / "sub"))
    plan = make_plan(tmp_path)
    write_rows(tmp_path / "data" / "train.jsonl", [alpaca(i) for i in range(4)])
    first = prepare_data(plan, tokenizer, log=lambda *_: None)
    second = prepare_data(plan, tokenizer, log=lambda *_: None)
    assert len(first.train) == len(second.train) == 4 and not second.train.cache_hit
    np.testing.assert_array_equal(first.train.input_ids, second.train.input_ids)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: HAFS_CACHE_DIR=")  # once, one line, no traceback
    folder = (afile if where == "a file" else afile / "sub") / "data"
    assert f": {afile} (a parent of {folder}) is a file, not a folder; " in err[0] and "not cached" in err[0]
    assert afile.read_text() == "not a folder"


def test_unwritable_cache_dir_warns_and_runs_without_the_cache(tmp_path, monkeypatch, capsys, tokenizer):
    from hafs.training import datacache

    # root ignores permission bits, so stand in for a read-only folder at the permission check itself
    real_access = datacache.os.access
    monkeypatch.setattr(datacache.os, "access",
                        lambda p, mode: False if str(p).startswith(str(tmp_path / "cache")) else real_access(p, mode))
    plan = make_plan(tmp_path)
    write_rows(tmp_path / "data" / "train.jsonl", [alpaca(i) for i in range(4)])
    assert len(prepare_data(plan, tokenizer, log=lambda *_: None).train) == 4
    assert not prepare_data(plan, tokenizer, log=lambda *_: None).train.cache_hit
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HAFS_CACHE_DIR=" in err[0]
    assert f": {tmp_path / 'cache' / 'data'} is not readable and writable by this user; " in err[0]
    assert not any((tmp_path / "cache" / "data").iterdir())


def test_required_cache_folder_that_cannot_be_made_is_a_clear_error(tmp_path, monkeypatch):
    from hafs.training import datacache
    from hafs.training.errors import HafsError

    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("HAFS_CACHE_DIR", str(afile))
    with pytest.raises(HafsError) as err:
        datacache.require_dir("demo")
    text = err.value.render()
    assert "HAFS_CACHE_DIR" in text and "hint:" in text
    assert f"{afile} (a parent of {afile / 'demo'}) is a file, not a folder" in text
    monkeypatch.setenv("HAFS_CACHE_DIR", str(tmp_path / "ok"))
    assert datacache.require_dir("demo").is_dir()


# ----------------------------------------------------------------------------- scale

def _synthetic_rows(n: int, seed: int = 0):
    """bench/bench_data.py's rows (~120 tokens median, long tail, _metadata): the benchmark times the data
    step on the very rows this file checks it on."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_data.py"
    spec = importlib.util.spec_from_file_location("bench_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_rows(n, seed)


@pytest.fixture(scope="session")
def qwen2_style_tokenizer(tmp_path_factory):
    """The demo's Qwen2-style byte-level BPE (Qwen2 split regex), loaded the way training loads it."""
    from transformers import AutoTokenizer

    from hafs.training.demo import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"), vocab_size=1024)
    return AutoTokenizer.from_pretrained(folder)


def test_direct_backend_encoding_matches_the_tokenizer_call(qwen2_style_tokenizer):
    tok = qwen2_style_tokenizer
    texts = ["  LDA $7EF36D\n\tRTS ", "Ünïcödé wörds 123", "<|endoftext|> inside", "", "a\r\nb"]
    assert tok_mod._encoder(tok)(texts) == tok(texts, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_scale_100k_rows(tmp_path, qwen2_style_tokenizer):
    """Issue 4's data step at its scale: 100k rows read, filtered, templated and tokenized exactly, and an
    unchanged re-run served from the cache with the same arrays.

    Speed is not asserted here: bench/bench_data.py times this step on these rows and this tokenizer (the
    target: <= 30 s cold, <= 3 s cached, on 2 cores) beside the `datasets` pipeline TRL users write."""
    import heapq

    tok, n, limit = qwen2_style_tokenizer, 100_000, 1024
    plan = make_plan(tmp_path, sequence_length=limit, quality_threshold=0.1, domains=["asm"])
    # What the filters must keep, worked out from the rows as they are written (quality first, then domain,
    # as read_split applies them); 1,000 kept rows at random and the 50 longest to re-encode by hand below.
    sampled = set(np.random.default_rng(1).choice(n, size=1000, replace=False).tolist())
    low_quality = off_domain = 0
    kept_lines: list[int] = []
    checked: dict[int, dict] = {}
    longest: list[tuple[int, int, dict]] = []
    with open(tmp_path / "data" / "train.jsonl", "w") as f:
        for i, row in enumerate(_synthetic_rows(n)):
            f.write(json.dumps(row) + "\n")
            if row["_metadata"]["quality_score"] < 0.1:
                low_quality += 1
            elif row["_metadata"]["domain"] != "asm":
                off_domain += 1
            else:
                kept_lines.append(i + 1)
                if i in sampled:
                    checked[i + 1] = row
                item = (len(row["output"]), i + 1, row)
                if len(longest) < 50:
                    heapq.heappush(longest, item)
                else:
                    heapq.heappushpop(longest, item)
    checked.update((line, row) for _, line, row in longest)

    first = prepare_data(plan, tok, log=lambda *_: None)
    second = prepare_data(plan, tok, log=lambda *_: None)
    train, raw, st = first.train, first.train.raw, first.train.stats
    assert not train.cache_hit and second.train.cache_hit
    assert (raw.read, raw.dropped_quality, raw.dropped_domain, raw.kept, raw.bad_skipped) == (
        n, low_quality, off_domain, len(kept_lines), 0)
    assert low_quality and off_domain and st.dropped_too_long == 0 and st.examples == len(train) == len(kept_lines)
    np.testing.assert_array_equal(train.lines, kept_lines)  # which rows were kept, in file order
    for name in ("input_ids", "label_mask", "offsets", "lines"):
        np.testing.assert_array_equal(getattr(second.train, name), getattr(train, name))
    assert second.train.stats == st and second.train.raw.to_dict() == raw.to_dict()

    # Every example ends with EOS unless its response was cut to fit, and a cut one fills the limit exactly.
    eos, lengths = tok.eos_token_id, train.lengths
    cut = train.input_ids[train.offsets[1:] - 1] != eos
    assert st.truncated == int(cut.sum()) >= 1 and (lengths[cut] == limit).all()
    assert st.tokens == len(train.input_ids) == train.offsets[-1] and st.response_tokens == int(train.label_mask.sum())
    # The lengths the target is about: ~120 tokens median and a long tail, up to the limit.
    assert [st.p50, st.p90, st.p99] == np.percentile(lengths, [50, 90, 99], method="nearest").tolist()
    assert st.max == lengths.max() == limit and 80 <= st.p50 <= 200 and st.p90 >= 1.5 * st.p50

    # Sampled and longest rows re-encoded by hand: prompt + response + EOS, cut to the limit; loss on the response.
    prefix, index = special_prefix(tok), {line: k for k, line in enumerate(train.lines.tolist())}
    cut_checked = 0
    for line, row in checked.items():
        prompt = prefix + tok(fill_template(DEFAULT_PROMPT_TEMPLATE, row["instruction"], row["input"]),
                              add_special_tokens=False)["input_ids"]
        response = tok(row["output"], add_special_tokens=False)["input_ids"] + [eos]
        ids, mask = train.example(index[line])
        assert ids.tolist() == (prompt + response)[:limit], line
        assert mask.tolist() == ([False] * len(prompt) + [True] * len(response))[:limit], line
        cut_checked += len(prompt) + len(response) > limit
    assert cut_checked >= 1  # the truncation path was among the examples checked
