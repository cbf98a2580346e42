"""Config system: shipped and user configs, hardware rules, defaults, overrides, the programmatic plan."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest

from hafs.training import schema
from hafs.training.errors import ConfigError
from hafs.training.loader import key_lines, load_config, load_config_text
from hafs.training.overrides import apply_overrides, parse_override
from hafs.training.plan import TrainingConfig, hardware_problems, resolve

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "training.toml"
SEED = ROOT.parent / "shared" / "seed" / "original-training.toml"
SEED_PRESETS = ["oracle-rauru-mac", "oracle-rauru-windows", "oracle-rauru-cloud", "oracle-farore-windows",
                "oracle-sheik-mac"]
# The seed spec's "Create Custom Preset" example, verbatim.
MY_CUSTOM = '''
[presets.my-custom-training]
expert = "oracle-sheik-debugger"
hardware = "mac-mps"
dataset = "alttp_yaze_full"
hyperparameters = "production"  # 3 epochs instead of 1
lora = "standard"  # Try higher rank if it fits
sequence_length = 1024
batch_size = 1
gradient_accumulation = 4  # Larger effective batch
'''

BASE = '''
[hardware.box]
name = "Test box"
device = "cpu"
max_batch_size = 4
max_sequence_length = 1024
supports_bf16 = true
supports_fp16 = true
supports_gradient_checkpointing = true
max_lora_rank = 16
recommended_gradient_accumulation = 3

[experts.coder]
display_name = "Coder"
base_model = "tiny/model"
context_window = 2048

[lora.small]
r = 8

[lora.big]
r = 32

[hyperparameters.default]
learning_rate = 2e-4
warmup_steps = 5

[hyperparameters.quick-test]
num_epochs = 1
learning_rate = 3e-4
max_steps = 100
logging_steps = 5
save_steps = 25

[datasets.data]
path = "data"

[presets.run]
expert = "coder"
hardware = "box"
dataset = "data"
lora = "small"
batch_size = 2
'''


def base(*edits: tuple[str, str], append: str = "") -> str:
    text = BASE
    for old, new in edits:
        assert old in text
        text = text.replace(old, new, 1)
    return text + append


def line_of(text: str, needle: str, after: str = "") -> int:
    """1-based line of the first `needle` after the line containing `after`."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if after in line) if after else 0
    return next(i for i, line in enumerate(lines) if i >= start and needle in line) + 1


def problem(error: ConfigError, key: str):
    found = [p for p in error.problems if p.key == key]
    assert found, f"no problem at {key} in {error.render()}"
    return found[0]


# --- the shipped config ------------------------------------------------------------------------


def test_every_shipped_preset_resolves_to_a_consistent_plan():
    cfg = load_config(SHIPPED)
    assert {"demo", "my-custom-training", *SEED_PRESETS} <= set(cfg.presets)
    for name, preset in cfg.presets.items():
        plan = resolve(cfg, name)
        hw = cfg.hardware[preset.hardware]
        assert plan.batch_size == (preset.batch_size or hw.max_batch_size) <= hw.max_batch_size
        assert plan.sequence_length <= min(hw.max_sequence_length, cfg.experts[preset.expert].context_window)
        assert plan.lora.r == cfg.lora[preset.lora].r <= hw.max_lora_rank
        assert plan.precision in ("bf16", "fp16", "fp32")
        assert Path(plan.dataset_dir).is_absolute() and Path(plan.output.models_dir).is_absolute()
        again = TrainingConfig.from_dict(json.loads(json.dumps(plan.to_dict())))
        assert again == plan and again.validate() == plan


def test_shipped_config_documents_every_key():
    """Every key of every section is documented in the shipped file: the first table of each kind
    comments each key it sets (on its line or the line above), and keys it leaves out appear in a comment."""
    text = SHIPPED.read_text()
    lines, index = text.split("\n"), key_lines(text)
    data = tomllib.loads(text)
    classes = {**schema.NAMED_TABLES, **schema.SINGLE_TABLES}
    missing = []
    for section, cls in classes.items():
        first = next(iter(data[section])) if section in schema.NAMED_TABLES else None
        table_path = (section, first) if first else (section,)
        for f in dataclasses.fields(cls):
            word = re.compile(rf"(^|[^\w-]){re.escape(f.name)}([^\w-]|$)")
            if table_path + (f.name,) in index:
                n = index[table_path + (f.name,)]
                if "#" in lines[n - 1].partition("=")[2] or lines[n - 2].lstrip().startswith("#"):
                    continue
            elif any(line.lstrip().startswith("#") and word.search(line) for line in lines):
                continue
            missing.append(".".join(table_path + (f.name,)))
    for f in dataclasses.fields(schema.OutputMetadataFlags):
        n = index[("output", "metadata", f.name)]
        if "#" not in lines[n - 1]:
            missing.append(f"output.metadata.{f.name}")
    assert not missing, f"undocumented keys in {SHIPPED.name}: {missing}"


