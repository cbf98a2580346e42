"""Property: whatever the input, the config system answers with ConfigError or a valid plan, never a crash.

Random bytes, mutated copies of the shipped config (keys renamed, values replaced with odd TOML values,
garbage lines), pathological nesting and numbers, NUL bytes and invalid UTF-8 are fed to the loader;
every preset of whatever loads is resolved, with random overrides. Only HafsError may come out.
Set HAFS_FUZZ_EXAMPLES to run more examples than the quick default.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from hafs.training.errors import ConfigError, HafsError
from hafs.training.loader import key_lines, load_config, load_config_text
from hafs.training.overrides import OVERRIDABLE
from hafs.training.plan import resolve

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "training.toml"
TEXT = SHIPPED.read_text()
LINES = TEXT.split("\n")
KEY_LINES = [i for i, line in enumerate(LINES) if re.match(r"^[A-Za-z_-]+\s*=", line)]
SCALE = int(os.environ.get("HAFS_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=SCALE or 35, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])

toml_strings = st.one_of(
    st.sampled_from(['""', '"{output}"', '"{"', '"}{"', '"{output} tail"', '"{name}/{date}"', '"\\u0000"',
                     '"{context}{instruction}{input_section}{output}"', '"""\n[fake.table]\nkey = 1"""',
                     "'''{instruction}\n{output}'''"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20).map(
        lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
)
toml_values = st.one_of(
    toml_strings,
    st.integers(min_value=-(10**6), max_value=10**6).map(str),
    st.sampled_from(["1", "2", "8", "16", "64", "512", "2048", "4096", "0.5", "0.99", "1.0", "true", "false"]),
    st.sampled_from(["minimal", "standard", "full", "cpu", "mac-mps", "cloud-rtx-4090", "default", "quick-test",
                     "demo", "demo-asm", "oracle-sheik-debugger", "alttp_yaze_full", "nope"]).map('"{}"'.format),
    st.sampled_from(["0", "-1", "10" + "0" * 400, "-" + "9" * 30, "9" * 5000, "0x7fffffffffffffff", "1_000",
                     "nan", "inf", "-inf", "-0.0", "1e308", "1e-320", "3e-4", "true", "false", "2025-12-22",
                     "07:32:00", "1979-05-27T07:32:00Z", '""', '"{output}"', '"{"', '"}{"', '"{output} tail"',
                     '"{context}{instruction}{input_section}{output}"', '"{name}/{date}"', "[]", "[[]]", "{}",
                     "[1, 2]", '["q_proj", 3]', '{ a = 1 }', '"cosine"', '"auto"', '"bf16"', '"mps"', '"steps"',
                     '"unavailable"', '"""\n[fake.table]\nkey = 1"""', "'''{instruction}\n{output}'''",
                     "[" * 300 + "]" * 300, "[" * 10_000 + "]" * 10_000, "{a={b={c={}}}}", '"\\u0000"']),
    st.floats(allow_nan=False).map(repr).filter(lambda s: "e" in s or "." in s),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20).map(
        lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
)
garbage = st.one_of(
    st.sampled_from(["[", "]]", "[presets.x]", "[presets.x.y]", "[[presets]]", "[output]", '"""', "a.b.c = 1",
                     "presets = 1", "= 1", "x = ", "\x00", "[hardware.cpu]", "lora = { r = 1 }", "# ok",
                     "[experts.e]\ndisplay_name='e'\nbase_model='m'\nprompt_template='{output}{x}'",
                     "[presets.p]\nexpert='demo-asm'\nhardware='cpu'\ndataset='demo'\nlora='full'\nbatch_size=99",
                     "\ufeff", "\u2028", "\r", "\t\t", "x = [" + "[" * 10_000]),
    st.text(max_size=30),
)


