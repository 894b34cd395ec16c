"""Face verification for the evaluation: is this the same person, by a recogniser's distance
at its published threshold? (The recognisers that guide the protection live in
``diffpriv_core/faces/recognizers.py``; this module only measures with them and with dlib.)

A recogniser maps the face at a known position in each image to an embedding; two faces
are the same person when the Euclidean distance of their embeddings is at most the
recogniser's threshold. The position comes from the ORIGINAL photo and is reused for its
protected and recovered versions: the method keeps the layout, and an attacker who
knows where the face is is the stronger attacker.

Any object with `name`, `threshold` and `embed(images, faces)` is a recogniser. Three
independent real recognisers are always available offline, each at its published
operating point: dlib (L2 0.6), and the two the setup installs from PyPI wheels, SFace
(cosine 0.363, i.e. L2 1.128) and FaceNet-CASIA (the paper's L2 1.1). Other files the
pack's loader reads (ArcFace, IR-SE50, FaceNet-VGGFace2) plug in through
AlignedRecognizer with their own alignment and threshold.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from diffpriv_eval import dlib_models
from diffpriv_core.faces.detect import Face
from diffpriv_core.faces.wheel_models import FACENET_CASIA, SETUP_COMMAND, SFACE

if TYPE_CHECKING:
    from pathlib import Path

    from diffpriv_core.faces.recognizers import FaceRecognizer


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
            image, face = mirrored_around(image, face)
            shape = predictor(image, dlib_models.rectangle(face.box))
            rows.append(np.asarray(model.compute_face_descriptor(image, shape), dtype=np.float64))
        return np.stack(rows)


def mirrored_around(image: np.ndarray, face: Face) -> tuple[np.ndarray, Face]:
    """The photo extended by its mirror image wherever the face's box, grown by its size on
    every side, runs off it, and the face moved with it. dlib reads pixels off the photo as
    black, in its landmarks and in its face chip; a face cut by the photo's edge then reads
    further from the same face in a wider photo than with a mirrored border (measured on
    cut-off faces of three real photos: mean distance 0.17 with black, 0.14 mirrored)."""
    x1, y1, x2, y2 = face.box
    grow = max(x2 - x1, y2 - y1)
    height, width = image.shape[:2]
    left, top = max(0, int(np.ceil(grow - x1))), max(0, int(np.ceil(grow - y1)))
    right, bottom = max(0, int(np.ceil(x2 + grow - width))), max(0, int(np.ceil(y2 + grow - height)))
    if left or top or right or bottom:
        image = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="symmetric")
    return np.ascontiguousarray(image), face.moved(left, top)


class AlignedRecognizer:
    """One of the pack's recognisers (aligned [B, 3, S, S] RGB in [0, 1] -> unit
    embeddings), aligned its own way (five-point template or MTCNN box crop) with the same
    transform and warp the guided sampler uses (guided.face_target). Its threshold is the
    recogniser's own, as the Euclidean distance of unit embeddings: |a - b| = sqrt(2 - 2 cos)."""

    def __init__(self, model: "FaceRecognizer", name: str):
        self.model = model
        self.name = name
        self.threshold = float(np.sqrt(2.0 - 2.0 * model.threshold))

    def embed(self, images: Sequence[np.ndarray], faces: Sequence[Face]) -> np.ndarray:
        import torch

        from diffpriv_core.faces.align import face_matrix, warp_faces

        size = self.model.input_size
        rows = []
        with torch.no_grad():
            for image, face in zip(images, faces, strict=True):
                pixels = torch.tensor(image).float().div(255)[None]  # images may differ in size
                aligned = warp_faces(pixels, face_matrix(face, size, self.model.alignment), size)
                rows.append(self.model(aligned)[0].double().numpy())
        return np.stack(rows)


def load_pack_recognizer(path: "str | Path", name: str, threshold: float | None = None) -> AlignedRecognizer:
    """A recogniser file the pack's loader reads (faces.recognizers), under ``name``, at
    ``threshold`` (cosine; None: the one the file is known by)."""
    from diffpriv_core.faces.recognizers import load_recognizer

    return AlignedRecognizer(load_recognizer(path, threshold), name)


# The recognisers the setup installs, by the name the report gives them.
INSTALLED = {"SFace": SFACE, "FaceNet-CASIA": FACENET_CASIA}


def installed_recognizers(models_dir: "Path") -> list[AlignedRecognizer]:
    """SFace and FaceNet-CASIA from a ComfyUI models folder the setup installed them into;
    a missing file is an error naming it, the folder and the setup command."""
    out = []
    for name, model in INSTALLED.items():
        path = models_dir / model.folder / model.file
        if not path.is_file():
            raise FileNotFoundError(f"{model.file} not found in {path.parent}: run {SETUP_COMMAND} "
                                    f"to install {model.what}, or give --models the models folder that holds it")
        out.append(load_pack_recognizer(path, name))
    return out


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Euclidean distance of two [N, D] embedding arrays."""
    return np.linalg.norm(a - b, axis=-1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] embedding arrays."""
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
