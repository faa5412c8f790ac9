"""Where the lab's bundled data lives, and which device the notebooks use: constants every lab module shares."""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "data"
BUNDLED_MODEL = str(DATA / "small-moe")
BUNDLED_PREDICTOR = str(DATA / "predictors" / "small-moe-depth2.safetensors")


def default_device() -> str:
    """The GPU when there is one; the notebooks say which they used."""
    return "cuda" if torch.cuda.is_available() else "cpu"