@st.composite
def mutated_config(draw) -> str:
    """The shipped config with 1-4 random edits."""
    lines = list(LINES)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.sampled_from(KEY_LINES))
        op = draw(st.sampled_from(["value"] * 5 + ["rename", "insert", "delete", "duplicate"]))
        key = lines[i].split("=", 1)[0].strip() if "=" in lines[i] else "x"
        if op == "value":
            lines[i] = f"{key} = {draw(toml_values)}"
        elif op == "rename":
            pos = draw(st.integers(0, len(key)))
            lines[i] = key[:pos] + draw(st.sampled_from(["", "_", "x", "s"])) + key[pos + 1:] + " = 1"
        elif op == "insert":
            lines.insert(i, draw(garbage))
        elif op == "delete":
            lines[i] = ""
        else:
            lines.insert(i, lines[i])
    return "\n".join(lines)


TYPED_LINES = [i for i in KEY_LINES if re.match(r"^\w+\s*=\s*(-?\d|true|false|\")", LINES[i])]


@st.composite
def plausible_edit(draw) -> str:
    """One value of the shipped config replaced by another of the same TOML type: most still load."""
    lines = list(LINES)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.sampled_from(TYPED_LINES))
        key, value = (s.strip() for s in lines[i].split("#")[0].split("=", 1))
        if value in ("true", "false"):
            new = draw(st.sampled_from(["true", "false"]))
        elif value.startswith('"'):
            new = draw(st.one_of(toml_strings,
                                 st.sampled_from(["cosine", "fp16", "bf16", "fp32", "auto", "cuda", "mps", "epoch",
                                                  "all", "drop", "skip", "wandb", "broken"]).map('"{}"'.format)))
        elif re.fullmatch(r"-?\d+", value):
            new = str(draw(st.one_of(st.integers(-2, 5000), st.sampled_from([2**63, 2**63 - 1, 10**30]))))
        else:
            new = repr(draw(st.floats(-1, 2, allow_nan=False)))
        lines[i] = f"{key} = {new}"
    return "\n".join(lines)


@FUZZ
@given(text=plausible_edit(), sets=st.lists(st.sampled_from(
    ["batch_size=2", "batch_size=99", "lora.r=4", "lora.r=64", "sequence_length=4096", "precision=auto",
     "precision=fp16", "gradient_checkpointing=true", "hardware.supports_bf16=false", "learning_rate=0",
     "num_epochs=0.5", "max_steps=none", "report_to=wandb", "device=mps", "hardware.status=down"]), max_size=3))
def test_plausible_edits_resolve_to_plans_that_keep_the_rules_or_are_refused(text, sets):
    _exercise(text, sets)


overrides = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(OVERRIDABLE + ["lora.r", "hardware.max_batch_size",
                                                                       "output.metadata.include_git_commit",
                                                                       "dataset.path", "nope", "lora.nope", ""]),
              toml_values),
    st.text(max_size=20)), max_size=3)


def _exercise(text: str, sets: list[str]) -> None:
    """Load, then resolve every preset, with and without overrides; only HafsError may escape."""
    try:
        cfg = load_config_text(text, "fuzz.toml")
    except ConfigError as exc:
        assert exc.problems and all(p.file == "fuzz.toml" for p in exc.problems)
        exc.render()
        event("load refused")
        return
    for name in cfg.presets:
        for chosen in ([], sets):
            try:
                plan = resolve(cfg, name, chosen)
            except HafsError as exc:
                assert isinstance(exc, ConfigError) and exc.problems
                exc.render()
                event("resolve refused" + (" (overrides)" if chosen else ""))
            else:
                _assert_plan_keeps_the_rules(plan)
                event("resolved" + (" (overrides)" if chosen else ""))


def _assert_plan_keeps_the_rules(plan) -> None:
    """What a plan that resolved promises: the hardware rules hold and it survives a round trip."""
    hw = plan.hardware
    assert hw.status == "available"
    assert 0 < plan.batch_size <= hw.max_batch_size
    assert 0 < plan.sequence_length <= min(hw.max_sequence_length, plan.expert.context_window)
    assert 0 < plan.lora.r <= hw.max_lora_rank
    assert plan.precision in ("bf16", "fp16", "fp32") and (plan.precision != "bf16" or hw.supports_bf16)
    assert plan.precision != "fp16" or hw.supports_fp16
    assert not plan.gradient_checkpointing or hw.supports_gradient_checkpointing
    assert plan.learning_rate > 0 and 0 <= plan.lora.lora_dropout < 1
    assert plan.validate() is plan
    assert type(plan).from_dict(plan.to_dict()) == plan


