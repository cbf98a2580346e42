"""The rows hafs is compared with (the user's earlier Trainer + peft, TRL's SFTTrainer), and the val loss
every row is scored by, the same way for all: the fp32 base model + the row's trained adapter.
"""

from __future__ import annotations

import json
import time

from fixture import TEMPLATE


def adapter_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True).float() for k, v in get_peft_model_state_dict(model).items()}


def train_earlier(plan, prepared, tok, root, device):
    """The user's earlier trainer: pad to sequence_length, labels everywhere, fp32, HF Trainer."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    split, seq, pad = prepared.train, plan.sequence_length, tok.pad_token_id

    class Padded(torch.utils.data.Dataset):
        def __len__(self):
            return len(split)

        def __getitem__(self, i):
            ids = torch.full((seq,), pad, dtype=torch.long)
            ex = torch.from_numpy(split.example(i)[0].astype("int64"))
            ids[:len(ex)] = ex
            mask = torch.zeros(seq, dtype=torch.long)
            mask[:len(ex)] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}

    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    model = get_peft_model(model, lora_config(plan))
    args = TrainingArguments(output_dir=str(root / "runs" / "earlier"), per_device_train_batch_size=plan.batch_size,
                             num_train_epochs=1, learning_rate=plan.learning_rate, lr_scheduler_type="linear",
                             warmup_steps=0, weight_decay=0.0, logging_steps=10**6, save_strategy="no",
                             report_to=[], seed=42, use_cpu=device == "cpu", dataloader_num_workers=0,
                             disable_tqdm=True, max_steps=plan.max_steps or -1)
    seen = [0]

    def collate(examples):
        seen[0] += sum(int(e["attention_mask"].sum()) for e in examples)
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}

    trainer = Trainer(model=model, args=args, train_dataset=Padded(), data_collator=collate)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return adapter_state(model), seconds, {"settings": "fp32, padded to sequence_length, loss on all tokens",
                                           "cpu_seconds": cpu,
                                           "tokens_seen": seen[0]}


def lora_config(plan):
    from peft import LoraConfig

    return LoraConfig(r=plan.lora.r, lora_alpha=plan.lora.lora_alpha, lora_dropout=plan.lora.lora_dropout,
                      target_modules=list(plan.lora.target_modules), bias="none", task_type="CAUSAL_LM")


def train_trl(plan, spec, root, row, device):
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from hafs.training.templates import fill_template

    rows = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    data = Dataset.from_list([{"prompt": fill_template(TEMPLATE, r["instruction"], r["input"]),
                               "completion": r["output"]} for r in rows])
    extra = {}
    if row == "trl-nogc":
        extra["gradient_checkpointing"] = False
    if row == "trl-liger":
        extra["use_liger_kernel"] = True
    args = SFTConfig(output_dir=str(root / "runs" / row), per_device_train_batch_size=plan.batch_size,
                     num_train_epochs=1, learning_rate=plan.learning_rate, lr_scheduler_type="linear",
                     warmup_steps=0, weight_decay=0.0, max_length=plan.sequence_length, logging_steps=10**6,
                     save_strategy="no", report_to=[], seed=42, use_cpu=device == "cpu", disable_tqdm=True,
                     max_steps=plan.max_steps or -1, **extra)
    trainer = SFTTrainer(model=str(root / "model"), args=args, train_dataset=data, peft_config=lora_config(plan))
    seen, collator = [0], trainer.data_collator

    def counting(examples):
        seen[0] += sum(len(e["input_ids"]) for e in examples)
        return collator(examples)

    trainer.data_collator = counting
    if device == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    settings = (f"bf16={args.bf16}, gradient_checkpointing={args.gradient_checkpointing}, "
                f"packing={args.packing}, padding_free={args.padding_free}")
    return adapter_state(trainer.model), seconds, {"settings": settings, "tokens_seen": seen[0], "cpu_seconds": cpu}


def val_loss(plan, prepared, root, adapter: dict, device: str) -> float:
    """Mean CE per response token on val: the base model as saved (fp32 compute) + the row's adapter."""
    import gc

    import torch
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from hafs.training.batching import collate, plan_batches
    from hafs.training.engine import evaluate_loss

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, lora_config(plan))
    set_peft_model_state_dict(model, adapter)
    model.to(device)
    split = prepared.val
    rows = plan_batches(split.lengths, batch_size=4, sequence_length=plan.sequence_length, packing=False,
                        seed=0, epoch=0)
    batches = [collate(split, r, 1) for r in rows]
    loss, _ = evaluate_loss(model, batches)
    return loss

