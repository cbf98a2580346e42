"""`hafs generate MODEL_DIR "instruction"`: try a trained expert, reply streamed as it is generated.

The prompt is built exactly as in training (the expert's template via `data.render`, tokenized
like `tokenize.py` does: the tokenizer's prefix, then the prompt without special tokens), so what
the model sees is what it learned on. Decoding is greedy: the same question gives the same answer,
which is what you want when comparing two adapters.

`load_trained_model` (base model + adapter of a model folder) is also what `hafs eval` and
`hafs merge` load models with.

`--interactive` keeps a conversation: each new message is rendered as a chat row whose earlier
turns are the history (the tokenizer's chat template when it has one, else the expert's template
with the history as its input), the same way chat rows are rendered for training.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

from .errors import ConfigError, Problem
from .faults import Terminated

HELP = "commands: /input TEXT (input for the next message), /reset (forget the conversation), /exit"


def model_plan(model_dir: Path):
    """(metadata, TrainingConfig) a model was trained with; ConfigError when the folder cannot tell."""
    from .outputs import read_metadata
    from .plan import TrainingConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError([Problem("model directory not found", file=str(model_dir),
                                   hint="hafs models   lists the trained models")])
    meta = read_metadata(model_dir)
    if not isinstance(meta, dict):
        raise ConfigError([Problem("not a finished hafs model: metadata.json is missing or unreadable",
                                   file=str(model_dir / "metadata.json"),
                                   hint="an interrupted save leaves such a folder; train again or remove it")])
    if not isinstance(meta.get("config"), dict):
        raise ConfigError([Problem("metadata.json has no 'config' (the resolved plan), so the model's base "
                                   "model and template are unknown", file=str(model_dir / "metadata.json"),
                                   hint="train with [output.metadata] include_hyperparameters = true")])
    try:
        plan = TrainingConfig.from_dict(meta["config"])
    except (TypeError, KeyError, ValueError) as exc:
        raise ConfigError([Problem(f"metadata.json 'config' does not describe a plan: {exc}",
                                   file=str(model_dir / "metadata.json"))]) from None
    return meta, plan


def load_trained_model(model_dir: Path, *, device: str | None = None, precision: str | None = None,
                       packing: bool | None = None, log=print):
    """(peft model in eval mode, tokenizer, plan, metadata, RunSettings) for a trained model folder.

    The base model comes from the plan (`hafs-demo/*` is rebuilt locally, so this works offline for
    the demo); the tokenizer is the one saved beside the adapter. `device` defaults to the best one
    here (a Mac-trained model evaluates fine on a CUDA box), `precision` to the plan's where supported.
    `packing=False` loads with a stock attention kernel (generation, merging: nothing is packed, and
    a merged model must not name hafs' own kernel); None follows the plan (evaluation batches).
    """
    from peft import PeftModel

    from . import model_loading
    from .precision import run_settings

    model_dir = Path(model_dir)
    meta, plan = model_plan(model_dir)
    if not (model_dir / "adapter_config.json").is_file():
        raise ConfigError([Problem("no adapter_config.json: not a LoRA model directory", file=str(model_dir))])
    run_plan = dataclasses.replace(plan, device=device or "auto", precision=precision or plan.precision,
                                   packing=plan.packing if packing is None else packing)
    settings = run_settings(run_plan)
    for note in settings.notes:
        log(f"note: {note}")
    model, tokenizer = model_loading.load_model_and_tokenizer(run_plan, settings.device, settings.precision,
                                                              settings, log=log)
    if any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=plan.expert.trust_remote_code)
        model_loading.ensure_pad_token(tokenizer, model)
    with warnings.catch_warnings():
        # peft probes transformers' deprecated `is_gradient_checkpointing`: not the user's concern.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(model, model_dir, is_trainable=False)
    model.eval()
    return model, tokenizer, plan, meta, settings


def prompt_ids(plan, tokenizer, instruction: str, input_text: str = "",
               history: list[tuple[str, str]] | None = None) -> list[int]:
    """Token ids of the prompt for `instruction` (and `input_text`) after the turns in `history`."""
    from .data import Sample, render
    from .tokenize import special_prefix

    if history:
        messages = []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        content = instruction + (f"\n\n{input_text}" if input_text.strip() else "")
        # The last message is the (still empty) answer: render() returns everything before it.
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
        sample = Sample(format="chat", line=0, messages=messages)
    else:
        sample = Sample(format="alpaca", line=0, instruction=instruction, input=input_text)
    prompt, _ = render(sample, plan.expert, tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # Chat-template prompts carry their own special tokens (as in tokenize.py); others get the prefix.
    prefix = [] if sample.format == "chat" and getattr(tokenizer, "chat_template", None) else special_prefix(tokenizer)
    return list(prefix) + list(ids)


def reply(model, tokenizer, ids: list[int], max_new_tokens: int, *, stream: bool = True, settings=None) -> str:
    """Greedy reply to `ids`; with `stream`, printed to stdout token by token as it comes."""
    from .evaluate import generate_text

    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate_text(model, tokenizer, ids, max_new_tokens, streamer=streamer, settings=settings)


def interactive(model, tokenizer, plan, *, max_new_tokens: int, input_text: str = "", first: str | None = None,
                ask=input, out=print, settings=None) -> list[tuple[str, str]]:
    """The conversation loop (ends on /exit, an empty line twice, or end of input); returns the turns."""
    history: list[tuple[str, str]] = []
    pending_input = input_text
    out(f"Talking to {plan.expert.display_name}. {HELP}")
    queue = [first] if first else []
    blank = 0
    while True:
        if queue:
            line = queue.pop(0)
        else:
            try:
                line = ask("you> ")
            except Terminated:  # a SIGTERM ends the program (exit 143), not only the conversation
                raise
            except (EOFError, KeyboardInterrupt):
                out("")
                break
        text = line.strip()
        if not text:
            blank += 1
            if blank >= 2:
                break
            continue
        blank = 0
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            out("(conversation cleared)")
            continue
        if text.startswith("/input"):
            pending_input = text[len("/input"):].strip()
            out("(input set for the next message)")
            continue
        if text.startswith("/"):
            out(HELP)
            continue
        ids = prompt_ids(plan, tokenizer, text, pending_input, history)
        pending_input = ""
        out("expert> ", end="")
        answer = reply(model, tokenizer, ids, max_new_tokens, settings=settings)
        history.append((text, answer.strip()))
    return history


def cmd_generate(args) -> int:
    """`hafs generate MODEL_DIR ["instruction"] [--input TEXT] [--max-new-tokens N] [--interactive]`."""
    if not args.instruction and not args.interactive:
        raise ConfigError([Problem("give an instruction, or --interactive for a conversation",
                                   hint='hafs generate MODEL_DIR "Write a routine that clears WRAM"')])
    if args.max_new_tokens < 1:
        raise ConfigError([Problem(f"must be >= 1, got {args.max_new_tokens}", key="--max-new-tokens")])
    quiet = bool(getattr(args, "json", False))
    note = (lambda *a, **k: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    model, tokenizer, plan, meta, settings = load_trained_model(Path(args.model_dir), packing=False, log=note)
    note(f"{Path(args.model_dir).name}: {plan.expert.display_name} on {plan.expert.base_model} ({settings.device})")
    if args.interactive:
        interactive(model, tokenizer, plan, max_new_tokens=args.max_new_tokens, input_text=args.input,
                    first=args.instruction, settings=settings)
        return 0
    ids = prompt_ids(plan, tokenizer, args.instruction, args.input)
    if quiet:
        text = reply(model, tokenizer, ids, args.max_new_tokens, stream=False, settings=settings)
        print(json.dumps({"model": str(args.model_dir), "prompt": tokenizer.decode(ids), "reply": text},
                         indent=2, ensure_ascii=False))
    else:
        reply(model, tokenizer, ids, args.max_new_tokens, settings=settings)
    return 0
