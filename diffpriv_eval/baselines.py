"""Classic obfuscation baselines, to calibrate the metrics on real photos.

Both act on a face box (the whole image when none is given), as deployed anonymisers
do; strength is in pixels, so it means the same on any photo size.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

Box = tuple[float, float, float, float]


def _region(image: np.ndarray, box: Box | None) -> tuple[int, int, int, int]:
    height, width = image.shape[:2]
    if box is None:
        return 0, 0, width, height
    x1, y1, x2, y2 = box
    return max(int(x1), 0), max(int(y1), 0), min(int(np.ceil(x2)), width), min(int(np.ceil(y2)), height)


def _apply(image: np.ndarray, box: Box | None, transform: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    x1, y1, x2, y2 = _region(image, box)
    out = np.array(image, copy=True)
    out[y1:y2, x1:x2] = np.asarray(transform(Image.fromarray(out[y1:y2, x1:x2])))
    return out


def gaussian_blur(image: np.ndarray, sigma: float, box: Box | None = None) -> np.ndarray:
    """Gaussian blur with standard deviation `sigma` pixels."""
    return _apply(image, box, lambda region: region.filter(ImageFilter.GaussianBlur(sigma)))


def mosaic(image: np.ndarray, block: float, box: Box | None = None) -> np.ndarray:
    """Pixelation into blocks of `block` pixels (each block's mean colour)."""
    def pixelate(region: Image.Image) -> Image.Image:
        small = (max(1, round(region.width / block)), max(1, round(region.height / block)))
        return region.resize(small, Image.Resampling.BOX).resize(region.size, Image.Resampling.NEAREST)

    return _apply(image, box, pixelate)


BASELINES: dict[str, Callable[..., np.ndarray]] = {"blur": gaussian_blur, "mosaic": mosaic}
