"""Names that become paths (preset, expert, role, name_template output) never escape their folder."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hafs.training.loader import load_config, load_config_text
from hafs.training.outputs import model_dir_name, run_id, safe_component
from hafs.training.plan import resolve
from hafs.training.schema import NAME_FIELDS

HOSTILE = ["..", ".", "../..", "/etc/passwd", "a/b", "a\\b", "..\\..\\win", "", " ", "-", "~", "~root",
           "C:\\x", "a/../../b", "\x00", "名前", "\u202e", "a" * 400, ".hidden", "-rf", "con", "x\ny"]
texts = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=300))


def assert_contained(name: str, root: Path) -> None:
    assert name not in ("", ".", "..")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith((".", "-")), name  # not hidden (staging names are), not an option
    assert len(name.encode()) <= 255
    assert (root / name).resolve().parent == root.resolve()


@pytest.fixture(scope="module")
def plan():
    return resolve(load_config("config/training.toml"), "demo")


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_safe_component_of_anything_is_one_harmless_component(text, tmp_path_factory):
    assert_contained(safe_component(text), Path("/srv/models"))


@st.composite
def templates(draw) -> str:
    parts = draw(st.lists(st.one_of(texts.map(lambda t: t.replace("{", "{{").replace("}", "}}")),
                                    st.sampled_from(NAME_FIELDS).map(lambda f: "{" + f + "}")), max_size=5))
    return "".join(parts)


@settings(max_examples=300, deadline=None)
@given(expert=texts, preset=texts, role=texts, base=texts, template=templates(), date_format=st.sampled_from(
    ["%Y%m%d", "%Y/%m/%d", "..", "%d\\%m"]))
def test_model_dir_and_run_names_stay_inside_their_folders(plan, expert, preset, role, base, template,
                                                          date_format):
    plan.expert_name, plan.preset, plan.expert.role = expert, preset, role
    plan.expert.base_model = base or "x"
    plan.output.name_template, plan.output.date_format = template, date_format
    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    assert_contained(model_dir_name(plan, now), Path(plan.output.models_dir))
    assert_contained(run_id(plan, now), Path(plan.output.checkpoints_dir))


def test_a_config_with_hostile_table_names_writes_inside_its_folders(tmp_path):
    text = (Path("config/training.toml").read_text()
            + '\n[experts."../../../etc"]\ndisplay_name = "x"\nbase_model = "/abs/model"\nrole = "../r"\n'
            + '\n[presets."../../escape"]\nexpert = "../../../etc"\nhardware = "cpu"\ndataset = "demo"\n'
              'lora = "minimal"\nhyperparameters = "demo"\n')
    cfg = load_config_text(text, filename=str(tmp_path / "training.toml"))
    plan = resolve(cfg, "../../escape")
    plan.output.name_template = "{expert}-{role}-{preset}"
    name, run = model_dir_name(plan), run_id(plan)
    assert_contained(name, Path(plan.output.models_dir))
    assert_contained(run, Path(plan.output.checkpoints_dir))
    assert name.startswith("etc-") and name.endswith("-escape") and run.startswith("escape-")
