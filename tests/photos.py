"""Real face photos that ship inside installed packages (nothing is downloaded)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpriv_eval.sample_photos import SamplePhotoMissingError, insightface_image


def as_image(photo: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> ComfyUI IMAGE [H, W, 3] float in [0, 1]."""
    return torch.from_numpy(np.array(photo)).float() / 255.0


def insightface_photo(name: str) -> np.ndarray:
    """One of the photos in insightface's data/images folder, RGB uint8."""
    try:
        return insightface_image(name)
    except SamplePhotoMissingError:
        pytest.skip("insightface (optional) is not installed")