@pytest.mark.skipif(not SEED.exists(), reason="the seed's original config is not present")
def test_shipped_config_keeps_the_seeds_content():
    seed, shipped = tomllib.loads(SEED.read_text()), tomllib.loads(SHIPPED.read_text())
    for section in ("hardware", "experts", "lora", "hyperparameters", "datasets", "presets"):
        for name, table in seed[section].items():
            for key, value in table.items():
                if (section, name, key) in {("presets", "oracle-farore-windows", "sequence_length"),
                                            ("hardware", "windows-rtx-5060", "notes")}:
                    continue  # deliberate: 4096 breaks the profile (tested below); notes say more
                assert shipped[section][name][key] == value, f"{section}.{name}.{key}"
    assert seed["output"]["metadata"] == shipped["output"]["metadata"]


# --- the user's real config --------------------------------------------------------------------


@pytest.mark.skipif(not SEED.exists(), reason="the seed's original config is not present")
def test_users_original_config_loads_unchanged_and_lists_five_presets():
    cfg = load_config(SEED)
    assert list(cfg.presets) == SEED_PRESETS
    assert list(cfg.hardware) == ["mac-mps", "windows-rtx-5060", "cloud-rtx-4090", "cloud-a100-40gb"]
    assert cfg.hardware["windows-rtx-5060"].python_path == "D:\\pytorch_env\\Scripts\\python.exe"
    assert cfg.hardware["cloud-rtx-4090"].cost_per_hour == 0.60
    assert cfg.output.name_template == "oracle-{name}-{role}-{base_short}-{date}"
    for name in SEED_PRESETS:
        if name != "oracle-farore-windows":
            assert resolve(cfg, name).preset == name


@pytest.mark.skipif(not SEED.exists(), reason="the seed's original config is not present")
def test_users_farore_preset_is_refused_for_its_sequence_length_with_file_and_line():
    cfg = load_config(SEED)
    with pytest.raises(ConfigError) as info:
        resolve(cfg, "oracle-farore-windows")
    p = problem(info.value, "presets.oracle-farore-windows.sequence_length")
    assert "sequence_length 4096 exceeds windows-rtx-5060's max_sequence_length 2048" in p.message
    assert p.file == str(SEED)
    assert p.line == line_of(SEED.read_text(), "sequence_length = 4096", after="[presets.oracle-farore-windows]")
    assert f"{SEED}:{p.line}" in info.value.render()


@pytest.mark.skipif(not SEED.exists(), reason="the seed's original config is not present")
def test_seeds_custom_preset_example_is_refused_naming_the_rank(tmp_path):
    path = tmp_path / "training.toml"
    path.write_text(SEED.read_text() + MY_CUSTOM)
    with pytest.raises(ConfigError) as info:
        resolve(load_config(path), "my-custom-training")
    p = problem(info.value, "presets.my-custom-training.lora")
    assert "r=16" in p.message and "max_lora_rank 8" in p.message and "mac-mps" in p.message
    assert p.line == line_of(path.read_text(), 'lora = "standard"', after="[presets.my-custom-training]")
    assert len(info.value.problems) == 1  # batch 1, sequence 1024, accumulation 4 are all fine on mac-mps


# --- defaults and hardware rules ----------------------------------------------------------------


def test_missing_preset_values_come_from_the_profile_and_missing_hyperparameters_from_defaults():
    text = base(("batch_size = 2\n", 'hyperparameters = "quick-test"\n'),
                ("context_window = 2048", "context_window = 512"))
    plan = resolve(load_config_text(text), "run")
    assert (plan.batch_size, plan.gradient_accumulation) == (4, 3)  # max_batch_size, recommended accumulation
    assert plan.sequence_length == 512  # the profile allows 1024, the model only 512
    assert plan.warmup_steps == 0 and plan.max_steps == 100 and plan.eval_steps is None
    assert plan.lr_scheduler == "linear" and plan.seed == 42 and plan.report_to == []
    plan = resolve(load_config_text(base()), "run")  # no hyperparameters key: "default"
    assert plan.hyperparameters_name == "default" and plan.warmup_steps == 5 and plan.sequence_length == 1024


