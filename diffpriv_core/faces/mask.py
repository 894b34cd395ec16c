"""The shape of the mask a face is pasted under, torch-free: Face Paste builds its masks
from it, and the `diffpriv` command measures over the same pixels.

The mask replaces an ellipse around the face box, a little wider than the box and taller
(MTCNN's box runs from the brows to the chin; the hairline and jaw belong to the identity),
and falls to 0 over a feather outside it.
"""
from __future__ import annotations

import numpy as np

MASK_WIDTH, MASK_HEIGHT = 1.1, 1.25


def ellipse_radius(square: tuple[int, int, int], face_box) -> np.ndarray:
    """[side, side] float32: each pixel of the crop square (x0, y0, side), as its distance
    from the face's centre in radii of the mask's ellipse (1 on the ellipse)."""
    x0, y0, side = square
    x1, y1, x2, y2 = face_box
    cx, cy = (x1 + x2) / 2 - x0, (y1 + y2) / 2 - y0
    rx, ry = (x2 - x1) / 2 * MASK_WIDTH, (y2 - y1) / 2 * MASK_HEIGHT
    coords = np.arange(side, dtype=np.float32)
    return np.sqrt(((coords[None, :] - cx) / rx) ** 2 + ((coords[:, None] - cy) / ry) ** 2)


def protected_pixels(square: tuple[int, int, int], face_box, feather: float, height: int, width: int) -> np.ndarray:
    """[height, width] bool: the pixels of the photo a face's paste with this ``feather``
    may change (its mask is above 0 there), which a recovery must restore."""
    r = ellipse_radius(square, face_box)
    inside = r <= 1 if feather <= 0 else r < 1 + feather
    x0, y0, side = square
    out = np.zeros((height, width), dtype=bool)
    ys, xs = slice(max(0, y0), min(height, y0 + side)), slice(max(0, x0), min(width, x0 + side))
    out[ys, xs] = inside[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    return out
