"""Identity measurements: protection success (paper Table 1) and the identification
accuracy protocol of AVIH (paper Table 3)."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from diffpriv_eval.recognizers import Recognizer, distances
from diffpriv_core.faces.detect import Face


class FaceImage(NamedTuple):
    image: np.ndarray  # RGB uint8 [H, W, 3]
    face: Face  # where the face to recognise is


def embed_all(recognizer: Recognizer, items: Sequence[FaceImage]) -> np.ndarray:
    return recognizer.embed([i.image for i in items], [i.face for i in items])


def protection_success_rate(identity_distances: np.ndarray, threshold: float) -> float:
    """Fraction of protected faces the recogniser no longer matches to their original:
    distance to the original strictly above the recogniser's same-person threshold."""
    return float(np.mean(np.asarray(identity_distances) > threshold))


def identification_accuracy(recognizer: Recognizer, probes: Sequence[FaceImage],
                            same_identity: Sequence[FaceImage],
                            different_identity: Sequence[FaceImage]) -> float:
    """AVIH's identification protocol, as Diff-Privacy uses it for identity hiding.

    probes[i] is the image under test (an identity-hidden image, or the original photo
    for the reference row); same_identity[i] is ANOTHER photo of the same person;
    different_identity[i] is a photo of someone else. A probe is identified when its
    embedding is strictly closer to the same-identity photo than to the other one; the
    accuracy is the fraction of identified probes. Identity hiding aims to keep this
    close to the originals' accuracy (machines still recognise, people do not).
    """
    if not (len(probes) == len(same_identity) == len(different_identity)) or not probes:
        raise ValueError("probes, same_identity and different_identity need the same, non-zero length")
    probe = embed_all(recognizer, probes)
    to_same = distances(probe, embed_all(recognizer, same_identity))
    to_other = distances(probe, embed_all(recognizer, different_identity))
    return float(np.mean(to_same < to_other))