@pytest.mark.parametrize("bf16, fp16, expected", [(True, True, "bf16"), (False, True, "fp16"), (False, False, "fp32")])
def test_auto_precision_follows_profile_support(bf16, fp16, expected):
    text = base(("supports_bf16 = true", f"supports_bf16 = {str(bf16).lower()}"),
                ("supports_fp16 = true", f"supports_fp16 = {str(fp16).lower()}"))
    assert resolve(load_config_text(text), "run").precision == expected


@pytest.mark.parametrize("edit, at_limit, key, fragment", [
    (("batch_size = 2", "batch_size = 5"), ("batch_size = 2", "batch_size = 4"), "batch_size",
     "batch_size 5 exceeds box's max_batch_size 4"),
    (("batch_size = 2", "batch_size = 2\nsequence_length = 1025"),
     ("batch_size = 2", "batch_size = 2\nsequence_length = 1024"),
     "sequence_length", "sequence_length 1025 exceeds box's max_sequence_length 1024"),
    (('lora = "small"', 'lora = "big"'), ("r = 32", "r = 16"), "lora",
     "r=32 (lora.big) exceeds box's max_lora_rank 16"),
])
def test_each_hardware_limit_refuses_one_over_and_accepts_the_limit(edit, at_limit, key, fragment):
    text = base(edit)
    with pytest.raises(ConfigError) as info:
        resolve(load_config_text(text, "t.toml"), "run")
    (p,) = info.value.problems
    assert p.key == f"presets.run.{key}" and fragment in p.message and p.file == "t.toml"
    assert p.line == line_of(text, key + " = ", after="[presets.run]")
    text = base(at_limit, edit) if key == "lora" else base(at_limit)
    plan = resolve(load_config_text(text), "run")
    assert (plan.batch_size, plan.sequence_length, plan.lora.r) in ((4, 1024, 8), (2, 1024, 8), (2, 1024, 16))


@pytest.mark.parametrize("setting, fragment", [
    ('precision = "bf16"', "bf16 is not supported on Test box (supports_bf16 = false)"),
    ('precision = "fp16"', "fp16 is not supported on Test box (supports_fp16 = false)"),
    ("gradient_checkpointing = true", "gradient checkpointing is not supported on Test box"),
])
def test_precision_and_checkpointing_only_where_the_profile_supports_them(setting, fragment):
    off = base(("supports_bf16 = true", "supports_bf16 = false"), ("supports_fp16 = true", "supports_fp16 = false"),
               ("supports_gradient_checkpointing = true", "supports_gradient_checkpointing = false"))
    text = off.replace("batch_size = 2", f"batch_size = 2\n{setting}")
    with pytest.raises(ConfigError) as info:
        resolve(load_config_text(text), "run")
    (p,) = info.value.problems
    assert p.message == fragment and p.key == "presets.run." + setting.split()[0]
    assert p.line == line_of(text, setting)
    supported = text.replace("supports_bf16 = false", "supports_bf16 = true").replace(
        "supports_fp16 = false", "supports_fp16 = true").replace(
        "supports_gradient_checkpointing = false", "supports_gradient_checkpointing = true")
    assert resolve(load_config_text(supported), "run").precision in ("bf16", "fp16")
    allowed = off.replace("batch_size = 2", 'batch_size = 2\ngradient_checkpointing = false\nprecision = "fp32"')
    plan = resolve(load_config_text(allowed), "run")
    assert plan.gradient_checkpointing is False and plan.precision == "fp32"


def test_sequence_length_over_the_models_context_window_is_refused():
    text = base(("context_window = 2048", "context_window = 256"),
                ("batch_size = 2", "batch_size = 2\nsequence_length = 512"))
    with pytest.raises(ConfigError) as info:
        resolve(load_config_text(text), "run")
    assert "exceeds expert coder's context_window 256" in problem(info.value, "presets.run.sequence_length").message


