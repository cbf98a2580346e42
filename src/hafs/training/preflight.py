"""The checks a plan must pass on this machine before any model loads, and the presets ranked for it.

Every rule reads a `hardware.Capabilities` value (plain data), so each one is tested on any machine
with fakes. Nothing here imports torch or transformers: pre-flight runs before the first download.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, HardwareError, Problem
from .hardware import CU128_HINT, DEVICE_ORDER, Capabilities, build_phrase, install_hint
from .outputs import folder_problem


@dataclass
class Preflight:
    """Result of checking a plan against the machine: what will run, or why it cannot."""

    device: str
    """Device kind the run uses (`auto` resolved)."""
    precision: str
    """Precision the run uses (bf16 becomes fp32 on a CPU without bf16 instructions)."""
    problems: list[Problem] = field(default_factory=list)
    """Reasons the run cannot start; empty when it can."""
    notes: list[str] = field(default_factory=list)
    """Changes made and things worth knowing (precision downgraded, a GPU skipped)."""

    def raise_for_problems(self, preset: str = "") -> Preflight:
        """HardwareError listing every problem, if there are any."""
        if self.problems:
            machine = any(p.key.startswith("hardware.") for p in self.problems)
            title = f"Preset '{preset}' cannot run" + (" on this machine:" if machine else ":")
            raise HardwareError(self.problems, title=title if preset else "")
        return self


def _device_check(hw, caps: Capabilities) -> tuple[str, list[tuple[str, str]], list[str]]:
    """(device, [(why, hint)], notes) for a hardware profile on this machine."""
    want, notes = hw.device, []
    if want == "auto":
        device = caps.best_device()
        skipped = [g for g in caps.gpus if not g.supported_by_build]
        if skipped and device != "cuda":
            notes.append(f"{skipped[0].name} ({skipped[0].sm}) skipped: {build_phrase(caps)} has no kernels "
                         f"for it; {install_hint(skipped[0].capability)}")
        return device, [], notes
    if want == "cuda":
        if not caps.gpus:
            why = ("no CUDA GPU is visible" if caps.torch_cuda_version
                   else f"no CUDA GPU is usable: {build_phrase(caps)} is a CPU-only build")
            hint = ""
            if not caps.torch_cuda_version and caps.os != "Darwin":
                hint = CU128_HINT + " if this machine has an NVIDIA GPU"
            return "cuda", [(why, hint)], notes
        usable = caps.usable_gpus()
        if not usable:
            g = caps.gpus[0]
            return "cuda", [((f"{g.name} has CUDA capability {g.sm}, which {build_phrase(caps)} has no kernels "
                             f"for (built for {' '.join(caps.cuda_arch_list) or 'unknown targets'})"),
                             install_hint(g.capability))], notes
        if len(usable) < len(caps.gpus):
            bad = [g for g in caps.gpus if not g.supported_by_build]
            notes.append(f"GPU {', '.join(f'{g.index} ({g.name}, {g.sm})' for g in bad)} unsupported by this "
                         f"build; set CUDA_VISIBLE_DEVICES={','.join(str(g.index) for g in usable)}")
        if hw.num_gpus > len(usable):
            return "cuda", [(f"the profile asks for {hw.num_gpus} GPUs per node, this machine has {len(usable)}",
                             "use a single-GPU profile here, or launch on a machine with enough GPUs")], notes
        return "cuda", [], notes
    if want == "mps":
        if caps.os != "Darwin":
            return "mps", [(f"MPS needs macOS on Apple silicon; this machine runs {caps.os or 'another OS'}",
                            "")], notes
        if not caps.mps.available:
            why = "MPS is not available" + (" (this torch build lacks it)" if not caps.mps.built else
                                            f" (macOS {caps.mps.macos_version}; MPS needs 12.3+ on Apple silicon)")
            return "mps", [(why, "")], notes
    return want, [], notes


def _precision_check(hw, device: str, precision: str, caps: Capabilities, preset_key: str):
    """(precision, [(why, hint)], notes)."""
    if device == "cpu":
        if precision in ("bf16", "fp16") and not (caps.cpu.bf16_fast if precision == "bf16" else caps.cpu.fp16_fast):
            isa = "AVX512-BF16 or AMX" if precision == "bf16" else "AVX512-FP16"
            return "fp32", [], [(f"{precision} requested but this CPU ({caps.cpu.model_name or caps.cpu.arch}) has no "
                                f"{isa}: training in fp32 (emulated {precision} would be slower)")]
        return precision, [], []
    if precision != "bf16":
        return precision, [], []
    lacking = ""
    if device == "cuda":
        gpu = next((g for g in caps.usable_gpus() if not g.bf16), None)
        if gpu:
            lacking = f"{gpu.name} ({gpu.sm}) has no bf16: it needs compute capability 8.0 or newer"
    elif device == "mps" and not caps.mps.bf16:
        lacking = f"MPS on macOS {caps.mps.macos_version or '?'} has no bf16 (it needs macOS 14 or newer)"
    if not lacking:
        return precision, [], []
    if hw.device == "auto":  # the user did not pin the device: adapt instead of refusing
        fallback = "fp16" if hw.supports_fp16 else "fp32"
        return fallback, [], [f"{lacking}; training in {fallback}"]
    return precision, [(lacking, (f'set precision = "fp16" in [presets.{preset_key}], or supports_bf16 = false '
                                 f'in the hardware profile so "auto" picks fp16'))], []


def preflight(plan, caps: Capabilities, cfg=None, *, suggest: bool = True, paths: bool = True,
              register: bool | None = None, hub: bool = False) -> Preflight:
    """Check a resolved TrainingConfig against the machine, before any download or model load.

    Problems read `Hardware <profile name> is unsupported: <why>`; their hint names the presets of `cfg`
    (the TrainingFile, loaded from plan.config_path when not given) that do fit this machine.
    With `paths`, the output folders and the model registry (`register` as RunOptions.register) are
    checked too: they are only written after training, when a failure would cost the whole run.
    With `hub`, a hub base model not in the local cache must be downloadable (a second's probe of the
    network). Otherwise reads the plan, `caps` and the file system only (no transformers, no model).
    """
    hw = plan.hardware
    device, whys, notes = _device_check(hw, caps)
    precision, more, pnotes = _precision_check(hw, device, plan.precision, caps, plan.preset) if not whys else \
        (plan.precision, [], [])
    whys, notes = whys + more, notes + pnotes
    problems = []
    if whys:
        cfg = cfg if cfg is not None else _config_of(plan)
        line = cfg.line_of(["presets", plan.preset, "hardware"]) if cfg is not None else None
        fitting = _fitting_presets(plan, cfg, caps) if suggest else []
        for why, hint in whys:
            alt = "" if not suggest else (f"presets that fit this machine: {', '.join(fitting)}" if fitting else
                   "no preset fits this machine; `--detect` prints a hardware profile for it")
            problems.append(Problem(f"Hardware {hw.name} is unsupported: {why}", key=f"hardware.{plan.hardware_name}",
                                    file=plan.config_file(),
                                    line=line, hint="; or ".join(h for h in (hint, alt) if h)))
    if paths:
        problems += output_problems(plan, cfg=cfg) + registry_problems(plan, register)
    if hub:
        from .model_config import base_model_problem

        missing = base_model_problem(plan.expert.base_model, f"experts.{plan.expert_name}.base_model")
        if missing:
            source = cfg if cfg is not None else _config_of(plan)
            problems.append(dataclasses.replace(missing, file=source.path, line=source.line_of(
                ["experts", plan.expert_name, "base_model"])) if source is not None else missing)
    return Preflight(device=device, precision=precision, problems=problems, notes=notes)


OUTPUT_DIRS = (("models_dir", "the trained model"), ("checkpoints_dir", "checkpoints"),
               ("logs_dir", "tracker logs and hafs tune studies"))

# Folders whose every sub-folder hafs takes for its own, so no other output folder may be one of them or lie
# inside one: what each would do to a folder that is not its own.
OWNED_DIRS = {
    "models_dir": "`hafs models` takes every folder in output.models_dir for a model: it would list what "
                  "output.{inner} holds as unusable models, and `hafs models rm` would delete it",
    "checkpoints_dir": "output.checkpoints_dir holds one folder per training run, to be deleted when the runs "
                       "are done: what output.{inner} holds would go with them",
}


def output_problems(plan, keys: tuple[str, ...] | None = None, cfg=None) -> list[Problem]:
    """Output folders that cannot be created or written, or that overlap, as Problems naming their `output.*` keys.

    `keys`: the folders the command writes; by default models_dir, checkpoints_dir, and logs_dir when a
    tracker writes there. `cfg`: the TrainingFile (for lines; loaded from plan.config_path when not given).
    """
    if keys is None:
        keys = ("models_dir", "checkpoints_dir") + (("logs_dir",) if plan.report_to else ())
    keys = tuple(key for key, _ in OUTPUT_DIRS if key in keys)
    if cfg is None and plan.config_file():
        cfg = _config_of(plan)
    lines = {key: _output_line(plan, cfg, key) for key in keys}
    problems = []
    for key, what in OUTPUT_DIRS:
        why = folder_problem(Path(getattr(plan.output, key))) if key in keys else ""
        if why:
            problems.append(Problem(f"{why}: {what} cannot be saved there", key=f"output.{key}",
                                    file=plan.config_file(), line=lines[key],
                                    hint=f"set output.{key} to a folder hafs can create or write to "
                                         f"(in [output] or with --set output.{key}=PATH)"))
    return problems + _overlap_problems(plan, keys, lines)


def _overlap_problems(plan, keys: tuple[str, ...], lines: dict) -> list[Problem]:
    """One Problem per pair of output folders that are the same, or one inside a folder of OWNED_DIRS."""
    real = {key: Path(os.path.realpath(getattr(plan.output, key))) for key in keys}  # a symlink is its target
    problems = []
    for i, first in enumerate(keys):
        for second in keys[i + 1:]:
            if real[first] == real[second]:  # reported at the later key; the reason is the owner's
                inner, outer, owner, how = second, first, first if first in OWNED_DIRS else second, "is also"
            elif real[first] in real[second].parents:
                inner, outer, owner, how = second, first, first, "is inside"
            elif real[second] in real[first].parents:
                inner, outer, owner, how = first, second, second, "is inside"
            else:
                continue
            if owner not in OWNED_DIRS:  # only logs_dir's own sub-folders: trackers add theirs beside them
                continue
            at = [f"{plan.config_file()}:{lines[outer]}"] if plan.config_file() and lines[outer] else []
            if how == "is inside":
                at.insert(0, getattr(plan.output, outer))
            problems.append(Problem(
                f"{getattr(plan.output, inner)} {how} output.{outer}" + (f" ({', '.join(at)})" if at else "")
                + ": " + OWNED_DIRS[owner].format(inner=inner),
                key=f"output.{inner}", file=plan.config_file(), line=lines[inner],
                hint=f"give output.{inner} and output.{outer} separate folders, neither inside the other "
                     "(as the shipped config does: models, checkpoints and logs side by side)"))
    return problems


def _output_line(plan, cfg, key: str) -> int | None:
    """Line of `output.<key>` in the config; None when the plan's folder is not the file's (a --set override)."""
    if cfg is None:
        return None
    from .plan import resolve_path

    if str(resolve_path(getattr(cfg.output, key), plan.config_dir())) != getattr(plan.output, key):
        return None
    return cfg.line_of(["output", key])


def registry_problems(plan, register: bool | None = None) -> list[Problem]:
    """A model registry that the update after training would refuse (None: only a configured one)."""
    if register is False or not (register or plan.output.registry):
        return []
    from . import user_registry

    path = user_registry.resolve_registry(plan)
    problems = user_registry.registry_problems(path, plan.expert_name)
    why = folder_problem(path.parent)
    if why:
        problems.append(Problem(f"{why}: the model registry cannot be updated there", key="output.registry",
                                file=plan.config_file(), hint="set output.registry to a file in a writable folder, "
                                                     "or pass --no-register"))
    return problems


def _config_of(plan):
    """The TrainingFile the plan was resolved from (for lines and other presets), None if unreadable now."""
    if not plan.config_file():
        return None
    from .loader import load_config

    try:
        return load_config(plan.config_path)
    except ConfigError:
        return None


def _fitting_presets(plan, cfg, caps: Capabilities) -> list[str]:
    if cfg is None:
        return []
    return [name for name, ok, _ in rank_presets(cfg, caps, memory=False) if ok and name != plan.preset]


def rank_presets(cfg, caps: Capabilities, *, memory: bool = True, config_loader=None) -> list[tuple[str, bool, str]]:
    """(preset, runs here, reason) for every preset of a TrainingFile, runnable ones first, best device first.

    With `memory`, each runnable preset's estimate is compared with its budget; `config_loader(base_model)`
    returns a model's config.json dict (default: model_config.load_model_config, one call per base model).
    """
    from .memory import gib
    from .memory_check import check_memory
    from .model_config import load_model_config
    from .plan import resolve

    loader, cache = config_loader or load_model_config, {}
    rows = []
    for name in cfg.presets:
        try:
            plan = resolve(cfg, name)
        except ConfigError as exc:
            rows.append((name, False, f"config: {exc.problems[0].message}", 9))
            continue
        pf = preflight(plan, caps, suggest=False, paths=False)  # ranks machines; [output] is shared
        if pf.problems:
            rows.append((name, False, pf.problems[0].message, 9))
            continue
        reason, ok = f"{pf.device}, {pf.precision}", True
        if memory:
            base = plan.expert.base_model
            if base not in cache:
                try:
                    cache[base] = loader(base)
                except HardwareError as exc:
                    cache[base] = exc
            if isinstance(cache[base], HardwareError):
                reason += "; memory not checked (no config.json for the model)"
            else:
                plan.precision = pf.precision
                verdict = check_memory(plan, cache[base], caps=caps)
                ok = verdict.fits
                reason += f", ~{verdict.estimate.total_gb:.1f} of {gib(verdict.available_gb)} GiB" + (
                    "" if ok else f" (too much; {verdict.suggestions.hint()})")
        rows.append((name, ok, reason, DEVICE_ORDER.index(pf.device)))
    rows.sort(key=lambda r: (not r[1], r[3], r[0]))
    return [(name, ok, reason) for name, ok, reason, _ in rows]
