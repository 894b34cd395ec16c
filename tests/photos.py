"""Real face photos that ship inside installed packages (nothing is downloaded)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def as_image(photo: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> ComfyUI IMAGE [H, W, 3] float in [0, 1]."""
    return torch.from_numpy(np.array(photo)).float() / 255.0


def insightface_photo(name: str) -> np.ndarray:
    """One of the photos in insightface's data/images folder, RGB uint8."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("insightface (optional) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "data" / "images" / name
    return np.asarray(Image.open(path).convert("RGB"))