def test_unavailable_profile_is_refused_with_its_reason():
    reason = "CUDA capability sm_120 not supported by PyTorch"
    text = base(('device = "cpu"', f'device = "cpu"\nstatus = "unsupported"\nreason = "{reason}"'))
    with pytest.raises(ConfigError) as info:
        resolve(load_config_text(text), "run")
    p = problem(info.value, "hardware.box.status")
    assert p.message == f"Hardware Test box is unsupported: {reason}"
    assert p.line == line_of(text, "status = ")
    assert resolve(load_config_text(text), "run", check_hardware=False).hardware.status == "unsupported"
    no_reason = base(('device = "cpu"', 'device = "cpu"\nstatus = "broken"'))
    with pytest.raises(ConfigError, match="Hardware Test box is unsupported: status = 'broken'"):
        resolve(load_config_text(no_reason), "run")


def test_unknown_preset_lists_what_exists_with_a_suggestion():
    cfg = load_config_text(base())
    with pytest.raises(ConfigError) as info:
        resolve(cfg, "rnu")
    (p,) = info.value.problems
    assert p.message == "Preset 'rnu' not found (did you mean 'run'?)" and "available presets: run" in p.hint


def test_a_config_edited_in_python_with_a_dangling_reference_is_a_config_error():
    cfg = load_config_text(base())
    cfg.presets["run"].lora = "huge"
    del cfg.hyperparameters["default"]
    with pytest.raises(ConfigError) as info:
        resolve(cfg, "run")
    assert {p.key for p in info.value.problems} == {"presets.run.lora", "presets.run.hyperparameters"}


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    path = tmp_path / "sub" / "training.toml"
    path.parent.mkdir()
    path.write_text(base(append='\n[output]\nmodels_dir = "../models"\nregistry = "~/reg.toml"\n'))
    plan = resolve(load_config(path), "run")
    assert plan.dataset_dir == str(path.parent / "data")
    assert plan.output.models_dir == str(path.parent.parent / "models")
    assert plan.output.registry == str(Path("~/reg.toml").expanduser()) and plan.config_path == str(path)


def test_resolve_copies_sections_so_plans_never_share_state():
    cfg = load_config_text(base())
    plan = resolve(cfg, "run", ["lora.r=16", "report_to=wandb"])
    assert plan.lora.r == 16 and cfg.lora["small"].r == 8
    assert resolve(cfg, "run").lora.r == 8 and cfg.hyperparameters["default"].report_to == []


# --- overrides ---------------------------------------------------------------------------------


def test_overrides_are_type_checked_and_applied():
    plan = resolve(load_config_text(base()), "run", ["learning_rate=3e-4", "num_epochs=2", "max_steps=20",
                                                     "lora.r=16", "lr_scheduler=cosine", "precision=fp16",
                                                     "report_to=wandb,tensorboard",
                                                     "output.metadata.include_git_commit=false"])
    assert plan.learning_rate == 3e-4 and type(plan.num_epochs) is float and plan.num_epochs == 2.0
    assert plan.max_steps == 20 and plan.lora.r == 16 and plan.lr_scheduler == "cosine"
    assert plan.precision == "fp16" and plan.report_to == ["wandb", "tensorboard"]
    assert plan.output.metadata.include_git_commit is False
    plan = resolve(load_config_text(base(("batch_size = 2", 'batch_size = 2\nhyperparameters = "quick-test"'))),
                   "run", {"max_steps": "none", "precision": "auto"})
    assert plan.max_steps is None and plan.precision == "bf16"
    # The profile's device is the plan's (resolve copies it): moving one moves the other, unless both are set.
    moved = resolve(load_config_text(base()), "run", ["hardware.device=mps"])
    assert moved.device == moved.hardware.device == "mps"
    both = resolve(load_config_text(base()), "run", ["hardware.device=mps", "device=auto"])
    assert both.device == "auto" and both.hardware.device == "mps"


