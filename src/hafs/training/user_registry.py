"""The user's own model registry (`~/.context/models/registry.toml`): register trained and exported experts.

The file belongs to the user: it holds other experts, ensembles, paths and comments we know nothing
about. So it is edited with tomlkit (format-preserving), only the `[models.<expert>]` table we own
changes, the result is checked to differ from the original in that table alone before it is
written, and the write is atomic (temp file, fsync, rename). A file that does not parse is
reported with its line and left alone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import tomllib
from pathlib import Path

from .errors import ConfigError, HafsError, Problem, TrainingError

DEFAULT_REGISTRY = "~/.context/models/registry.toml"
"""Where the user keeps it; used by `--register` when `[output] registry` is not set."""
NEW_FILE_HEADER = "# Model registry (created by hafs)\n\n[metadata]\nschema_version = 1\n"
"""A missing registry starts as this minimal file."""
NEW_ENTRY_ORDER = ("display_name", "role", "group", "base", "status", "default_provider", "context_window",
                   "tags", "notes", "system_prompt")
"""Key order of a newly created entry: the layout of the user's template, then what hafs records."""


def resolve_registry(plan_or_output=None, *, explicit: str | None = None) -> Path:
    """The registry to use: `explicit`, else `[output] registry`, else the user's default location."""
    configured = explicit or getattr(getattr(plan_or_output, "output", plan_or_output), "registry", "") or ""
    return Path(configured or DEFAULT_REGISTRY).expanduser()


def update_registry(registry_path: Path, *, expert_name: str, entry: dict, defaults: dict | None = None,
                    log=print) -> None:
    """Create or update `[models.<expert_name>]`: set every key of `entry` (None values are skipped).

    `defaults` are written only when the entry is new (display name, role, ... as in the user's
    template); an existing entry keeps the user's own values for them. Everything outside that one
    table is preserved byte for byte. A missing file is created with a minimal `[metadata]`; a file
    that does not parse raises ConfigError (file and line) and is not touched.
    """
    path = _target(Path(registry_path).expanduser())
    with _locked(path):
        original = _read(path)
        text = original if original is not None else NEW_FILE_HEADER
        if text and not text.endswith("\n"):
            text += "\n"  # so a table appended at the end starts on its own line
        doc = _parse(text, path)
        import tomlkit

        models = doc.get("models")
        wrong = _shape_problems(models, text, path, expert_name)
        if wrong:
            raise ConfigError(wrong)
        if models is None:
            models = tomlkit.table(is_super_table=True)
            doc["models"] = models
        values = {k: _plain(v) for k, v in entry.items() if v is not None}
        current = models.get(expert_name)
        if current is None:
            table = tomlkit.table()
            merged = {**{k: _plain(v) for k, v in (defaults or {}).items() if v is not None}, **values}
            for key in sorted(merged, key=lambda k: (NEW_ENTRY_ORDER.index(k) if k in NEW_ENTRY_ORDER
                                                     else len(NEW_ENTRY_ORDER))):
                table[key] = merged[key]
            table.add(tomlkit.nl())  # the blank line between tables the user's file has
            models[expert_name] = table
            action = "added"
        else:  # a table: _shape_problems said so
            for key, value in values.items():
                current[key] = value
            action = "updated"
        new_text = tomlkit.dumps(doc)
        if original is not None and not original.endswith("\n\n") and new_text.endswith("\n\n"):
            new_text = new_text.rstrip("\n") + "\n"
        _check_only_entry_changed(original, new_text, expert_name)
        if new_text == original:
            log(f"Registry {path}: models.{expert_name} already up to date")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(path, new_text)
    log(f"Registry {path}: {action} models.{expert_name}")


def registry_problems(registry_path: Path, expert_name: str) -> list[Problem]:
    """What would make update_registry refuse this file, found before training instead of after it.

    A file that does not exist is fine (it will be created). The file can still change during the
    run, so the update after saving is checked again (see register_after_save).
    """
    path = _target(Path(registry_path).expanduser())
    try:
        text = _read(path)
        if text is None:
            return []
        _parse(text, path)
    except ConfigError as exc:
        return [_with_preflight_hint(p) for p in exc.problems]
    return [_with_preflight_hint(p) for p in _shape_problems(tomllib.loads(text).get("models"), text, path,
                                                               expert_name)]