def _parses(text: str) -> bool:
    try:
        tomllib.loads(text)
        return True
    except (ValueError, RecursionError):
        return False


@FUZZ
@given(text=mutated_config(), sets=overrides)
@example(text=TEXT + "\nx = " + "[" * 10_000 + "]" * 10_000, sets=[])
@example(text=TEXT.replace("max_batch_size = 8", "max_batch_size = " + "1" + "0" * 400, 1), sets=[])
@example(text=TEXT.replace("learning_rate = 2e-4", "learning_rate = 1" + "0" * 400, 1), sets=["seed=" + "9" * 400])
@example(text=TEXT.replace('role = "asm"', 'role = "a\x00sm"', 1), sets=[])
@example(text=TEXT, sets=["batch_size=99", "lora.r=1" + "0" * 30, "precision=auto", "max_steps=none"])
def test_mutated_shipped_config_only_ever_raises_config_error(text, sets):
    _exercise(text, sets)
    if _parses(text):  # the line scanner must follow anything tomllib accepts
        index = key_lines(text)
        lines = text.split("\n")
        for keypath, line in index.items():
            if not keypath[-1].startswith("["):
                assert 1 <= line <= len(lines)


@FUZZ
@given(st.text(max_size=200))
@example("a = " + "[" * 10_000 + "]" * 10_000)
@example("a = " + "{b = " * 2_000 + "1" + "}" * 2_000)
@example("[" + "a." * 5_000 + "b]")
def test_random_text_only_ever_raises_config_error(text):
    _exercise(text, [])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda pos, junk: TEXT.encode()[:pos] + junk + TEXT.encode()[pos:],
              st.integers(0, len(TEXT.encode())),
              st.sampled_from([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\r", b"\x1b"]))))
@example(data=b"\xef\xbb\xbf" + TEXT.encode())
@example(data=TEXT.encode().replace(b"\n", b"\r\n"))
def test_bytes_from_a_file_only_ever_raise_config_error(fuzz_dir, data):
    path = fuzz_dir / "training.toml"
    path.write_bytes(data)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert exc.problems and all(p.file == str(path) for p in exc.problems)
        return
    for name in cfg.presets:
        try:
            resolve(cfg, name)
        except ConfigError:
            pass


@FUZZ
@given(st.recursive(
    st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
              st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=20))
def test_key_lines_locates_every_key_of_generated_toml(value):
    """Generated documents written by a TOML writer: every key path the parser sees has a line with that key."""
    tomlkit = pytest.importorskip("tomlkit")
    doc = {"root": value} if not isinstance(value, dict) else value
    try:
        text = tomlkit.dumps(doc)
        parsed = tomllib.loads(text)
    except Exception:  # noqa: BLE001 - the writer's limits are not under test
        return
    index, lines = key_lines(text), text.split("\n")

    def walk(table, prefix=()):
        for key, item in table.items():
            yield prefix + (key,)
            if isinstance(item, dict):
                yield from walk(item, prefix + (key,))

    for keypath in walk(parsed):
        assert keypath in index, keypath
        assert 1 <= index[keypath] <= len(lines)


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=8), st.integers(0, 99).map("[{}]".format)), min_size=1, max_size=5)
       .filter(lambda parts: not parts[0].startswith("[")))
def test_dotted_key_paths_read_back_to_the_same_parts(parts):
    """Messages spell key paths the TOML way; line lookups split them back: both must agree."""
    from hafs.training.keypaths import dotted, split_dotted

    assert split_dotted(dotted(parts)) == parts