@pytest.mark.parametrize("override, key, fragment", [
    ("batch_size=abc", "--set batch_size", "must be a whole number, got a string ('abc')"),
    ("learning_rat=1e-4", "--set learning_rat", "did you mean 'learning_rate'?"),
    ("r=16", "--set r", "did you mean 'lora.r'?"),
    ("lroa.r=16", "--set lroa.r", "unknown section 'lroa' (did you mean 'lora'?)"),
    ("packing=1", "--set packing", "must be true or false"),
    ("preset=other", "--set preset", "unknown setting"),
    ("lora=full", "--set lora", "'lora' is a section: set one of its keys, e.g. lora.r"),
    ("learning_rate", "--set", "is not KEY=VALUE"),
    ("learning_rate=1e-4\nbatch_size=99", "--set learning_rate", "must be a number"),
    ("learning_rate=inf", "--set learning_rate", "must be a finite number"),
])
def test_bad_overrides_are_config_errors_naming_the_override(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        resolve(load_config_text(base()), "run", [override])
    assert fragment in problem(info.value, key).message


@pytest.mark.parametrize("override, fragment", [
    ("batch_size=99", "batch_size 99 exceeds box's max_batch_size 4"),
    ("lora.r=64", "r=64 (lora.small) exceeds box's max_lora_rank 16"),
    ("hardware.max_lora_rank=4", "r=8 (lora.small) exceeds box's max_lora_rank 4"),
    ("learning_rate=-1", "must be > 0"),
    ("lr_scheduler=cosin", "did you mean 'cosine'?"),
    ("hardware.device=gpu", "unknown value 'gpu'"),  # moves the plan's device too: still one problem, the override's
])
def test_an_override_that_breaks_a_rule_is_refused_and_blamed(override, fragment):
    with pytest.raises(ConfigError) as info:
        resolve(load_config_text(base(), "t.toml"), "run", [override])
    (p,) = info.value.problems
    assert p.key == "--set " + override.split("=")[0] and fragment in p.message
    assert p.file == "" and p.line is None  # the file is fine: no line of it to point at


def test_all_bad_overrides_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        resolve(load_config_text(base()), "run", ["batch_size=x", "seed=1.5", "nope=1"])
    assert [p.key for p in info.value.problems] == ["--set batch_size", "--set seed", "--set nope"]


def test_parse_override_reads_toml_values_and_bare_words():
    assert parse_override("learning_rate=3e-4") == ("learning_rate", 3e-4)
    assert parse_override(" max_steps = 20 ") == ("max_steps", 20)
    assert parse_override("lr_scheduler=cosine") == ("lr_scheduler", "cosine")
    assert parse_override('report_to=["wandb"]') == ("report_to", ["wandb"])
    assert parse_override("packing=false") == ("packing", False)
    assert parse_override("x=a=b") == ("x", "a=b")
    assert parse_override("x=" + "[" * 5000) == ("x", "[" * 5000)


def test_dataset_path_override_moves_the_dataset_dir(tmp_path):
    plan = resolve(load_config_text(base()), "run", [f"dataset.path={tmp_path}"])
    assert plan.dataset_dir == str(tmp_path) and plan.dataset.path == str(tmp_path)


# --- the seed's programmatic example -----------------------------------------------------------


def test_programmatic_edit_then_validate():
    plan = resolve(load_config(SHIPPED), "oracle-rauru-mac")
    plan.learning_rate = 3e-4
    plan.num_epochs = 2
    assert plan.validate() is plan and plan.num_epochs == 2.0
    assert TrainingConfig.from_dict(plan.to_dict()) == plan
    plan.batch_size = 99
    with pytest.raises(ConfigError) as info:
        plan.validate()
    (p,) = info.value.problems
    assert "batch_size" in p.key and "batch_size 99 exceeds mac-mps's max_batch_size 1" in p.message
    plan.batch_size = 1
    plan.learning_rate = "fast"
    with pytest.raises(ConfigError, match="learning_rate: must be a number, got a string"):
        plan.validate()


@pytest.mark.parametrize("edit, key", [
    (lambda p: setattr(p.lora, "r", "big"), "lora.r"),
    (lambda p: setattr(p, "hardware", None), "hardware"),
    (lambda p: setattr(p, "report_to", ["wandb", 3]), "report_to[1]"),
    (lambda p: setattr(p.lora, "lora_dropout", 1.0), "lora.lora_dropout"),
    (lambda p: setattr(p.hardware, "max_batch_size", "4"), "hardware.max_batch_size"),
    (lambda p: setattr(p.output.metadata, "include_git_commit", "yes"), "output.metadata.include_git_commit"),
    (lambda p: setattr(p, "device", "tpu"), "device"),
    (lambda p: setattr(p, "precision", "fp8"), "precision"),
    (lambda p: setattr(p, "sequence_length", 0), "sequence_length"),
    (lambda p: setattr(p.expert, "prompt_template", "{instruction}"), "expert.prompt_template"),
])
def test_validate_names_the_bad_field_and_never_raises_anything_else(edit, key):
    plan = resolve(load_config_text(base()), "run")
    edit(plan)
    with pytest.raises(ConfigError) as info:
        plan.validate()
    assert key in [p.key for p in info.value.problems]


def test_validate_normalises_auto_precision_and_whole_floats():
    plan = resolve(load_config_text(base()), "run")
    plan.precision, plan.batch_size = "auto", 3.0
    plan.validate()
    assert plan.precision == "bf16" and plan.batch_size == 3 and type(plan.batch_size) is int
    assert hardware_problems(plan) == []


def test_from_dict_rejects_bad_data_and_ignores_unknown_keys():
    plan = resolve(load_config_text(base()), "run")
    data = plan.to_dict()
    data["added_in_a_later_version"] = 1
    data["lora"]["also_new"] = True
    assert TrainingConfig.from_dict(data) == plan
    for broken, key in (({**data, "batch_size": "two"}, "batch_size"), ({**data, "lora": 5}, "lora"),
                        ({k: v for k, v in data.items() if k != "expert"}, "expert"),
                        ({**data, "lora": {"r": -1}}, "lora.r")):
        with pytest.raises(ConfigError) as info:
            TrainingConfig.from_dict(broken)
        assert key in [p.key for p in info.value.problems]
    with pytest.raises(ConfigError):
        TrainingConfig.from_dict(["not", "a", "dict"])


def test_apply_overrides_reports_what_it_set():
    plan = resolve(load_config_text(base()), "run")
    applied = apply_overrides(plan, ["seed=7", "lora.lora_alpha=32"])
    assert applied == {"seed": "seed", "lora.lora_alpha": "lora.lora_alpha"}
    assert plan.seed == 7 and plan.lora.lora_alpha == 32.0


def test_derived_numbers():
    plan = resolve(load_config_text(base()), "run", ["gradient_accumulation=4", "num_epochs=2.5"])
    assert plan.effective_batch() == 8 and plan.effective_batch(world_size=4) == 32
    assert plan.max_tokens_per_step() == 8 * 1024
    assert plan.total_steps(micro_batches_per_epoch=10) == 8  # ceil(10/4)=3 per epoch, x2.5 → 7.5 → 8
    assert plan.resolved_warmup(total_steps=3) == 3 and plan.resolved_warmup(total_steps=100) == 5
    plan.max_steps = 20
    assert plan.total_steps(10) == 20


# --- reading files and locating keys -----------------------------------------------------------


def test_file_level_problems(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "a\x00b.toml"))
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + base().encode().replace(b"\n", b"\r\n"))
    cfg = load_config(bom)  # Windows Notepad: byte-order mark and CRLF
    assert cfg.line_of("presets.run.batch_size") == line_of(base(), "batch_size = 2")
    # PowerShell 5's `>` and Notepad's "Unicode" write UTF-16: one line saying so, with or without a BOM.
    for encoding, name in (("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("utf-32", "UTF-32")):
        wide = tmp_path / f"{encoding}.toml"
        wide.write_bytes(base().encode(encoding))
        with pytest.raises(ConfigError) as err:
            load_config(wide)
        (p,) = err.value.problems
        assert (p.message, p.file, p.line) == (f"the file is {name} text, not UTF-8", str(wide), 1), encoding


def test_problems_keep_the_spelling_of_quoted_keys():
    text = base(append='\n[presets."my run.v2"]\nexpert = "coder"\nhardware = "box"\ndataset = "data"\n'
                       'lora = "small"\nbatchsize = 2\n')
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    p = problem(info.value, 'presets."my run.v2".batchsize')
    assert p.line == line_of(text, "batchsize")
    text = text.replace("batchsize = 2", "batch_size = 9")
    with pytest.raises(ConfigError) as info:
        resolve(load_config_text(text), "my run.v2")
    p = problem(info.value, 'presets."my run.v2".batch_size')
    assert p.line == line_of(text, "batch_size = 9")


def test_key_lines_follows_strings_inline_tables_and_dotted_keys():
    text = ('title = """\n[not.a.table]\nkey = 1"""  # c\n'
            "'quoted.key' = { a = 1, b = { c = [1,\n 2] } }\n"
            "[ t . \"u v\" ]  # header\n"
            "dotted.key = 1979-05-27 07:32:00Z\n"
            "s = 'x#y'\n"
            "# comment with \u2028 a line separator\n"
            "[[arr]]\nk = 1\n[[arr]]\nk = 2\n")
    tomllib.loads(text)
    lines = key_lines(text)
    assert lines[("title",)] == 1 and ("not",) not in lines
    assert lines[("quoted.key", "b", "c", "[1]")] == 5 and lines[("quoted.key", "a")] == 4
    assert lines[("t", "u v")] == 6 and lines[("t", "u v", "dotted", "key")] == 7
    assert lines[("t", "u v", "s")] == 8 and lines[("arr", "k")] == 11


@pytest.mark.parametrize("path", [SHIPPED, SEED, *sorted((ROOT / "tests" / "configs").glob("hw_*.toml"))],
                         ids=lambda p: p.name)
def test_key_lines_finds_every_key_of_real_files(path):
    if not path.exists():
        pytest.skip("absent")
    text = path.read_text()
    lines, index = text.split("\n"), key_lines(text)

    def walk(table, prefix=()):
        for key, value in table.items():
            yield prefix + (key,)
            if isinstance(value, dict):
                yield from walk(value, prefix + (key,))

    for keypath in walk(tomllib.loads(text)):
        assert keypath[-1] in lines[index[keypath] - 1], keypath


def test_the_config_reference_is_generated_from_the_current_schema():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "config_reference.py")], capture_output=True,
                         text=True, check=True).stdout
    assert out == (root / "docs" / "config-reference.md").read_text(), \
        "docs/config-reference.md is stale: python scripts/config_reference.py > docs/config-reference.md"


