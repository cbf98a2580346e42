"""Evaluation: loss and perplexity on val/test, and a few generations beside their references.

Run by the recipe before and after training (so the user sees the improvement), during training
for `eval_strategy` (val loss only), and by `hafs eval MODEL_DIR` on any trained model.

Losses are per response token, exactly as in training (prompt and padding are not scored), so
"val loss" here is the number the training loss is comparable to. Generations are greedy and use
the first examples of the test split in file order: the same prompts before and after training,
so their scores can be compared.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

from .errors import ConfigError, Problem, did_you_mean

EVAL_SPLITS = ("val", "test")
MIN_PROMPT_TOKENS = 2
"""Examples whose prompt (tokens before the first scored token) is shorter are not used for
generation: plain-text rows have no prompt, only their first token."""
LCS_MAX_TOKENS = 2000
"""Longer texts are cut before ROUGE-L's quadratic longest-common-subsequence."""


# ----------------------------------------------------------------------------- scores
# Simple overlap scores computed here rather than with rouge-score/nltk/evaluate: no extra
# dependency, no download (nltk data, evaluate's hub scripts), and they are rough signals for a
# quick look at a handful of samples, not benchmark numbers anyone should publish.

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: 'LDA #$01' → ['lda', '#', '$', '01']."""
    return _TOKEN.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 of the bags of words (1.0 when both are empty)."""
    p, r = words(prediction), words(reference)
    if not p or not r:
        return float(p == r)
    from collections import Counter

    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of words, as a harmonic mean of its precision and recall."""
    p, r = words(prediction)[:LCS_MAX_TOKENS], words(reference)[:LCS_MAX_TOKENS]
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal up to whitespace."""
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


SCORES = {"token_f1": token_f1, "rouge_l": rouge_l, "exact_match": exact_match}


def perplexity(loss: float) -> float:
    """exp(loss), inf instead of an overflow."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# ----------------------------------------------------------------------------- evaluation

def _tokenized(split, plan, tokenizer):
    """A TokenizedSplit from a TokenizedSplit or a RawSplit (tokenized here); None stays None."""
    if split is None or hasattr(split, "offsets"):
        return split
    from .tokenize import tokenize_split

    return tokenize_split(split, plan, tokenizer)


def eval_batches(split, plan, pad_id: int, settings=None) -> list[dict]:
    """The split's micro-batches in a fixed order (the loss is a sum, so the order only has to be stable)."""
    from .batching import collate, end_to_end, plan_batches

    packing = settings.packing if settings is not None else plan.packing
    rows = plan_batches(split.lengths, batch_size=plan.batch_size, sequence_length=plan.sequence_length,
                        packing=packing, seed=plan.seed, epoch=0)
    if settings is not None and settings.padding_free:
        rows = [end_to_end(r) for r in rows]
    return [collate(split, r, pad_id) for r in rows]


def split_loss(model, split, plan, tokenizer, settings=None, batches=None) -> dict:
    """{"loss", "perplexity", "tokens", "examples"} of one tokenized split (response tokens only)."""
    from .engine import evaluate_loss

    batches = batches if batches is not None else eval_batches(split, plan, _pad_id(tokenizer), settings)
    loss, tokens = evaluate_loss(model, batches, settings)
    return {"loss": round(loss, 6), "perplexity": round(perplexity(loss), 4), "tokens": int(tokens),
            "examples": len(split)}


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


def generation_examples(split, tokenizer, n: int) -> list[tuple[list[int], str]]:
    """(prompt ids, reference text) of the first `n` usable examples, in file order.

    Taken from the tokenized example itself: the prompt is everything before the first scored
    token (exactly what the model saw in training, template included), the reference is the
    scored tokens without the final EOS.
    """
    out = []
    eos = tokenizer.eos_token_id
    for i in range(len(split)):
        if len(out) >= n:
            break
        ids, mask = split.example(i)
        scored = mask.nonzero()[0]
        if len(scored) == 0 or scored[0] < MIN_PROMPT_TOKENS:
            continue
        reference = ids[scored].tolist()
        if reference and reference[-1] == eos:
            reference = reference[:-1]
        out.append((ids[:scored[0]].tolist(), tokenizer.decode(reference, skip_special_tokens=True)))
    return out


