"""Identity measurements: protection success (paper Table 1), identification by AVIH's
protocol (paper Table 3; Su et al. 2022), and re-identification of protected photos against
a gallery of originals (the other direction, not AVIH's)."""
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


class Member(NamedTuple):
    """One photo of a person, for AVIH's protocol: the original and its protected versions."""

    name: str
    original: FaceImage
    protected: Sequence[FaceImage]


class Verdicts(NamedTuple):
    """AVIH's queries of one recogniser: each probe's verdict with its same-identity set
    unprotected (the reference row) and protected (one verdict per candidate index)."""

    reference: dict[str, bool]
    protected: dict[str, list[bool]]


def avih_verdicts(recognizer: Recognizer, people: Mapping[str, Sequence[Member]],
                  others: Sequence[FaceImage]) -> Verdicts:
    """AVIH's identification protocol (Su et al. 2022), as the paper's Table 3 runs it.

    The probe is an ORIGINAL photo of a person. Its verification set is Set_s, the protected
    images of that person's other photos, plus Set_d, the photos of everyone else
    (``people``' other members, as they are, and ``others``, people outside ``people``). The
    query is right when some image of Set_s is strictly closer to the probe than every image
    of Set_d, wrong when an image of Set_d is at least as close. Every photo of a person
    with at least one other protected photo is a probe in turn; a photo with the probe's
    pixels is never in its verification set. With several candidates per photo, candidate k
    of each photo forms Set_s of the k-th query. The reference verdict uses the same photos
    of Set_s unprotected."""
    members = [(who, m) for who, ms in people.items() for m in ms]
    originals = embed_all(recognizer, [m.original for _, m in members] + list(others))
    protected = [embed_all(recognizer, list(m.protected)) if m.protected else None for _, m in members]
    digests = np.array([photo_digest(m.original.image) for _, m in members] + [photo_digest(o.image) for o in others])
    owners = np.array([who for who, _ in members] + [None] * len(others), object)
    reference: dict[str, bool] = {}
    hidden: dict[str, list[bool]] = {}
    for i, (who, member) in enumerate(members):
        apart = distances(originals, originals[i][None])
        kept = digests != digests[i]
        same = [j for j in range(len(members)) if kept[j] and owners[j] == who and protected[j] is not None]
        if not same:
            continue
        different = apart[kept & (owners != who)]
        closest_other = different.min() if different.size else np.inf
        reference[member.name] = bool(apart[same].min() < closest_other)
        candidates = max(len(protected[j]) for j in same)
        hidden[member.name] = [bool(min(np.linalg.norm(protected[j][k] - originals[i]) for j in same
                                        if len(protected[j]) > k) < closest_other) for k in range(candidates)]
    return Verdicts(reference, hidden)


def identify(recognizer: Recognizer, probes: Sequence[tuple], gallery: Mapping[str, Sequence[FaceImage]],
             distractors: Sequence[FaceImage]) -> list[bool]:
    """Re-identification against a gallery of originals (the other direction from AVIH's
    protocol, which ``avih_verdicts`` runs): for each probe, whether it is identified.

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
    """The identified fraction of ``probes`` (``identify``): how often a gallery of originals
    re-identifies them."""
    return float(np.mean(identify(recognizer, probes, gallery, distractors)))