def test_the_plan_carries_every_hyperparameter_with_the_same_type_and_default():
    # TrainingConfig repeats [hyperparameters.*] as flat fields (plan.learning_rate = 3e-4, as in the
    # seed); a key added to one and not the other would be silently dropped or never set.
    import typing

    from hafs.training.plan import TrainingConfig
    from hafs.training.schema import HyperparameterSection

    plan_fields = {f.name: f for f in dataclasses.fields(TrainingConfig)}
    plan_types, section_types = typing.get_type_hints(TrainingConfig), typing.get_type_hints(HyperparameterSection)
    for f in dataclasses.fields(HyperparameterSection):
        assert f.name in plan_fields, f"TrainingConfig lacks hyperparameter {f.name}"
        mine = plan_fields[f.name]
        assert plan_types[f.name] == section_types[f.name], f.name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        plan_default = mine.default_factory() if mine.default_factory is not dataclasses.MISSING else mine.default
        assert plan_default == default, f.name


def test_a_prompt_template_without_instruction_is_refused_at_its_line():
    text = base(('context_window = 2048', 'context_window = 2048\nprompt_template = "{input_section}{output}"'))
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "t.toml")
    p = problem(info.value, "experts.coder.prompt_template")
    assert "{instruction}" in p.message and p.file == "t.toml" and p.line == line_of(text, "prompt_template")
    # a misspelt placeholder says what it meant instead
    with pytest.raises(ConfigError, match=r"unknown placeholder '\{instrucion\}' \(did you mean 'instruction'"):
        load_config_text(base(('context_window = 2048',
                               'context_window = 2048\nprompt_template = "{instrucion}{output}"')))
    load_config_text(base(('context_window = 2048', 'context_window = 2048\nprompt_template = "Q: {instruction}'
                                                    '\\nA: {output}"')))


