"""The training engine on a tiny Qwen2: learning, determinism, accumulation, NaN stop, eval, hooks, loading."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread

from hafs.training import engine, model_loading
from hafs.training.batching import collate
from hafs.training.data import SplitStats
from hafs.training.errors import ConfigError, TrainingError
from hafs.training.loader import load_config
from hafs.training.loss import IGNORE_INDEX
from hafs.training.plan import resolve
from hafs.training.precision import VARLEN_ATTENTION, run_settings
from hafs.training.tokenize import TokenizedSplit, TokenStats

CONFIG = Path(__file__).resolve().parents[1] / "config" / "training.toml"
VOCAB, PAD, EOS = 96, 1, 2


@pytest.fixture(scope="module")
def shipped():
    return load_config(CONFIG)


def make_plan(shipped, **overrides):
    base = {"precision": "fp32", "learning_rate": 1e-2, "warmup_steps": 0, "max_steps": 6, "logging_steps": 2,
            "save_steps": 0, "eval_strategy": "no", "batch_size": 2, "gradient_accumulation": 1,
            "sequence_length": 64, "lr_scheduler": "constant", "seed": 5}
    base.update(overrides)
    return resolve(shipped, "demo", base, check_hardware=False)


def make_split(lengths, prompt_lengths, seed=0) -> TokenizedSplit:
    """Random prompts; responses are a learnable pattern (7, 8, 7, 8, ...) ending in EOS."""
    rng = np.random.default_rng(seed)
    ids, mask = [], []
    for n, p in zip(lengths, prompt_lengths):
        ex = rng.integers(3, VOCAB, size=n).astype(np.int32)
        ex[p:] = 7 + np.arange(n - p) % 2
        ex[-1] = EOS
        m = np.arange(n) >= p
        m[0] = False
        ids.append(ex)
        mask.append(m)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedSplit(split="train", input_ids=np.concatenate(ids), label_mask=np.concatenate(mask),
                          offsets=offsets, lines=np.arange(1, len(lengths) + 1, dtype=np.int32),
                          raw=SplitStats(split="train", path="x"), stats=TokenStats(examples=len(lengths)))


def tiny_lora(plan, settings, seed=0):
    """A random-init tiny Qwen2 (frozen weights from a fixed seed, as if loaded) wrapped in LoRA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if settings.attn_implementation == VARLEN_ATTENTION:
        model_loading.register_varlen_attention()
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, attn_implementation=settings.attn_implementation,
                      initializer_range=0.2)  # logits big enough for the loss to move visibly
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = Qwen2ForCausalLM(cfg).to(settings.torch_dtype())
    return model_loading.apply_lora(base, plan, settings)


