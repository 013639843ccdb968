"""The models that ship with the package: `tactic-code-13m`, the project's own long-context model
(trained by tactic_server.training.train on an H200, evaluated by benchmarks/accuracy.py; its
README.md is the model card), served when no --model is given and no pretrained model was
pulled; and where the cache of generated and pulled models lives (pull.py pulls)."""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_MODEL_NAME = "tactic-code-13m"
BUNDLED_MODEL = Path(__file__).resolve().parent / BUNDLED_MODEL_NAME


def cache_root() -> Path:
    """$TACTIC_SERVER_CACHE, else ~/.cache/tactic-server: generated and pulled models."""
    return Path(os.environ.get("TACTIC_SERVER_CACHE") or Path.home() / ".cache" / "tactic-server")


def bundled_model_dir() -> Path | None:
    """The bundled model's folder, or None where the install left its weights out."""
    return BUNDLED_MODEL if (BUNDLED_MODEL / "config.json").is_file() else None
