"""Shared test pieces: the tiny local model the end-to-end tests train, its training.toml, torch on one thread.

`tiny_config` is a plain function (tests import it: `from conftest import tiny_config`; pytest puts
this folder on sys.path). Each caller passes only what its tests vary.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "demo"

TINY_CONFIG = """
[metadata]
schema_version = 1

[hardware.cpu]
name = "CPU"
device = "cpu"
available_memory_gb = 16
max_batch_size = 8
max_sequence_length = 2048
supports_bf16 = false
supports_fp16 = false
max_lora_rank = {max_lora_rank}

[experts.tiny]
display_name = "Tiny"
base_model = "{model}"
role = "asm"
context_window = 2048

[lora.tiny]
r = 4
lora_alpha = 8
lora_dropout = {lora_dropout}

[hyperparameters.{hyperparameters_name}]
{hyperparameters}

[datasets.demo]
path = "{data}"

[presets.{preset}]
expert = "tiny"
hardware = "cpu"
dataset = "demo"
lora = "tiny"
hyperparameters = "{hyperparameters_name}"
sequence_length = 128
batch_size = {batch_size}
gradient_accumulation = {gradient_accumulation}
precision = "fp32"

[output]
models_dir = "{root}/models"
logs_dir = "{root}/logs"
checkpoints_dir = "{root}/checkpoints"
name_template = "{{expert}}-{{date}}"

{extra}
"""


def tiny_config(root: Path, model: Path, *, preset: str, hyperparameters: str, hyperparameters_name: str,
                data: Path = DEMO_DATA, lora_dropout: float = 0.0, batch_size: int = 2,
                gradient_accumulation: int = 1, max_lora_rank: int = 64, extra: str = "") -> Path:
    """Write `root/training.toml`: one CPU fp32 preset training `model` (LoRA r=4, alpha 8) on `data`.

    `hyperparameters`: the body of `[hyperparameters.<hyperparameters_name>]` (TOML lines).
    `extra`: TOML appended after `[output]` (e.g. `[tuning.*]` tables). Outputs go under `root`.
    Returns the config's path.
    """
    root.mkdir(parents=True, exist_ok=True)
    config = root / "training.toml"
    config.write_text(TINY_CONFIG.format(
        model=model, data=data, root=root, preset=preset, hyperparameters=hyperparameters.strip("\n"),
        hyperparameters_name=hyperparameters_name, lora_dropout=lora_dropout, batch_size=batch_size,
        gradient_accumulation=gradient_accumulation, max_lora_rank=max_lora_rank, extra=extra))
    return config


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """`build_tiny_model` at its default shape, built once per test session. Tests only read it."""
    from hafs.training.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: other processes share the CPU; one thread avoids OpenMP stalls
    and keeps the tests fast. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
