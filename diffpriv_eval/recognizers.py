"""Face recognisers as the evaluation sees them.

A recogniser maps the face at a known position in each image to an embedding; two faces
are the same person when the Euclidean distance of their embeddings is at most the
recogniser's threshold. The position comes from the ORIGINAL photo and is reused for its
protected and recovered versions: the method keeps the layout, and an attacker who
knows where the face is is the stronger attacker.

Any object with `name`, `threshold` and `embed(images, faces)` is a recogniser. dlib is
always available; the pack's ArcFace / IR-SE50 / FaceNet models (faces.recognizers) plug
in through AlignedRecognizer with the paper's thresholds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from diffpriv_eval import dlib_models
from diffpriv_core.faces.detect import Face

if TYPE_CHECKING:
    from diffpriv_core.adapters.protocols import FaceEmbedder

# Same-person thresholds the paper uses, on L2-normalised embeddings (method.md).
ARCFACE_THRESHOLD = 0.8
FACENET_THRESHOLD = 1.1


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


class AlignedRecognizer:
    """One of the pack's FaceEmbedders (aligned [B, 3, S, S] RGB in [0, 1] -> unit
    embeddings), aligned from the face's 5 landmarks with the same similarity transform and
    warp the guided sampler uses (guided.face_target)."""

    def __init__(self, model: "FaceEmbedder", name: str, threshold: float):
        self.model = model
        self.name = name
        self.threshold = threshold

    def embed(self, images: Sequence[np.ndarray], faces: Sequence[Face]) -> np.ndarray:
        import torch

        from diffpriv_core.faces.align import alignment_matrix, warp_faces

        size = self.model.input_size
        rows = []
        with torch.no_grad():
            for image, face in zip(images, faces, strict=True):
                pixels = torch.tensor(image).float().div(255)[None]  # images may differ in size
                aligned = warp_faces(pixels, alignment_matrix(face.landmarks, size), size)
                rows.append(self.model(aligned)[0].double().numpy())
        return np.stack(rows)


def load_paper_recognizer(path, kind: str) -> AlignedRecognizer:
    """A recogniser file (ArcFace ONNX, IR-SE50 or FaceNet, see faces.recognizers) with the
    paper's threshold for `kind` ("ArcFace" or "FaceNet")."""
    from diffpriv_core.faces.recognizers import load_recognizer

    thresholds = {"ArcFace": ARCFACE_THRESHOLD, "FaceNet": FACENET_THRESHOLD}
    return AlignedRecognizer(load_recognizer(path), kind, thresholds[kind])


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Euclidean distance of two [N, D] embedding arrays."""
    return np.linalg.norm(a - b, axis=-1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] embedding arrays."""
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
