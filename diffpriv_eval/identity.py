"""Identity measurements: protection success (paper Table 1) and the identification
accuracy protocol of AVIH (paper Table 3)."""
from __future__ import annotations

import hashlib
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from diffpriv_eval.verifiers import Recognizer, distances
from diffpriv_core.faces.detect import Face


class FaceImage(NamedTuple):
    image: np.ndarray  # RGB uint8 [H, W, 3]
    face: Face  # where the face to recognise is


class Probe(NamedTuple):
    """An image to identify: an identity-hidden image, or an original for the reference row."""

    identity: str  # who it shows
    item: FaceImage
    source: np.ndarray | None = None  # the photo it was made from: a copy of it in the gallery is no match


def embed_all(recognizer: Recognizer, items: Sequence[FaceImage]) -> np.ndarray:
    return recognizer.embed([i.image for i in items], [i.face for i in items])


def protection_success_rate(identity_distances: np.ndarray, threshold: float) -> float:
    """Fraction of protected faces the recogniser no longer matches to their original:
    distance to the original strictly above the recogniser's same-person threshold."""
    return float(np.mean(np.asarray(identity_distances) > threshold))


def photo_digest(image: np.ndarray) -> str:
    """Equal for equal pixels, whatever file they came from."""
    return hashlib.sha256(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes()).hexdigest()


def identify(recognizer: Recognizer, probes: Sequence[tuple], gallery: Mapping[str, Sequence[FaceImage]],
             distractors: Sequence[FaceImage]) -> list[bool]:
    """AVIH's identification protocol, as Diff-Privacy uses it for identity hiding: for each
    probe, whether it is identified.

    ``probes`` are ``Probe``s or (identity, image under test) pairs. ``gallery`` holds
    several photos of each identity, and ``distractors`` photos of people outside it. A
    probe is identified when its closest gallery photo of its own identity is strictly
    closer than every other gallery photo and every distractor. A gallery photo or
    distractor with the same pixels as the probe's source photo is left out for that probe:
    a probe is never matched with the photo it was made from (leave-one-out, so the
    originals can lie in the gallery folders).
    """
    probes = [Probe(*p) for p in probes]
    if not probes or not gallery or any(not photos for photos in gallery.values()):
        raise ValueError("identification needs probes and a gallery with at least one photo per identity")
    unknown = sorted({p.identity for p in probes} - set(gallery))
    if unknown:
        raise ValueError(f"probes of identities without gallery photos: {unknown}")
    references = [p for photos in gallery.values() for p in photos] + list(distractors)
    owners = np.array([who for who, photos in gallery.items() for _ in photos] + [""] * len(distractors), object)
    digests = np.array([photo_digest(r.image) for r in references])
    embedded = embed_all(recognizer, references)
    probed = embed_all(recognizer, [p.item for p in probes])
    result = []
    for probe, embedding in zip(probes, probed):
        kept = digests != photo_digest(probe.source) if probe.source is not None else np.ones(len(references), bool)
        own = (owners == probe.identity) & kept
        if not own.any():
            raise ValueError(f"no gallery photo of {probe.identity} other than the probe's own photo")
        apart = distances(embedded, embedding[None])
        others = ~(owners == probe.identity) & kept
        result.append(bool(not others.any() or apart[own].min() < apart[others].min()))
    return result


def identification_accuracy(recognizer: Recognizer, probes: Sequence[tuple],
                            gallery: Mapping[str, Sequence[FaceImage]], distractors: Sequence[FaceImage]) -> float:
    """The identified fraction of ``probes`` (``identify``). Identity hiding aims to keep it
    close to the originals' accuracy (machines still recognise, people do not)."""
    return float(np.mean(identify(recognizer, probes, gallery, distractors)))
