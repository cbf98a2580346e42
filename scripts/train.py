#!/usr/bin/env python3
"""Train a preset of config/training.toml: `python scripts/train.py PRESET` (see --help)."""

import sys
from pathlib import Path

# Run from a checkout without installing: put src/ on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hafs.training.cli import train_script_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_script_main())
