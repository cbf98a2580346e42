"""`--list-presets|experts|hardware|datasets`: tables for people, JSON for scripts. Pure Python."""

from __future__ import annotations

import dataclasses
import json

from .errors import ConfigError
from .schema import TrainingFile


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*(str(x) for x in r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def preset_status(cfg: TrainingFile, name: str) -> tuple[bool, str]:
    """(resolves?, first problem) — so the list shows which presets can run as configured."""
    from .plan import resolve

    try:
        resolve(cfg, name)
        return True, ""
    except ConfigError as exc:
        return False, exc.problems[0].message if exc.problems else str(exc)


def render_list(cfg: TrainingFile, what: str, as_json: bool = False) -> str:
    if what == "presets":
        items = []
        for name, p in cfg.presets.items():
            ok, why = preset_status(cfg, name)
            items.append({"name": name, **dataclasses.asdict(p), "valid": ok, "problem": why})
        if as_json:
            return json.dumps(items, indent=2)
        rows = [[i["name"], i["expert"], i["hardware"], i["dataset"], i["lora"], i["hyperparameters"],
                 i["sequence_length"] or "profile", f"{i['batch_size'] or '-'}x{i['gradient_accumulation'] or '-'}",
                 "ok" if i["valid"] else "INVALID: " + i["problem"]] for i in items]
        head = f"Presets in {cfg.path} ({len(items)}):\n"
        return head + _table(["preset", "expert", "hardware", "dataset", "lora", "hyperparams", "seq",
                              "batch x accum", "status"], rows)
    section = {"experts": cfg.experts, "hardware": cfg.hardware, "datasets": cfg.datasets}[what]
    if as_json:
        return json.dumps({k: dataclasses.asdict(v) for k, v in section.items()}, indent=2)
    if what == "experts":
        rows = [[k, e.display_name, e.role, e.group, e.base_model, e.context_window, e.specialization[:50]]
                for k, e in section.items()]
        return _table(["expert", "display name", "role", "group", "base model", "context", "specialization"], rows)
    if what == "hardware":
        rows = [[k, h.name, h.device, h.available_memory_gb, h.max_batch_size, h.max_sequence_length,
                 h.max_lora_rank, "bf16" if h.supports_bf16 else "fp16" if h.supports_fp16 else "fp32",
                 f"{h.num_gpus}x{h.num_nodes}" if h.num_gpus * h.num_nodes > 1 else "1",
                 h.status + (f" ({h.reason})" if h.reason else "")]
                for k, h in section.items()]
        return _table(["profile", "name", "device", "mem GiB", "max batch", "max seq", "max r", "precision",
                       "gpus", "status"], rows)
    rows = [[k, d.path, d.quality_threshold if d.quality_threshold is not None else "-",
             ",".join(d.domains) or "all", d.description[:50]] for k, d in section.items()]
    return _table(["dataset", "path", "quality >=", "domains", "description"], rows)