def _shape_problems(models, text: str, path: Path, expert_name: str) -> list[Problem]:
    """A `models` value (the parsed file's) that update_registry cannot write `[models.<expert_name>]` into:
    one rule for the update itself and for the check before training (registry_problems)."""
    if models is not None and not isinstance(models, dict):
        return [Problem("'models' must be a table of [models.<name>] entries", key="models", file=str(path),
                        line=_line_of(text, "models"), hint="fix the file; hafs left the file untouched")]
    entry = models.get(expert_name) if isinstance(models, dict) else None
    if entry is not None and not isinstance(entry, dict):
        return [Problem(f"models.{expert_name} is not a table", key=f"models.{expert_name}", file=str(path),
                        line=_line_of(text, f"models.{expert_name}") or _line_of(text, expert_name),
                        hint="fix the file; hafs left the file untouched")]
    return []


def _with_preflight_hint(problem: Problem) -> Problem:
    hint = problem.hint.replace("hafs left the file untouched", "").strip("; ")
    extra = "or set [output] registry to another file (--no-register skips the registry)"
    return Problem(problem.message, key=problem.key, file=problem.file, line=problem.line,
                   hint=f"{hint}, {extra}" if hint else extra)


def register_after_save(plan, model_dir: Path, meta: dict | None = None, *, registry: str | None = None,
                        log=print) -> Path | None:
    """register_trained_model for a model already saved: a failure is a warning, never an error.

    The model is on disk by now; raising would hide its path from the user (and the caller), and under
    torchrun leave the other workers waiting for it. The registry was checked before training, so
    this only fires when it changed during the run.
    """
    try:
        return register_trained_model(plan, model_dir, meta, registry=registry, log=log)
    except HafsError as exc:
        detail = exc.render().replace("\n", "\n  ")
        log(f"warning: the model registry was not updated (the model is saved in {model_dir}):\n  {detail}")
    except Exception as exc:  # a bug in hafs, but the saved model still must be reported
        log(f"warning: the model registry was not updated (the model is saved in {model_dir}): "
            f"internal error (a bug in hafs): {type(exc).__name__}: {exc}")
    return None


def registered_experts(registry_path: Path) -> dict[str, dict]:
    """Every `[models.*]` entry of the registry as plain dicts ({} when the file does not exist)."""
    path = Path(registry_path).expanduser()
    text = _read(path)
    if text is None:
        return {}
    data = _strict_parse(text, path, title="Cannot read the model registry:")
    models = data.get("models", {})
    return {name: dict(value) for name, value in models.items() if isinstance(value, dict)} \
        if isinstance(models, dict) else {}


def registry_entry(plan, model_dir: Path, meta: dict | None = None, *, today: dt.date | None = None) -> dict:
    """The keys hafs records for a trained model: status, where it is, what it was trained from, eval figures."""
    meta = meta or {}
    figures = eval_figures(meta)
    return {
        "status": "trained",
        "model_dir": str(Path(model_dir).resolve()),
        "base_model": plan.expert.base_model,
        "trained": (today or dt.date.today()).isoformat(),
        "preset": plan.preset,
        "dataset": os.path.normpath(plan.dataset_dir),
        "eval_loss": figures.get("eval_loss"),
        "perplexity": figures.get("perplexity"),
        "train_loss": figures.get("train_loss"),
    }


def entry_defaults(plan) -> dict:
    """Fields of a new entry in the layout of the user's template (never overwrite an existing entry's)."""
    expert = plan.expert
    return {
        "display_name": expert.display_name, "role": expert.role, "group": expert.group or None,
        "base": plan.base_short(), "default_provider": "llamacpp", "context_window": expert.context_window,
        "tags": [t for t in (expert.group, expert.role) if t], "notes": expert.specialization or None,
        "system_prompt": expert.system_prompt or None,
    }


def register_trained_model(plan, model_dir: Path, meta: dict | None = None, *, registry: str | None = None,
                           log=print) -> Path:
    """After a successful run: create or update the expert's entry. Returns the registry path."""
    path = resolve_registry(plan, explicit=registry)
    if not (registry or plan.output.registry):
        log(f"Registry: using {DEFAULT_REGISTRY} (set [output] registry to choose another file)")
    update_registry(path, expert_name=plan.expert_name, entry=registry_entry(plan, model_dir, meta),
                    defaults=entry_defaults(plan), log=log)
    return path