def adapter(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(plan, split, settings=None, model=None, **kwargs):
    settings = settings or run_settings(plan)
    model = model or tiny_lora(plan, settings)
    source = engine.BatchSource(split, plan, settings=settings, pad_id=PAD)
    total = plan.total_steps(source.micro_batches_per_epoch())
    opt = kwargs.pop("optimizer", None) or engine.build_optimizer(model, plan, settings)
    sched = engine.build_scheduler(opt, plan, total)
    state = engine.train(model, opt, sched, source, plan, engine.TrainState(total_steps=total),
                         settings=settings, progress=False, **kwargs)
    return model, state


LENGTHS = [12, 20, 9, 30, 16, 25, 11, 18]
PROMPTS = [4, 6, 3, 10, 5, 8, 2, 7]


def test_training_changes_every_lora_weight_and_loss_falls(shipped):
    plan = make_plan(shipped, max_steps=30, batch_size=4, packing=False)
    split = make_split(LENGTHS, PROMPTS)
    settings = run_settings(plan)
    model = tiny_lora(plan, settings)
    before = adapter(model)
    model, state = run(plan, split, settings, model)
    after = adapter(model)
    assert len(before) == 2 * 4 * 2  # lora_A and lora_B of q,k,v,o in 2 layers
    assert all(not torch.equal(before[n], after[n]) for n in before)
    losses = [loss for _, loss in state.loss_history]
    assert len(losses) == 30 and state.step == 30 and state.stop_reason == "completed"
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert state.tokens == 15 * sum(LENGTHS)  # 2 micro-batches of 4 = one epoch per 2 steps


def test_same_seed_gives_identical_adapters_and_other_seed_differs(shipped):
    plan = make_plan(shipped)
    split = make_split(LENGTHS, PROMPTS)
    first, s1 = run(plan, split)
    second, s2 = run(plan, split)
    a, b = adapter(first), adapter(second)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert s1.loss_history == s2.loss_history
    third, _ = run(dataclasses.replace(plan, seed=6), split)
    c = adapter(third)
    assert any(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("packing", [False, True])
def test_accumulation_normalises_by_tokens_of_the_whole_step(shipped, packing):
    # Rows with very different numbers of labelled tokens: a mean of per-micro-batch means would differ.
    split = make_split([40, 8], [5, 2])
    plan_big = make_plan(shipped, max_steps=1, batch_size=2, gradient_accumulation=1, packing=packing,
                         max_grad_norm=0.0)
    plan_acc = make_plan(shipped, max_steps=1, batch_size=1, gradient_accumulation=2, packing=packing,
                         max_grad_norm=0.0)
    plan_big.lora.lora_dropout = plan_acc.lora.lora_dropout = 0.0
    results = []
    for plan in (plan_big, plan_acc):
        settings = dataclasses.replace(run_settings(plan), packing=False)  # one example per row in both
        model = tiny_lora(plan, settings)
        start = adapter(model)
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        model, state = run(plan, split, settings, model, optimizer=sgd)
        delta = {n: start[n] - p for n, p in adapter(model).items()}  # = the gradient (SGD, lr 1)
        results.append((state.loss_history[0][1], delta))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert abs(loss_a - loss_b) < 1e-5
    assert all(torch.allclose(grad_a[n], grad_b[n], atol=1e-5, rtol=1e-5) for n in grad_a)
    assert any(grad_a[n].abs().max() > 1e-4 for n in grad_a)  # lora_B starts at 0 but its gradient does not


def test_nan_loss_raises_at_that_step_without_updating(shipped):
    plan = make_plan(shipped, max_steps=6)
    split = make_split(LENGTHS, PROMPTS)
    settings = run_settings(plan)
    model = tiny_lora(plan, settings)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output  # third micro-batch = step 3

    layer = model.get_base_model().model.layers[0]
    layer.register_forward_hook(poison)
    seen = {}
    with pytest.raises(TrainingError) as info:
        run(plan, split, settings, model, hooks=engine.Hooks(on_step=lambda s, m: seen.update(step=s.step)))
    text = str(info.value)
    assert "step 3" in text and "nan" in text.lower() and "learning rate" in text
    assert seen["step"] == 2
    assert all(torch.isfinite(p).all() for p in adapter(model).values())


def test_evaluate_loss_counts_response_tokens_only(shipped):
    plan = make_plan(shipped)
    settings = run_settings(plan)
    model = tiny_lora(plan, settings)
    split = make_split([10, 14, 6], [4, 9, 1])
    batch = collate(split, [[0], [1], [2]], PAD)
    loss, count = engine.evaluate_loss(model, [batch], settings)
    assert count == (10 - 4) + (14 - 9) + (6 - 1)  # response + EOS tokens; first token never a target
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                                            ignore_index=IGNORE_INDEX)
    assert abs(loss - float(ref)) < 1e-5
    assert model.training is False  # restored to what it was
    model.train()
    engine.evaluate_loss(model, [batch], settings)
    assert model.training


def test_hooks_logging_eval_save_and_stop(shipped):
    plan = make_plan(shipped, max_steps=7, logging_steps=3, eval_strategy="steps", eval_steps=2, save_steps=4)
    split = make_split(LENGTHS, PROMPTS)
    events = []
    hooks = engine.Hooks(on_log=lambda s, m: events.append(("log", s.step, round(m["loss"], 6))),
                         on_eval=lambda s, m: events.append(("eval", s.step)),
                         on_save=lambda s: events.append(("save", s.step)))
    _, state = run(plan, split, hooks=hooks, eval_fn=lambda m: (1.5, 10))
    assert [e[:2] for e in events] == [("eval", 2), ("log", 3), ("eval", 4), ("save", 4), ("log", 6),
                                        ("eval", 6), ("log", 7)]
    losses = [v for _, v in state.loss_history]
    assert events[1][2] == round(np.mean(losses[:3]), 6)  # a log line averages its window
    assert state.eval_history == [[2, 1.5], [4, 1.5], [6, 1.5]]
    stops = iter([False, False, True])
    _, stopped = run(plan, split, hooks=engine.Hooks(should_stop=lambda: next(stops)))
    assert stopped.step == 3 and stopped.stop_reason == "stopped"


def test_epochs_and_data_position(shipped):
    plan = make_plan(shipped, max_steps=None, num_epochs=2, gradient_accumulation=3, batch_size=2, packing=False)
    split = make_split(LENGTHS, PROMPTS)  # 8 samples / 2 = 4 micro-batches = 2 steps (3 + 1) per epoch
    _, state = run(plan, split, eval_fn=None)
    assert state.total_steps == 4 and state.step == 4
    assert (state.epoch, state.micro_batch) == (1, 4)
    assert state.tokens == 2 * sum(LENGTHS)
    again = engine.TrainState.from_dict(state.to_dict())
    assert again == state


def test_eval_every_epoch(shipped):
    plan = make_plan(shipped, max_steps=None, num_epochs=3, eval_strategy="epoch", batch_size=4, packing=False)
    split = make_split(LENGTHS, PROMPTS)
    _, state = run(plan, split, eval_fn=lambda m: 2.0)
    assert [s for s, _ in state.eval_history] == [2, 4, 6]


def test_packed_rows_attend_only_within_their_example(shipped):
    plan = make_plan(shipped, packing=True)
    settings = run_settings(plan)
    assert settings.attn_implementation == VARLEN_ATTENTION
    model = tiny_lora(plan, settings).eval()
    split = make_split([13, 7, 21, 5], [3, 0, 10, 2], seed=3)
    with torch.no_grad():
        packed = collate(split, [[0, 1, 2], [3]], PAD)
        hidden = model.get_base_model().model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                              use_cache=False).last_hidden_state
        t = 0
        for i, n in enumerate([13, 7, 21]):
            alone = collate(split, [[i]], PAD, pad_multiple=1)
            ref = model.get_base_model().model(input_ids=alone["input_ids"], position_ids=alone["position_ids"],
                                               use_cache=False).last_hidden_state
            torch.testing.assert_close(hidden[0, t:t + n], ref[0], atol=1e-5, rtol=0)
            t += n