def test_an_unknown_demo_model_is_refused_when_the_file_loads_with_the_demo_models():
    text = base(('base_model = "tiny/model"', 'base_model = "hafs-demo/tiny-llama"'))
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "t.toml")
    p = problem(info.value, "experts.coder.base_model")
    assert "unknown demo model 'hafs-demo/tiny-llama'" in p.message and "hafs-demo/tiny-qwen2" in p.message
    assert p.line == line_of(text, "base_model")
    load_config_text(base(('base_model = "tiny/model"', 'base_model = "hafs-demo/tiny-qwen2"')))


def test_a_relative_base_model_folder_is_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "conf" / "merged1").mkdir(parents=True)
    config = tmp_path / "conf" / "training.toml"
    monkeypatch.chdir(tmp_path)  # not the config's folder: the old resolution looked for ./merged1 here
    for written, expected in [("merged1", tmp_path / "conf" / "merged1"),
                              ("./not-yet", tmp_path / "conf" / "not-yet"),
                              ("../conf/merged1", tmp_path / "conf" / "merged1"),
                              ("Qwen/Qwen2.5-Coder-1.5B", "Qwen/Qwen2.5-Coder-1.5B"),  # a hub id stays one
                              ("hafs-demo/tiny-qwen2", "hafs-demo/tiny-qwen2")]:
        config.write_text(base(('base_model = "tiny/model"', f'base_model = "{written}"')))
        assert resolve(load_config(config), "run").expert.base_model == str(expected), written
    # --set paths are relative to the working directory, like dataset.path and the output folders
    (tmp_path / "here").mkdir()
    plan = resolve(load_config(config), "run", ["expert.base_model=./here"])
    assert plan.expert.base_model == str(tmp_path / "here")


