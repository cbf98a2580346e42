"""`hafs generate` (template, streaming, conversation) and `hafs merge` (logits equal base + adapter)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from test_evaluate import _quiet_cpu, trained_model_dir  # noqa: E402,F401  (fixture re-used)

from hafs.training import generate as gen  # noqa: E402
from hafs.training.errors import ConfigError  # noqa: E402
from hafs.training.evaluate import generate_text  # noqa: E402
from hafs.training.merge import merge_adapter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path, tmp_path_factory):
    return trained_model_dir(tmp_path, tmp_path_factory)


def _args(model_dir, instruction="Clear the carry flag.", **kw):
    return argparse.Namespace(model_dir=str(model_dir), instruction=instruction, input=kw.get("input", ""),
                              max_new_tokens=kw.get("max_new_tokens", 12), interactive=kw.get("interactive", False),
                              json=kw.get("json", False), config=None, verbose=False)


def test_prompt_is_the_expert_template_tokenized_as_in_training(model_dir):
    from hafs.training.data import Sample, render
    from hafs.training.tokenize import special_prefix

    _, plan, _, tokenizer = model_dir
    ids = gen.prompt_ids(plan, tokenizer, "Explain REP #$20.", "REP #$20")
    prompt, _ = render(Sample(format="alpaca", line=0, instruction="Explain REP #$20.", input="REP #$20"),
                       plan.expert, tokenizer)
    assert prompt.startswith("Below is an instruction for 65816 assembly, paired with an input")
    assert "### Input:\nREP #$20\n" in prompt and prompt.endswith("### Response:\n")
    assert ids == special_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # With history: earlier turns become the input of the template (this tokenizer has no chat template).
    ids2 = gen.prompt_ids(plan, tokenizer, "And SEP?", history=[("What is REP?", "It clears flags.")])
    text = tokenizer.decode(ids2)
    assert "### Instruction:\nAnd SEP?\n" in text
    assert "User: What is REP?\n\nAssistant: It clears flags." in text


def test_generate_streams_the_greedy_reply(model_dir, capsys):
    path, plan, model, tokenizer = model_dir
    assert gen.cmd_generate(_args(path)) == 0
    streamed = capsys.readouterr().out
    expected = generate_text(model, tokenizer, gen.prompt_ids(plan, tokenizer, "Clear the carry flag."), 12)
    assert expected.strip() and streamed == expected + "\n"

    assert gen.cmd_generate(_args(path, json=True, input="CLC")) == 0
    out = json.loads(capsys.readouterr().out)
    assert "### Input:\nCLC" in out["prompt"]
    assert out["reply"] == generate_text(model, tokenizer, gen.prompt_ids(plan, tokenizer, "Clear the carry flag.",
                                                                           "CLC"), 12)


def test_generate_needs_an_instruction(model_dir):
    with pytest.raises(ConfigError, match="--interactive"):
        gen.cmd_generate(_args(model_dir[0], instruction=None))
    with pytest.raises(ConfigError, match="max-new-tokens"):
        gen.cmd_generate(_args(model_dir[0], max_new_tokens=0))


def test_interactive_keeps_the_conversation_until_reset(model_dir, capsys):
    _, plan, model, tokenizer = model_dir
    answers = iter(["What does CLC do?", "/input LDA #$01", "And ADC?", "/reset", "Hello", "", "", "never read"])
    seen = []
    real = gen.prompt_ids

    def spy(plan_, tok, instruction, input_text="", history=None):
        seen.append((instruction, input_text, [u for u, _ in (history or [])]))
        return real(plan_, tok, instruction, input_text, history)

    gen.prompt_ids = spy
    try:
        history = gen.interactive(model, tokenizer, plan, max_new_tokens=4, ask=lambda _: next(answers))
    finally:
        gen.prompt_ids = real
    assert seen == [("What does CLC do?", "", []), ("And ADC?", "LDA #$01", ["What does CLC do?"]),
                    ("Hello", "", [])]
    assert [u for u, _ in history] == ["Hello"]
    assert capsys.readouterr().out.count("expert> ") == 3


def test_interactive_ends_the_conversation_on_ctrl_c_but_lets_sigterm_end_the_program(model_dir, capsys):
    import signal

    from hafs.training.faults import Terminated

    _, plan, model, tokenizer = model_dir

    def ask(exc):
        def raiser(_):
            raise exc
        return raiser

    assert gen.interactive(model, tokenizer, plan, max_new_tokens=4, ask=ask(KeyboardInterrupt())) == []
    with pytest.raises(Terminated):  # the CLI turns it into exit 143, as for any command
        gen.interactive(model, tokenizer, plan, max_new_tokens=4, ask=ask(Terminated(signal.SIGTERM)))


def test_merged_model_loads_plainly_and_matches_base_plus_adapter(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    path, plan, peft_model, tokenizer = model_dir
    out = merge_adapter(path, tmp_path / "merged", log=lambda m: None)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "hafs_merge.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]
    config = json.loads((out / "config.json").read_text())
    assert config["use_cache"] is True and "hafs" not in json.dumps(config)
    assert config["dtype"] == "float32"  # the base's own dtype (build_tiny_model stores fp32)

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.tensor([tokenizer("LDA #$01\nSTA $7E0010\nRTS", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
        got = merged(input_ids=x).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=x).logits
    assert (got - want).abs().max().item() < 1e-4
    assert (base - want).abs().max().item() > 1e-2  # the adapter changes the model: the check can fail

    with pytest.raises(ConfigError, match="already exists"):
        merge_adapter(path, out, log=lambda m: None)
    assert {p.name for p in out.iterdir()} == names


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~15 s on a busy 2-core box
def test_merged_model_loads_in_a_fresh_process_without_hafs(model_dir, tmp_path):
    path = model_dir[0]
    out = merge_adapter(path, tmp_path / "merged", dtype="bf16", log=lambda m: None)
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]);"
            "print(m.dtype, m.config.model_type, len(t) > 0, 'hafs' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["torch.bfloat16", "qwen2", "True", "False"]


def test_merge_cli_and_bad_inputs(model_dir, tmp_path):
    from hafs.training.cli import main

    assert main(["merge", str(model_dir[0]), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main(["merge", str(model_dir[0]), "--out", str(tmp_path / "m")]) == 2  # exists
    (tmp_path / "half").mkdir()
    assert main(["merge", str(tmp_path / "half"), "--out", str(tmp_path / "m2")]) == 2
    assert not (tmp_path / "m2").exists()