def generate_text(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, streamer=None,
                  settings=None) -> str:
    """Greedy continuation of `prompt_ids` (stops at EOS), decoded without special tokens.

    Under the run's autocast, as in training: half-precision base weights meet fp32 LoRA weights.
    """
    import contextlib

    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    autocast = settings.autocast() if settings is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), autocast:
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 temperature=None, top_p=None, top_k=None, use_cache=True,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=_pad_id(tokenizer),
                                 streamer=streamer)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, input_ids.shape[1]:].tolist(), skip_special_tokens=True)


def evaluate_model(model, tokenizer, plan, splits: dict, *, generations: int = 3, max_new_tokens: int = 64,
                   settings=None, log=print) -> dict:
    """Loss/perplexity on val and test, and `generations` greedy samples from test (val if no test).

    `splits` maps "val"/"test" to TokenizedSplit, RawSplit or None. A missing split is skipped with
    a notice and recorded under "skipped". Returns a JSON-able dict:
    {"val": {...}|None, "test": {...}|None, "generations": [...], "generation_scores": {...}, "skipped": {...}}.
    """
    results: dict = {"val": None, "test": None, "generations": [], "generation_scores": {}, "skipped": {}}
    tokenized = {}
    for name in EVAL_SPLITS:
        split = _tokenized(splits.get(name), plan, tokenizer)
        tokenized[name] = split
        if split is None:
            results["skipped"][name] = f"no {name} split in {plan.dataset_dir}"
            log(f"note: no {name} split; {name} loss skipped")
            continue
        results[name] = split_loss(model, split, plan, tokenizer, settings)
    source = "test" if tokenized["test"] is not None else "val"
    if generations > 0 and tokenized[source] is not None:
        for prompt_ids, reference in generation_examples(tokenized[source], tokenizer, generations):
            text = generate_text(model, tokenizer, prompt_ids, max_new_tokens, settings=settings)
            item = {"split": source, "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True),
                    "reference": reference, "generated": text}
            item.update({k: round(fn(text, reference), 4) for k, fn in SCORES.items()})
            results["generations"].append(item)
        if results["generations"]:
            n = len(results["generations"])
            results["generation_scores"] = {k: round(sum(g[k] for g in results["generations"]) / n, 4)
                                            for k in SCORES}
            results["generation_scores"]["count"] = n
    return results


def compare(before: dict | None, after: dict | None) -> dict:
    """What training changed: per split loss/perplexity before and after, and the generation scores."""
    out: dict = {}
    if not before or not after:
        return out
    for name in EVAL_SPLITS:
        b, a = before.get(name), after.get(name)
        if not b or not a:
            continue
        out[name] = {"loss_before": b["loss"], "loss_after": a["loss"],
                     "loss_change": round(a["loss"] - b["loss"], 6),
                     "loss_change_pct": round(100 * (a["loss"] - b["loss"]) / b["loss"], 2) if b["loss"] else None,
                     "perplexity_before": b["perplexity"], "perplexity_after": a["perplexity"],
                     "improved": a["loss"] < b["loss"]}
    sb, sa = before.get("generation_scores") or {}, after.get("generation_scores") or {}
    scores = {k: {"before": sb[k], "after": sa[k]} for k in SCORES if k in sb and k in sa}
    if scores:
        out["generation"] = scores
    return out


def summary(results: dict) -> dict:
    """One evaluation without the generated texts (for metadata.json)."""
    return {k: v for k, v in results.items() if k != "generations"}


