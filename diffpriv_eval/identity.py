"""Identity measurements: protection success (paper Table 1) and the identification
accuracy protocol of AVIH (paper Table 3)."""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np

from diffpriv_eval.verifiers import Recognizer, distances
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


def identification_accuracy(recognizer: Recognizer, probes: Sequence[tuple[str, FaceImage]],
                            gallery: Mapping[str, Sequence[FaceImage]], distractors: Sequence[FaceImage]) -> float:
    """AVIH's identification protocol, as Diff-Privacy uses it for identity hiding.

    ``probes`` are (identity, image under test): identity-hidden images, or the originals
    for the reference row. ``gallery`` holds several OTHER photos of each identity, and
    ``distractors`` photos of people outside it. A probe is identified when its closest
    gallery photo of its own identity is strictly closer than every other gallery photo
    and every distractor; the accuracy is the identified fraction. Identity hiding aims to
    keep it close to the originals' accuracy (machines still recognise, people do not).
    """
    if not probes or not gallery or any(not photos for photos in gallery.values()):
        raise ValueError("identification needs probes and a gallery with at least one photo per identity")
    unknown = sorted({who for who, _ in probes} - set(gallery))
    if unknown:
        raise ValueError(f"probes of identities without gallery photos: {unknown}")
    owners = [who for who, photos in gallery.items() for _ in photos] + [None] * len(distractors)
    references = embed_all(recognizer, [p for photos in gallery.values() for p in photos] + list(distractors))
    probed = embed_all(recognizer, [item for _, item in probes])
    identified = 0
    for (who, _), embedding in zip(probes, probed):
        apart = distances(references, embedding[None])
        own = np.array([owner == who for owner in owners])
        identified += bool(apart[own].min() < apart[~own].min()) if (~own).any() else True
    return identified / len(probes)
