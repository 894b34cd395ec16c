"""Face detection with 5 landmarks.

MTCNN from facenet-pytorch is the default: its weights ship inside the package, so it
works offline out of the box.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch


class NoFaceError(ValueError):
    """No face passed the detector's thresholds in an image that needs one."""

    def __init__(self, index: int, detail: str = ""):
        super().__init__(f"no face found in image {index} of the batch{detail}")
        self.index = index


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    # MTCNN: left eye, right eye, nose, mouth left, mouth right; dlib (evaluation): the 68 iBUG points
    landmarks: tuple[tuple[float, float], ...]
    score: float

    @property
    def size(self) -> float:
        x1, y1, x2, y2 = self.box
        return min(x2 - x1, y2 - y1)

    def as_dict(self) -> dict:
        return {"box": list(self.box), "landmarks": [list(p) for p in self.landmarks], "score": self.score}

    @classmethod
    def from_dict(cls, d: dict) -> "Face":
        return cls(tuple(map(float, d["box"])), tuple(tuple(map(float, p)) for p in d["landmarks"]), float(d["score"]))


@functools.lru_cache(maxsize=4)
def _mtcnn(min_face_size: int):
    from facenet_pytorch import MTCNN

    return MTCNN(keep_all=True, min_face_size=min_face_size, device="cpu", post_process=False)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H, W, C] float in [0, 1] (ComfyUI IMAGE layout) -> [H, W, 3] uint8 RGB."""
    arr = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def detect_faces(image: torch.Tensor, min_score: float = 0.9, min_size: int = 20) -> list[Face]:
    """Faces in one [H, W, C] image, largest first."""
    boxes, probs, points = _mtcnn(max(int(min_size), 12)).detect(to_uint8(image), landmarks=True)
    if boxes is None:
        return []
    faces = [
        Face(tuple(float(v) for v in b), tuple((float(x), float(y)) for x, y in p), float(s))
        for b, s, p in zip(boxes, probs, points)
        if s >= min_score
    ]
    faces = [f for f in faces if f.size >= min_size]
    return sorted(faces, key=lambda f: -f.size)


def box_mask(height: int, width: int, faces: list[Face]) -> torch.Tensor:
    """A [H, W] mask, 1 inside any face box."""
    mask = torch.zeros(height, width)
    for f in faces:
        x1, y1, x2, y2 = f.box
        mask[max(int(y1), 0):max(int(np.ceil(y2)), 0), max(int(x1), 0):max(int(np.ceil(x2)), 0)] = 1.0
    return mask