def describe(results: dict, label: str = "") -> str:
    """'eval after: val loss 2.1034 (ppl 8.19), test loss 2.2001 (ppl 9.03), 3 generations: token F1 ...'."""
    parts = [f"{name} loss {r['loss']:.4f} (ppl {r['perplexity']:.2f})" for name in EVAL_SPLITS
             if (r := results.get(name))]
    scores = results.get("generation_scores") or {}
    if scores:
        parts.append(f"{scores['count']} generations: token F1 {scores['token_f1']:.3f}, "
                     f"ROUGE-L {scores['rouge_l']:.3f}, exact {scores['exact_match']:.2f}")
    head = f"eval {label}: " if label else "eval: "
    return head + (", ".join(parts) or "nothing to evaluate (no val/test split)")


def write_eval(model_dir: Path, results: dict, *, folder: str = "eval") -> dict:
    """Write `<folder>/results.json` and `<folder>/generations.jsonl`; returns the summary for metadata.

    `results` is one `evaluate_model` result, or {"before": ..., "after": ..., ...} of several; each
    generation line says which evaluation it came from ("when").
    """
    from .outputs import atomic_write_bytes, atomic_write_json

    out = Path(model_dir) / folder
    out.mkdir(parents=True, exist_ok=True)
    several = {k: v for k, v in results.items() if isinstance(v, dict) and "generations" in v}
    lines = [json.dumps({"when": when, **g}, ensure_ascii=False)
             for when, result in (several or {"result": results}).items() for g in result.get("generations") or []]
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "generations.jsonl", ("\n".join(lines) + "\n" if lines else "").encode())
    meta = {k: (summary(v) if k in several else v) for k, v in results.items()} if several else summary(results)
    meta["files"] = {"results": f"{folder}/results.json", "generations": f"{folder}/generations.jsonl"}
    return meta


class Evaluator:
    """What the recipe holds: before/after evaluations, the val loss during training, and the files."""

    def __init__(self, plan, prepared, tokenizer, settings=None, *, generations: int = 3, max_new_tokens: int = 64,
                 log=print):
        self.plan, self.tokenizer, self.settings, self.log = plan, tokenizer, settings, log
        self.splits = {"val": getattr(prepared, "val", None), "test": getattr(prepared, "test", None)}
        self.generations, self.max_new_tokens = generations, max_new_tokens
        self._val_batches = None
        # engine.train calls eval_fn only when it is set: no val split, no evaluation during training.
        self.val_loss = self._val_loss if self.splits["val"] is not None else None

    def run(self, model, label: str) -> dict:
        """A full evaluation, printed as one line."""
        results = evaluate_model(model, self.tokenizer, self.plan, self.splits, generations=self.generations,
                                 max_new_tokens=self.max_new_tokens, settings=self.settings, log=self.log)
        self.log(describe(results, label))
        return results

    def _val_loss(self, model) -> tuple[float, int]:
        """(val loss, tokens) for engine.train's eval_fn; the batches are collated once."""
        from .engine import evaluate_loss

        if self._val_batches is None:
            self._val_batches = eval_batches(self.splits["val"], self.plan, _pad_id(self.tokenizer), self.settings)
        return evaluate_loss(model, self._val_batches, self.settings)

    def write(self, model_dir: Path, before: dict | None, after: dict | None) -> dict:
        """eval/ files in the model folder; returns metadata.json's "evaluation"."""
        results = {"dataset": self.plan.dataset_name, "before": before, "after": after,
                   "comparison": compare(before, after)}
        change = results["comparison"].get("val") or results["comparison"].get("test")
        if change:
            self.log(f"eval: loss {change['loss_before']:.4f} -> {change['loss_after']:.4f} "
                     f"({change['loss_change_pct']:+.1f}%)")
        return write_eval(model_dir, {k: v for k, v in results.items() if v is not None})


# ----------------------------------------------------------------------------- `hafs eval MODEL_DIR`

