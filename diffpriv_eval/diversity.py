"""Diversity of the anonymised candidates of one photo: how far apart their identities
are, and a 2-D picture of the embedding space."""
from __future__ import annotations

import colorsys
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def pairwise_distances(embeddings: np.ndarray) -> np.ndarray:
    """Euclidean distances of every unordered pair of rows (empty for fewer than 2)."""
    return np.array([np.linalg.norm(embeddings[i] - embeddings[j])
                     for i, j in combinations(range(len(embeddings)), 2)])


def pca_2d(points: np.ndarray) -> np.ndarray:
    """Projection of [N, D] points on their two principal axes ([N, 2])."""
    centred = points - points.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ axes[:2].T
    return np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))  # fewer than 2 axes for N < 3


def _colour(index: int, count: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(index / max(count, 1), 0.8, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def scatter_png(points: np.ndarray, groups: list[int], is_original: list[bool], labels: list[str],
                path: Path, title: str, size: int = 640) -> None:
    """A scatter plot drawn with PIL (matplotlib is not a dependency): one colour per
    original photo, squares for originals, dots for candidates, a legend on the right."""
    margin, legend = 40, 160
    image = Image.new("RGB", (size + legend, size), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 12), title, fill="black")
    low, high = points.min(axis=0), points.max(axis=0)
    scale = (size - 2 * margin) / np.maximum(high - low, 1e-12)
    for (x, y), group, original in zip(points, groups, is_original):
        cx = margin + (x - low[0]) * scale[0]
        cy = size - margin - (y - low[1]) * scale[1]
        shape = draw.rectangle if original else draw.ellipse
        radius = 7 if original else 4
        shape((cx - radius, cy - radius, cx + radius, cy + radius), fill=_colour(group, len(labels)),
              outline="black" if original else None)
    for index, label in enumerate(labels):
        y = margin + 16 * index
        draw.rectangle((size, y, size + 10, y + 10), fill=_colour(index, len(labels)))
        draw.text((size + 16, y - 1), label[:22], fill="black")
    draw.rectangle((margin, margin, size - margin, size - margin), outline="grey")
    image.save(path)
