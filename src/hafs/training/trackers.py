"""Experiment trackers: TensorBoard, Weights & Biases and MLflow behind one small interface.

`open_trackers(["tensorboard", "wandb"], ...)` returns a `Tracker` that fans `log`, `summary` and
`close` out to each backend. Every backend works without a network by default:

- tensorboard: event files in `<log_dir>/tensorboard` (`tensorboard --logdir <log_dir>`).
- wandb: offline mode (a run folder under `<log_dir>/wandb`, `wandb sync` uploads it later) unless
  WANDB_MODE says otherwise; WANDB_PROJECT names the project (default "hafs").
- mlflow: MLFLOW_TRACKING_URI when set, else `mlflow_uri`, else a SQLite store `<log_dir>/mlflow.db`
  (MLflow 3 refuses a plain folder store), artifacts in `mlartifacts/` beside a SQLite file;
  MLFLOW_EXPERIMENT_NAME names the experiment (default "hafs").

What is logged passes through `outputs.scrub` first (values of *TOKEN*/*KEY*/*SECRET* environment
variables are masked), and W&B is told not to collect git remotes, code, host metadata or console
output. A backend that fails while training is disabled with one warning instead of stopping the run:
losing a chart is better than losing the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from .errors import ConfigError, Problem

BACKENDS = {
    # name → (module that must be importable, extra to install)
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
MLFLOW_PARAM_MAX = 6000
"""MLflow rejects parameter values longer than this (characters)."""


def flatten(data, prefix: str = "", sep: str = ".") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}; lists stay values."""
    out = {}
    for key, value in (data or {}).items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


def numeric(metrics: dict) -> dict[str, float]:
    """The entries that are numbers (bools, strings and None are left out), as floats."""
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, (bool, str, bytes)) or value is None:
            continue
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out


class _Backend:
    """One tracker; subclasses implement the three calls."""

    name = ""
    where = ""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def summary(self, data: dict) -> None:
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError

    def model(self, path: Path, name: str, tags: dict) -> str | None:
        """Keep the finished model folder with the run, where the backend has a model store; where it went."""
        return None