def eval_figures(meta: dict) -> dict:
    """eval_loss / perplexity after training and the final train loss, from metadata.json, when present."""
    out: dict = {}
    evaluation = meta.get("evaluation") or {}
    after = evaluation.get("after", evaluation) if isinstance(evaluation, dict) else {}
    for split in ("val", "test"):  # after = {"val": {"loss", "perplexity"}, ...} or flat keys
        if isinstance(after, dict) and isinstance(after.get(split), dict):
            after = {**after[split], **{k: v for k, v in after.items() if not isinstance(v, dict)}}
            break
    if isinstance(after, dict):
        for key, value in after.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            low = key.lower()
            if "perplexity" in low or low == "ppl":
                out.setdefault("perplexity", round(float(value), 4))
            elif low.endswith("loss"):
                out.setdefault("eval_loss", round(float(value), 4))
    final = (meta.get("training") or {}).get("final_loss")
    if isinstance(final, (int, float)) and not isinstance(final, bool):
        out["train_loss"] = round(float(final), 4)
    return out


# ----------------------------------------------------------------------------- file handling


def _target(path: Path) -> Path:
    """Follow a symlinked registry so the rename replaces the file, not the link."""
    try:
        return path.resolve() if path.is_symlink() else path
    except OSError:
        return path


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(f"the model registry is not UTF-8 text ({exc.reason} at byte {exc.start})",
                                   file=str(path), hint="fix the file; hafs left it untouched")]) from None
    except OSError as exc:
        raise ConfigError([Problem(f"cannot read the model registry: {exc.strerror}", file=str(path))]) from None


def _strict_parse(text: str, path: Path, title: str = "Model registry not updated:") -> dict:
    """tomllib's verdict (the TOML spec, strictly), as a ConfigError naming the line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at (?:line (\d+), column \d+|end of document)\)", str(exc))
        message = str(exc)[:found.start()].strip() if found else str(exc)
        line = None
        if found:  # an unfinished last value is reported at the end of the document: its last line
            line = int(found.group(1)) if found.group(1) else max(1, len(text.splitlines()))
        raise ConfigError([Problem(f"cannot parse the model registry: {message}", file=str(path), line=line,
                                   hint="fix the TOML syntax; hafs left the file untouched")],
                          title=title) from None


def _parse(text: str, path: Path):
    """The format-preserving document, after the strict check (tomlkit accepts a few invalid files)."""
    _strict_parse(text, path)
    try:
        import tomlkit
        from tomlkit.exceptions import TOMLKitError
    except ImportError:
        raise ConfigError([Problem("updating the model registry needs the 'tomlkit' package",
                                   hint="pip install 'hafs[registry]'")]) from None
    try:
        return tomlkit.parse(text)
    except TOMLKitError as exc:
        raise ConfigError([Problem(f"cannot parse the model registry: {exc}", file=str(path),
                                   line=getattr(exc, "line", None), hint="hafs left the file untouched")],
                          title="Model registry not updated:") from None


def _line_of(text: str, table: str) -> int | None:
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith((f"[{table}", f"{table} ", f"{table}=", f"{table}.")):
            return number
    return None


def _plain(value):
    """TOML-writable form: paths as strings, tuples as lists, floats rounded for readability."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


def _check_only_entry_changed(original: str | None, new_text: str, expert_name: str) -> None:
    """Refuse to write if anything but models.<expert_name> would differ (a tomlkit bug must not eat data)."""
    before = tomllib.loads(original) if original is not None else tomllib.loads(NEW_FILE_HEADER)
    after = tomllib.loads(new_text)
    for doc in (before, after):
        if isinstance(doc.get("models"), dict):
            doc["models"].pop(expert_name, None)
            if not doc["models"]:
                doc.pop("models")
    if before != after:
        raise RuntimeError(f"registry edit would change more than models.{expert_name}; nothing was written")


def _atomic_write_text(path: Path, text: str) -> None:
    """Temp file in the same folder + fsync + rename, keeping the original file's permissions."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = None
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TrainingError([Problem(f"cannot write the model registry: {exc.strerror or exc}", file=str(path),
                                     hint="the registry was left as it was")]) from None
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise concurrent updates (two runs finishing together): an advisory lock on the folder.

    The folder, not the file: the rename replaces the file's inode, and a lock file would clutter
    the user's folder.
    """
    try:
        import fcntl
    except ImportError:  # Windows: updates stay atomic, just not serialised
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
