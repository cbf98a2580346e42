"""hafs: configuration-driven LoRA fine-tuning of small expert models."""

__version__ = "0.1.0"