def plan_for_dataset(plan, dataset: str | None, config_path: str | None):
    """The model's plan, switched to another dataset of the config when `dataset` names one."""
    if not dataset or dataset == plan.dataset_name:
        return plan
    import copy

    from .loader import load_config
    from .plan import resolve_path

    cfg = load_config(config_path)
    if dataset not in cfg.datasets:
        raise ConfigError([Problem(f"dataset '{dataset}' not found{did_you_mean(dataset, cfg.datasets)}",
                                   key="--dataset", file=cfg.path,
                                   hint=f"datasets in the config: {', '.join(sorted(cfg.datasets)) or 'none'}")])
    plan = copy.deepcopy(plan)
    plan.dataset_name, plan.dataset = dataset, copy.deepcopy(cfg.datasets[dataset])
    plan.dataset_dir = str(resolve_path(plan.dataset.path, Path(cfg.path).resolve().parent))
    return plan


def evaluate_dir(model_dir: Path, *, dataset: str | None = None, config_path: str | None = None,
                 generations: int = 3, max_new_tokens: int = 64, log=print) -> dict:
    """Re-evaluate a trained model folder (adapter on, and off for the base model's figures).

    Writes `eval/<dataset>/` (the name made a safe folder name) and updates metadata.json's
    evaluation.reruns.<dataset> atomically; the training-time results stay as they were.
    Returns {"base": ..., "model": ..., "comparison": ...}.
    """
    from . import data
    from .generate import load_trained_model, model_plan
    from .outputs import atomic_write_json, read_metadata, safe_component

    model_dir = Path(model_dir)
    plan = plan_for_dataset(model_plan(model_dir)[1], dataset, config_path)  # a wrong --dataset: before loading
    model, tokenizer, _, meta, settings = load_trained_model(model_dir, log=log)
    splits = {name: data.read_split(plan, name) for name in EVAL_SPLITS}
    if all(s is None for s in splits.values()):
        raise ConfigError([Problem(f"dataset '{plan.dataset_name}' has no val or test split to evaluate on",
                                   file=plan.dataset_dir, key=f"datasets.{plan.dataset_name}",
                                   hint="add val.jsonl / test.jsonl, or pick another --dataset")])
    kw = dict(generations=generations, max_new_tokens=max_new_tokens, settings=settings, log=log)
    with model.disable_adapter():
        base = evaluate_model(model, tokenizer, plan, splits, **kw)
    log(describe(base, "base model"))
    tuned = evaluate_model(model, tokenizer, plan, splits, **kw)
    log(describe(tuned, "with adapter"))
    results = {"dataset": plan.dataset_name, "dataset_dir": plan.dataset_dir, "before": base, "after": tuned,
               "comparison": compare(base, tuned), "evaluated": dt.datetime.now().isoformat(timespec="seconds")}
    # A dataset's name is a TOML key, which may hold '/' or '..': it names a folder only once made safe.
    folder = f"eval/{safe_component(plan.dataset_name, fallback='dataset')}"
    summary_ = write_eval(model_dir, results, folder=folder)
    meta = read_metadata(model_dir) or meta  # re-read: keep anything written since we loaded
    evaluation = meta.get("evaluation") if isinstance(meta.get("evaluation"), dict) else {}
    evaluation.setdefault("reruns", {})[plan.dataset_name] = summary_
    meta["evaluation"] = evaluation
    atomic_write_json(model_dir / "metadata.json", meta)
    log(f"Results: {model_dir / folder / 'results.json'}")
    return results


def cmd_eval(args) -> int:
    """`hafs eval MODEL_DIR [--dataset NAME]` and `train.py --eval MODEL_DIR`."""
    results = evaluate_dir(Path(args.model_dir), dataset=getattr(args, "dataset", None),
                           config_path=getattr(args, "config", None),
                           log=(lambda *_: None) if getattr(args, "json", False) else print)
    if getattr(args, "json", False):
        print(json.dumps(results, indent=2, default=str))
    return 0
