"""The models that ship with the package: `tactic-code-13m`, the project's own long-context model
(trained by tactic_server.training.train on an H200, evaluated by benchmarks/accuracy.py; its
README.md is the model card), served when no --model is given."""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL = Path(__file__).resolve().parent / "tactic-code-13m"


def bundled_model_dir() -> Path | None:
    """The bundled model's folder, or None where the install left its weights out."""
    return BUNDLED_MODEL if (BUNDLED_MODEL / "config.json").is_file() else None