class _TensorBoard(_Backend):
    name = "tensorboard"

    def __init__(self, run_name: str, log_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.path = log_dir / "tensorboard"
        self.where = f"{self.path}  (tensorboard --logdir {self.path})"
        self.writer = SummaryWriter(log_dir=str(self.path))
        self.writer.add_text("config", _markdown_json(config), 0)

    def log(self, step, metrics):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def summary(self, data):
        self.writer.add_text("summary", _markdown_json(data), 0)
        self.writer.flush()

    def close(self, failed=False):
        self.writer.close()


class _WandB(_Backend):
    name = "wandb"

    def __init__(self, run_name: str, log_dir: Path, config: dict):
        import wandb

        mode = os.environ.get("WANDB_MODE") or "offline"
        settings = wandb.Settings(
            disable_git=True,          # a git remote URL can carry a token
            save_code=False, disable_code=True,
            x_disable_meta=True,       # host, user name, command line
            x_save_requirements=False,
            console="off",             # the terminal output is not the tracker's to keep
            silent=True,
        )
        log_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "hafs", name=run_name,
                              dir=str(log_dir), mode=mode, config=config, settings=settings)
        folder = Path(self.run.dir).parent
        self.where = (f"{folder}  (offline; upload later with: wandb sync {folder})" if mode == "offline"
                      else str(getattr(self.run, "url", "") or folder))

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def summary(self, data):
        self.run.summary.update(numeric(flatten(data, sep="/")))

    def close(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


class _MLflow(_Backend):
    name = "mlflow"

    def __init__(self, run_name: str, log_dir: Path, config: dict, uri: str | None = None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or uri or f"sqlite:///{(log_dir / 'mlflow.db').resolve()}"
        local = Path(self.uri[len("sqlite:///"):]) if self.uri.startswith("sqlite:///") else None
        if local is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "hafs"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            # Artifacts beside a local SQLite store: MLflow would otherwise put them in ./mlartifacts
            # of whatever directory training was started from. A server decides for itself.
            artifacts = (local.parent / "mlartifacts").resolve().as_uri() if local is not None else None
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.where = f"{self.uri}  (experiment '{name}', run {self.run_id})"
        params = [Param(k[:250], json.dumps(v, default=str)[:MLFLOW_PARAM_MAX] if not isinstance(v, str)
                        else v[:MLFLOW_PARAM_MAX]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, step, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def summary(self, data):
        self.client.log_dict(self.run_id, data, "summary.json")

    def close(self, failed=False):
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def model(self, path, name, tags):
        """The model folder as the run's `model` artifacts, and a new version of the registered model `name`
        (the expert): MLflow's Model Registry then lists every trained adapter of an expert with its run."""
        from mlflow.exceptions import MlflowException

        self.client.log_artifacts(self.run_id, str(path), "model")
        try:
            self.client.create_registered_model(name, description="LoRA adapters trained by hafs")
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/model"
        version = self.client.create_model_version(name, source, run_id=self.run_id,
                                                   tags={k: str(v) for k, v in tags.items() if v is not None})
        return f"registered model '{name}' version {version.version} (models:/{name}/{version.version})"


def _markdown_json(data) -> str:
    # TensorBoard renders text as markdown: indent 4 spaces so the JSON shows as a code block.
    text = json.dumps(data, indent=2, default=str)
    return "\n".join("    " + line for line in text.splitlines())


class Tracker:
    """The trackers of one run. With no backend, every call does nothing (so callers never branch)."""

    def __init__(self, backends: list[_Backend] | None = None, log=print):
        self.backends = list(backends or [])
        self._log = log
        self._closed = False

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def log(self, step: int, metrics: dict) -> None:
        """Record the numeric entries of `metrics` at optimizer step `step`."""
        values = numeric(metrics)
        if values:
            self._each("log", int(step), values)

    def summary(self, data: dict) -> None:
        """Record the run's final summary (e.g. metadata.json), secrets masked."""
        from .outputs import scrub

        self._each("summary", scrub(data))

    def model(self, path, name: str, tags: dict | None = None) -> None:
        """Hand the finished model folder to the backends that keep models (MLflow's Model Registry)."""
        for backend in list(self.backends):
            try:
                where = backend.model(Path(path), name, dict(tags or {}))
            except Exception as exc:  # the model folder is written already; the backend still closes its run
                self._log(f"warning: {backend.name} could not keep the model ({type(exc).__name__}: {exc}); "
                          f"it is in {path}")
                continue
            if where:
                self._log(f"tracking: {backend.name} → {where}")

    def close(self, failed: bool = False) -> None:
        """Finish every backend's run (marked failed when `failed`); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._each("close", failed)

    def _each(self, method: str, *args) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # a tracker must never stop training
                self._log(f"warning: {backend.name} tracker failed ({type(exc).__name__}: {exc}); "
                          f"it is disabled for the rest of this run")
                self.backends.remove(backend)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, etype, value, tb) -> None:
        self.close(failed=etype is not None)


def check_backends(backends: list[str]) -> None:
    """Raise ConfigError for unknown backends and for ones whose package is missing (with the pip command)."""
    problems = []
    for name in backends:
        if name not in BACKENDS:
            from .errors import did_you_mean

            problems.append(Problem(f"unknown tracker '{name}'{did_you_mean(name, BACKENDS)}", key="report_to",
                                    hint=f"choose from: {', '.join(BACKENDS)}"))
            continue
        module, extra = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            problems.append(Problem(f"{name} is requested but not installed", key="report_to",
                                    hint=f"pip install 'hafs[{extra}]'  (or remove '{name}' from report_to)"))
    if problems:
        raise ConfigError(problems)


def open_trackers(backends: list[str], *, run_name: str, log_dir: Path, config: dict,
                  mlflow_uri: str | None = None, log=print) -> Tracker:
    """Start one run in each requested backend, logging `config` (secrets masked) as its parameters.

    All backends are checked before any is started, so a missing package fails before anything is
    written. `mlflow_uri` replaces the default store (SQLite in log_dir) unless MLFLOW_TRACKING_URI is set.
    """
    backends = list(dict.fromkeys(backends or []))
    check_backends(backends)
    if not backends:
        return Tracker([], log=log)
    from .outputs import scrub

    config = scrub(config)
    log_dir = Path(log_dir)
    started: list[_Backend] = []
    for name in backends:
        try:
            if name == "tensorboard":
                started.append(_TensorBoard(run_name, log_dir, config))
            elif name == "wandb":
                started.append(_WandB(run_name, log_dir, config))
            else:
                started.append(_MLflow(run_name, log_dir, config, uri=mlflow_uri))
        except Exception as exc:
            Tracker(started, log=log).close(failed=True)
            raise ConfigError([Problem(f"could not start the {name} tracker: {type(exc).__name__}: {exc}",
                                       key="report_to", hint=_start_hint(name))]) from None
    for backend in started:
        log(f"tracking: {backend.name} → {backend.where}")
    return Tracker(started, log=log)


def _start_hint(name: str) -> str:
    if name == "wandb":
        return "offline mode needs no account; with WANDB_MODE=online run 'wandb login' first"
    if name == "mlflow":
        return "check MLFLOW_TRACKING_URI, or unset it to use a local SQLite store"
    return "check that the log folder is writable"