def test_fast_dropout_keeps_probability_and_scale():
    drop = model_loading.FastDropout(0.25)
    x = torch.ones(200_000)
    torch.manual_seed(0)
    y = drop(x)
    assert abs(float((y == 0).float().mean()) - 0.25) < 0.005
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.75))  # survivors scaled by 1 / (1 - p)
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)
    drop.eval()
    assert drop(x) is x


def test_unknown_target_module_is_a_config_error(shipped):
    plan = make_plan(shipped)
    plan.lora.target_modules = ["q_proj", "query_key_value"]
    settings = run_settings(plan)
    with pytest.raises(ConfigError) as info:
        tiny_lora(plan, settings)
    text = str(info.value)
    assert f"lora.{plan.lora_name}.target_modules" in text and "'query_key_value'" in text
    assert "gate_proj" in text and "o_proj" in text  # lists what the model has


def test_progress_printer_plain_lines_and_terminal_line():
    state = engine.TrainState(step=3, total_steps=10, elapsed_seconds=6.0)
    metrics = {"loss": 1.2345, "lr": 1e-4, "epoch": 0.3, "tokens_per_second": 1234.0}
    plain = io.StringIO()
    p = engine.ProgressPrinter(10, 5, stream=plain, tty=False)
    p.update(state, metrics, 6.0)
    assert plain.getvalue() == ""
    p.log(state, metrics, 6.0)
    line = plain.getvalue()
    assert line.startswith("step 3/10 | epoch 0.30 | loss 1.2345") and "1,234 tok/s" in line and line.endswith("\n")
    term = io.StringIO()
    t = engine.ProgressPrinter(10, 5, stream=term, tty=True)
    t._first_step = 0
    t.update(state, metrics, 6.0)
    assert term.getvalue().startswith("\r") and "ETA 0:14" in term.getvalue()
    t.finish()
    assert term.getvalue().endswith("\n")


