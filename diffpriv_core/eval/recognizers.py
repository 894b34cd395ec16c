"""Face recognisers as the evaluation sees them.

A recogniser maps the face at a known position in each image to an embedding; two faces
are the same person when the Euclidean distance of their embeddings is at most the
recogniser's threshold. The position comes from the ORIGINAL photo and is reused for its
protected and recovered versions: the method keeps the layout, and an attacker who
knows where the face is is the stronger attacker.

To plug in another recogniser (ArcFace 0.8, FaceNet 1.1 on L2-normalised embeddings),
give any object with `name`, `threshold` and `embed(images, faces)`; ArcFace-style
models align with `faces[i].landmarks` (5 points from MTCNN).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from diffpriv_core.eval import dlib_models
from diffpriv_core.faces.detect import Face


class Recognizer(Protocol):
    name: str
    threshold: float  # same person when the embedding distance is <= threshold

    def embed(self, images: Sequence[np.ndarray], faces: Sequence[Face]) -> np.ndarray:
        """[N, D] embeddings of faces[i] in images[i] (RGB uint8 [H, W, 3])."""
        ...


class DlibRecognizer:
    """dlib's ResNet descriptor with its 68-landmark alignment; always available offline."""

    name = "dlib"
    threshold = 0.6

    def embed(self, images: Sequence[np.ndarray], faces: Sequence[Face]) -> np.ndarray:
        predictor = dlib_models.shape_predictor_68()
        model = dlib_models.face_descriptor_model()
        rows = []
        for image, face in zip(images, faces, strict=True):
            image = np.ascontiguousarray(image)
            shape = predictor(image, dlib_models.rectangle(face.box))
            rows.append(np.asarray(model.compute_face_descriptor(image, shape), dtype=np.float64))
        return np.stack(rows)


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Euclidean distance of two [N, D] embedding arrays."""
    return np.linalg.norm(a - b, axis=-1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] embedding arrays."""
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