def test_editing_dataset_path_or_output_folders_in_python_moves_the_derived_paths(tmp_path, monkeypatch):
    config = tmp_path / "conf" / "training.toml"
    config.parent.mkdir()
    config.write_text(base())
    monkeypatch.chdir(tmp_path)
    plan = resolve(load_config(config), "run")
    assert plan.dataset_dir == str(tmp_path / "conf" / "data")
    plan.dataset.path = "other"
    plan.output.models_dir = "elsewhere"
    plan.validate()
    assert plan.dataset_dir == str(tmp_path / "conf" / "other")
    assert plan.output.models_dir == str(tmp_path / "conf" / "elsewhere")
    # a replaced section, the way dataclasses.replace edits a plan
    moved = dataclasses.replace(plan, dataset=dataclasses.replace(plan.dataset, path="/abs/data")).validate()
    assert moved.dataset_dir == "/abs/data"
    # the derived field itself cannot be edited: that would leave dataset.path saying otherwise
    plan.dataset_dir = "/somewhere/else"
    with pytest.raises(ConfigError, match="dataset_dir is derived from dataset.path") as info:
        plan.validate()
    assert "set dataset.path instead" in info.value.problems[0].hint
    # a --set dataset.path stays relative to the working directory through validate()
    plan = resolve(load_config(config), "run", ["dataset.path=cli-data"]).validate()
    assert plan.dataset_dir == str(tmp_path / "cli-data")
    # and the bookkeeping is not part of the saved plan
    assert not any(k.startswith("_") for k in plan.to_dict())
    assert TrainingConfig.from_dict(plan.to_dict()).validate().dataset_dir == plan.dataset_dir


def test_a_key_defined_twice_names_the_key_and_both_lines():
    text = base(("warmup_steps = 5", "warmup_steps = 5\nlearning_rate = 1e-3"))
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "t.toml")
    (p,) = info.value.problems
    first = line_of(text, "learning_rate", after="[hyperparameters.default]")
    assert p.message == ("TOML syntax error: 'hyperparameters.default.learning_rate' is defined twice "
                         f"(first on line {first})")
    assert (p.file, p.line) == ("t.toml", first + 2)
    with pytest.raises(ConfigError, match=r"^t.toml:\d+: TOML syntax error: 'lora.small' is defined twice"):
        load_config_text(base(append="\n[lora.small]\nr = 4\n"), "t.toml")
    # the elements of an array of tables may repeat their keys; key_lines of valid files is unchanged
    repeats = []
    assert key_lines("[[a]]\nx = 1\n[[a]]\nx = 2\n", repeats) == {("a",): 1, ("a", "x"): 2} and repeats == []


def test_problems_found_after_resolving_blame_the_set_override_not_the_file(tmp_path, monkeypatch):
    from hafs.training.dryrun import dry_run

    config = tmp_path / "training.toml"
    config.write_text(base())
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config)
    report = dry_run(cfg, "run", ["dataset.path=nowhere"])
    (p,) = [p for p in report.problems if "train split not found" in p.message]
    assert (p.key, p.file, p.line) == ("--set dataset.path", "", None)
    report = dry_run(cfg, "run")  # without the override the file is to blame
    (p,) = [p for p in report.problems if "train split not found" in p.message]
    assert (p.key, p.file) == ("datasets.data.path", str(config))