def test_load_model_and_tokenizer_from_a_built_model(shipped, tmp_path_factory, capfd):
    from transformers.utils import logging as hf_logging

    from hafs.training.demo import build_tiny_model

    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    plan = make_plan(shipped, **{"expert.base_model": str(model_dir), "precision": "bf16"})
    settings = run_settings(plan)
    capfd.readouterr()
    lines = []
    model, tok = model_loading.load_model_and_tokenizer(plan, settings.device, settings.precision, settings,
                                                        log=lines.append)
    # One line of hafs's own instead of transformers' "Loading weights" bar; its other bars are left on.
    assert "Loading weights" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
    weights = "bfloat16" if settings.precision == "bf16" else "float32"  # a CPU without bf16 falls back
    assert lines[0].startswith(f"Model: {model_dir} loaded in ") and lines[0].endswith(f" s ({weights} weights)")
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert next(model.parameters()).dtype == (torch.bfloat16 if settings.precision == "bf16" else torch.float32)
    peft_model = model_loading.apply_lora(model, plan, settings)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)
    out = model_loading.save_adapter(peft_model, tok, tmp_path_factory.mktemp("out"))
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json"} <= names
    # the weights are as readable as the rest of the folder (safetensors writes them through a 0600 temp file)
    assert (out / "adapter_model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777


def test_loading_a_folder_that_is_not_a_model_is_a_config_error_at_the_base_model_key(shipped, tmp_path):
    # transformers raises ValueError("Couldn't instantiate the backend tokenizer...") for an empty folder;
    # that used to surface as "Internal error (a bug in hafs)".
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    plan = make_plan(shipped, **{"expert.base_model": str(empty)})
    with pytest.raises(ConfigError) as info:
        model_loading.load_model_and_tokenizer(plan, "cpu", "fp32")
    (problem,) = info.value.problems
    assert problem.key == f"experts.{plan.expert_name}.base_model"
    assert problem.file == str(CONFIG.resolve()) and problem.line == shipped.line_of(
        ["experts", plan.expert_name, "base_model"])
    assert "no config.json" in problem.message and "*.safetensors" in problem.message


def test_ensure_pad_token_prefers_an_unused_token_over_eos():
    class Tok:
        pad_token_id, eos_token_id, pad_token = None, 0, None

        def get_vocab(self):
            return {"<|endoftext|>": 0, "<|fim_pad|>": 7}

        def __setattr__(self, name, value):
            object.__setattr__(self, name, value)
            if name == "pad_token":
                object.__setattr__(self, "pad_token_id", self.get_vocab()[value])

    tok = Tok()
    note = model_loading.ensure_pad_token(tok)
    assert tok.pad_token_id == 7 and "<|fim_pad|>" in note
    assert model_loading.ensure_pad_token(tok) is None


@pytest.mark.parametrize("length, expected", [({"max_steps": 1}, (2, 0.25)), ({"max_steps": 3}, (6, 0.75)),
                                              ({"max_steps": None, "num_epochs": 1.5}, (8, 1.5)),
                                              ({"max_steps": None, "num_epochs": 2}, (8, 2.0))])
def test_trained_counts_the_samples_and_epochs_a_run_reached(shipped, length, expected):
    # metadata.json used to record the split size and the configured num_epochs: 172 samples and 1.0
    # epochs for a 3-step run that trained on 1,200 tokens (0.07 of an epoch).
    plan = make_plan(shipped, batch_size=2, packing=False, **length)
    split = make_split(LENGTHS, PROMPTS)  # 8 samples in 4 micro-batches of 2
    _, state = run(plan, split)
    source = engine.BatchSource(split, plan, settings=run_settings(plan), pad_id=PAD)
    assert source.trained(state) == expected
    # From the data position alone: a state restored from a checkpoint gives the same figures.
    assert source.trained(engine.TrainState.from_dict(state.to_dict())) == expected


def test_trained_counts_packed_samples_by_example_not_by_row(shipped):
    plan = make_plan(shipped, batch_size=1, packing=True, max_steps=1)
    split = make_split(LENGTHS, PROMPTS)
    _, state = run(plan, split)
    source = engine.BatchSource(split, plan, settings=run_settings(plan), pad_id=PAD)
    samples, epochs = source.trained(state)
    rows = source.rows(0)
    assert epochs == 1 / len(rows) and len(rows) < len(LENGTHS)  # several samples share a packed row
    # the samples counted are the ones whose tokens were trained on
    assert samples == len(rows[0][0]) > 1 and sum(LENGTHS[i] for i in rows[0][0]) == state.tokens
