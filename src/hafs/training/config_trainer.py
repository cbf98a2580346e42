"""The seed's Python API: `ConfigTrainer().train("oracle-rauru-mac")` → the model directory.

    trainer = ConfigTrainer()                       # reads config/training.toml
    config = trainer.build_training_config("oracle-rauru-mac")
    config.learning_rate = 3e-4                     # edit the plan...
    trainer.train_with_config(config)               # ...it is re-validated before anything loads
"""

from __future__ import annotations

from pathlib import Path

from .loader import load_config
from .plan import TrainingConfig, resolve
from .schema import TrainingFile


class ConfigTrainer:
    """Loads a training.toml once and trains its presets."""

    def __init__(self, config_path: str | Path | None = None, *, verbose: bool = False, log=print):
        self.config: TrainingFile = load_config(config_path)
        self.config_path = Path(self.config.path)
        self.verbose = verbose
        self.log = log

    def list_presets(self) -> list[str]:
        return list(self.config.presets)

    def build_training_config(self, preset: str, overrides: list[str] | dict | None = None) -> TrainingConfig:
        """Resolve a preset (plus KEY=VALUE overrides) into a validated, editable TrainingConfig."""
        return resolve(self.config, preset, overrides)

    def train(self, preset: str, overrides: list[str] | dict | None = None, **options) -> Path:
        """Train a preset; returns the model directory. Options: see `train_with_config`."""
        listed = overrides if isinstance(overrides, list) else [f"{k}={v}" for k, v in (overrides or {}).items()]
        return self.train_with_config(self.build_training_config(preset, overrides), overrides=listed, **options)

    def train_with_config(self, config: TrainingConfig, *, resume: str | None = None, force: bool = False,
                          evaluate: bool = True, register: bool | None = None,
                          overrides: list[str] | None = None) -> Path:
        """Validate `config` again (it may have been edited) and run it; returns the model directory."""
        from .errors import HafsError
        from .recipe import RunOptions, run

        config.validate()
        try:
            return run(config, RunOptions(resume=resume, force=force, evaluate=evaluate, register=register,
                                          verbose=self.verbose, overrides=list(overrides or [])), log=self.log)
        except HafsError as exc:  # a problem with a value a --set override gave: say so, not the file
            exc.problems = config.blame_overrides(exc.problems)
            exc.args = (exc.render(),)
            raise
