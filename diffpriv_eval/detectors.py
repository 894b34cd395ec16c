"""Face detectors with landmarks, behind one small interface, for the utility table."""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from diffpriv_eval import dlib_models
from diffpriv_core.faces.detect import Face, detect_faces


class Detector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in one RGB uint8 [H, W, 3] image, largest first."""
        ...


class MtcnnDetector:
    """The pack's own detector (MTCNN, 5 landmarks), with its default thresholds."""

    name = "MTCNN"

    def detect(self, image: np.ndarray) -> list[Face]:
        return detect_faces(torch.tensor(image).float().div(255))


class DlibDetector:
    """dlib's HOG detector (one upsampling, as face_recognition uses) + 68 iBUG landmarks."""

    name = "dlib"

    def detect(self, image: np.ndarray) -> list[Face]:
        image = np.ascontiguousarray(image)
        rects, scores, _ = dlib_models.frontal_face_detector().run(image, 1)
        predictor = dlib_models.shape_predictor_68()
        faces = []
        for rect, score in zip(rects, scores):
            shape = predictor(image, rect)
            points = tuple((float(p.x), float(p.y)) for p in shape.parts())
            faces.append(Face((float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom())),
                              points, float(score)))
        return sorted(faces, key=lambda f: -f.size)
