"""All measurements over a set of cases, as one JSON-ready dictionary.

Identity is measured at the primary (largest) MTCNN face of each original; originals
without a face, and originals that produced neither a protected nor a recovered image
(when such images were given), are listed under "skipped" and left out of every table.
Each recogniser is reported at its own threshold, as white-box (it guided the protection)
or transfer (it did not). With a gallery, identification by AVIH's protocol probes with the
originals against their person's protected photos and everyone else's, and re-identification
probes with the candidates and recoveries against the gallery's originals; both read each
picture at its original's face.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from diffpriv_eval import metrics
from diffpriv_eval.detectors import Detector, MtcnnDetector
from diffpriv_eval.diversity import pairwise_distances
from diffpriv_eval.gallery import Gallery
from diffpriv_eval.identity import (FaceImage, Member, Probe, avih_verdicts, identify, photo_digest,
                                   protection_success_rate)
from diffpriv_eval.images import Case
from diffpriv_eval.verifiers import Recognizer, cosines, distances
from diffpriv_eval.utility import compare_detections
from diffpriv_core.faces.detect import Face


@dataclass
class EmbeddingSet:
    """One recogniser's embeddings of the originals and of every candidate, for plots."""

    originals: np.ndarray  # [cases, D]
    candidates: np.ndarray  # [candidates, D]
    candidate_case: list[int]  # index of each candidate's case


@dataclass
class Evaluation:
    results: dict
    embeddings: dict[str, EmbeddingSet] = field(default_factory=dict)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _protection(recognizer: Recognizer, originals: np.ndarray, cases: Sequence[Case],
                faces: Sequence[Face], role: str) -> tuple[dict, EmbeddingSet]:
    """Each candidate's identity distance to its original (`originals`: their
    embeddings), and between candidates of the same original (diversity)."""
    owner = [k for k, case in enumerate(cases) for _ in case.protected]
    result = {"role": role, "threshold": recognizer.threshold, "candidates": len(owner)}
    if not owner:
        return result, EmbeddingSet(originals, np.empty((0, originals.shape[1])), [])
    candidates = recognizer.embed([p for case in cases for p in case.protected], [faces[k] for k in owner])
    to_original = distances(candidates, originals[owner])
    of_case = [np.equal(owner, k) for k in range(len(cases))]
    spread = np.concatenate([pairwise_distances(candidates[mask]) for mask in of_case])
    result.update({
        "success_rate": protection_success_rate(to_original, recognizer.threshold),
        "mean_distance_to_original": _mean(to_original),
        "distances_to_original": {c.stem: to_original[mask].tolist() for c, mask in zip(cases, of_case) if mask.any()},
        "diversity": {"pairs": int(spread.size), "mean_pairwise_distance": _mean(spread),
                      "min_pairwise_distance": float(spread.min()) if spread.size else None},
    })
    return result, EmbeddingSet(originals, candidates, owner)


def _pixel_metrics(original: np.ndarray, recovered: np.ndarray, with_lpips: bool) -> dict[str, float]:
    values = {"mse": metrics.mse(original, recovered), "psnr": metrics.psnr(original, recovered),
              "ssim": metrics.ssim(original, recovered)}
    if with_lpips:
        values["lpips"] = metrics.lpips(original, recovered)
    return values


def _recovery(recognizers: Sequence[Recognizer], originals: dict[str, np.ndarray], cases: Sequence[Case],
              faces: Sequence[Face], recovered_of: Callable[[Case], np.ndarray | None] = lambda c: c.recovered) -> dict:
    """Pixel metrics and, per recogniser, the identity of recovered vs original: Cos-IE (the
    cosine of the two embeddings, the paper's Table 2), the distance, the recogniser's
    threshold and whether it takes them for the same person. ``recovered_of`` picks each
    case's recovered picture (None: none)."""
    recovered = [(k, c, image) for k, c in enumerate(cases) if (image := recovered_of(c)) is not None]
    if not recovered:
        return {"images": 0}
    lpips_reason = metrics.lpips_unavailable_reason()
    per_image = {c.stem: _pixel_metrics(c.original, image, lpips_reason is None) for _, c, image in recovered}
    index = [k for k, _, _ in recovered]
    identity = {}
    for recognizer in recognizers:
        embedded = recognizer.embed([image for _, _, image in recovered], [faces[k] for k in index])
        reference = originals[recognizer.name][index]
        apart, cosine = distances(reference, embedded), cosines(reference, embedded)
        for (_, c, _), value, cos in zip(recovered, apart, cosine):
            per_image[c.stem][f"identity_distance_{recognizer.name}"] = float(value)
            per_image[c.stem][f"cos_ie_{recognizer.name}"] = float(cos)
        identity[recognizer.name] = {"threshold": recognizer.threshold, "cos_ie": _mean(cosine),
                                     "mean_distance": _mean(apart),
                                     "same_person_rate": float(np.mean(apart <= recognizer.threshold))}
    names = next(iter(per_image.values())).keys()
    return {"images": len(recovered), "lpips_not_computed": lpips_reason, "identity": identity,
            "mean": {n: _mean([v[n] for v in per_image.values()]) for n in names}, "per_image": per_image}


def _utility(detector: Detector, cases: Sequence[Case]) -> dict:
    found = [detector.detect(c.original) for c in cases]
    with_face = [(c, f[0]) for c, f in zip(cases, found) if f]
    result = {"originals": len(cases), "original_detection_rate": len(with_face) / len(cases)}
    pairs = [(ref, image) for c, ref in with_face for image in c.protected]
    if pairs:
        result["protected"] = compare_detections([r for r, _ in pairs], [detector.detect(i) for _, i in pairs]).as_dict()
    return result


# The rows of the identification table: what each original gives as probes.
_PROBE_ROWS = {"originals": lambda c: [c.original], "protected": lambda c: c.protected,
               "recovered": lambda c: [] if c.recovered is None else [c.recovered]}


def _probed(gallery: Gallery, cases: Sequence[Case]) -> tuple[dict[str, str], dict[str, str]]:
    """(original -> identity it is probed as, original -> why it is not probed)."""
    probed, not_probed = {}, {}
    for case in cases:
        who = gallery.identity_of(case)
        if who is None:
            not_probed[case.stem] = "no gallery identity of that name or folder"
        elif all(photo_digest(p.image) == photo_digest(case.original) for p in gallery.identities[who]):
            not_probed[case.stem] = f"no photo of {who} in the gallery other than this original"
        else:
            probed[case.stem] = who
    return probed, not_probed


def _reidentification(recognizers: Sequence[Recognizer], cases: Sequence[Case], faces: Sequence[Face],
                      gallery: Gallery, guided_by: str | None) -> dict:
    """Re-identification against the gallery of originals, per recogniser: the originals
    (the reference row), the protected candidates and the recovered images as probes, each
    identified when a photo of its own person is closer than anyone else's. The other
    direction from AVIH's protocol (``_avih``): what an attacker holding unprotected photos
    learns from a protected one."""
    probed, not_probed = _probed(gallery, cases)
    result = {"probes": probed, "not_probed": not_probed, "recognizers": {}}
    rows = [(row, c, image, face) for row, images_of in _PROBE_ROWS.items()
            for c, face in zip(cases, faces) if c.stem in probed for image in images_of(c)]
    if not rows:
        return result
    probes = [Probe(probed[c.stem], FaceImage(image, face), c.original) for _, c, image, face in rows]
    for recognizer in recognizers:
        hits = identify(recognizer, probes, gallery.identities, gallery.distractors)
        table = {}
        for row in _PROBE_ROWS:
            mine = [(c.stem, hit) for (r, c, _, _), hit in zip(rows, hits) if r == row]
            if mine:
                per_original: dict[str, list[bool]] = {}
                for stem, hit in mine:
                    per_original.setdefault(stem, []).append(hit)
                table[row] = {"probes": len(mine), "accuracy": _mean([hit for _, hit in mine]),
                              "identified": per_original}
        role = "white-box" if recognizer.name == guided_by else "transfer"
        result["recognizers"][recognizer.name] = {"role": role, **table}
    return result


def _people(gallery: Gallery, cases: Sequence[Case], faces: Sequence[Face]) -> dict[str, list[Member]]:
    """Every gallery person's photos: the evaluated originals that show them, with their
    protected candidates (read at the original's face), and the gallery's other photos of
    them, unprotected (named by their file's stem, or person/file where stems repeat)."""
    people: dict[str, list[Member]] = {who: [] for who in gallery.identities}
    seen = set()
    for case, face in zip(cases, faces):
        who = gallery.identity_of(case)
        if who is not None:
            original = FaceImage(case.original, face)
            people[who].append(Member(case.stem, original, [FaceImage(p, face) for p in case.protected]))
            seen.add(photo_digest(case.original))
    names = {m.name for ms in people.values() for m in ms}
    for who, photos in gallery.identities.items():
        for file, photo in zip(gallery.names[who], photos):
            if photo_digest(photo.image) not in seen:
                name = Path(file).stem if Path(file).stem not in names else f"{who}/{file}"
                names.add(name)
                people[who].append(Member(name, photo, []))
    return people


def _avih(recognizers: Sequence[Recognizer], cases: Sequence[Case], faces: Sequence[Face], gallery: Gallery,
          guided_by: str | None) -> dict:
    """AVIH's identification accuracy (paper Table 3) per recogniser: original probes against
    the protected photos of their person (Set_s) and everyone else's photos (Set_d), and the
    reference row with Set_s unprotected (identity.avih_verdicts)."""
    people = _people(gallery, cases, faces)
    not_probed = {m.name: "no other photo of this person has a protected version" for who, ms in people.items()
                  for m in ms if not any(o.protected for o in ms if o is not m)}
    result = {"people": {who: len(ms) for who, ms in people.items()},
              "protected_photos": {who: sum(bool(m.protected) for m in ms) for who, ms in people.items()},
              "different_identity_photos": "every photo of the other people and the distractors, unprotected",
              "not_probed": not_probed, "recognizers": {}}
    if not any(m.protected for ms in people.values() for m in ms):
        return result
    for recognizer in recognizers:
        verdicts = avih_verdicts(recognizer, people, gallery.distractors)
        hidden = [v for per_probe in verdicts.protected.values() for v in per_probe]
        result["recognizers"][recognizer.name] = {
            "role": "white-box" if recognizer.name == guided_by else "transfer",
            "originals": {"queries": len(verdicts.reference), "accuracy": _mean(list(verdicts.reference.values())),
                          "right": verdicts.reference},
            "protected": {"queries": len(hidden), "accuracy": _mean(hidden), "right": verdicts.protected}}
    return result


def _identification(recognizers: Sequence[Recognizer], cases: Sequence[Case], faces: Sequence[Face],
                    gallery: Gallery, guided_by: str | None) -> dict:
    """Table 3 by AVIH's protocol, and re-identification of protected photos, on one gallery."""
    return {"gallery": {"folder": str(gallery.folder), "identities": {k: len(v) for k, v in gallery.identities.items()},
                        "distractors": len(gallery.distractors), "skipped": gallery.skipped},
            "avih": _avih(recognizers, cases, faces, gallery, guided_by),
            "reidentification": _reidentification(recognizers, cases, faces, gallery, guided_by)}


def _no_output(cases: Sequence[Case]) -> set[str]:
    """Originals that produced nothing while others did (their protection failed)."""
    if not any(c.protected or c.recovered is not None for c in cases):
        return set()
    return {c.stem for c in cases if not c.protected and c.recovered is None}


def _locate(cases: Sequence[Case], without_output: set[str], why: str) -> tuple[list[Case], list[Face], dict]:
    """The cases measured, each one's primary MTCNN face, and the results' common part: the
    cases left out (``without_output``, for ``why``, and those without a face), resized files
    and faces."""
    reference = MtcnnDetector()
    located = [(c, reference.detect(c.original)) for c in cases if c.stem not in without_output]
    usable = [(c, found[0]) for c, found in located if found]
    skipped = {stem: why for stem in sorted(without_output)}
    skipped.update({c.stem: "no face found by MTCNN in the original" for c, found in located if not found})
    kept = [c for c, _ in usable]
    return kept, [f for _, f in usable], {
        "cases": [c.stem for c in kept], "skipped": skipped,
        "resized": {c.stem: c.resized for c in cases if c.resized}, "faces": {c.stem: f.as_dict() for c, f in usable}}


def evaluate(cases: Sequence[Case], recognizers: Sequence[Recognizer], detectors: Sequence[Detector],
             guided_by: str | None = None, gallery: Gallery | None = None) -> Evaluation:
    """Protection, recovery, utility and diversity for `cases` (see the module doc), and
    identification against `gallery` when one is given; `guided_by` names the recogniser
    that guided the protection, if any."""
    kept, faces, common = _locate(cases, _no_output(cases), "no protected or recovered image (failed or not run)")
    evaluation = Evaluation({
        **common,
        "guided_by": guided_by,
        "ablations": {c.stem: c.ablations for c in kept if c.ablations},
        "protection": {}, "recovery": {"images": 0}, "utility": {}, "identification": None,
    })
    if not kept:
        return evaluation
    originals = {r.name: r.embed([c.original for c in kept], faces) for r in recognizers}
    for recognizer in recognizers:
        role = "white-box" if recognizer.name == guided_by else "transfer"
        result, embeddings = _protection(recognizer, originals[recognizer.name], kept, faces, role)
        evaluation.results["protection"][recognizer.name] = result
        evaluation.embeddings[recognizer.name] = embeddings
    evaluation.results["recovery"] = _recovery(recognizers, originals, kept, faces)
    if gallery is not None:
        evaluation.results["identification"] = _identification(recognizers, kept, faces, gallery, guided_by)
    for detector in detectors:
        evaluation.results["utility"][detector.name] = _utility(detector, kept)
    return evaluation


def evaluate_wrong_keys(cases: Sequence[Case], recognizers: Sequence[Recognizer], variants: Sequence) -> Evaluation:
    """The wrong-key experiment (paper Fig. 7): Table 2's measures of each variant's picture
    (``variants``: wrong_keys.Variant) against the original, Cos-IE included. Cases whose run
    produced no picture are left out."""
    kept, faces, common = _locate(cases, {c.stem for c in cases if not c.variants}, "no picture (the run failed)")
    evaluation = Evaluation({**common, "variants": {}})
    if not kept:
        return evaluation
    originals = {r.name: r.embed([c.original for c in kept], faces) for r in recognizers}
    for variant in variants:
        measured = _recovery(recognizers, originals, kept, faces, lambda c, name=variant.name: c.variants.get(name))
        evaluation.results["variants"][variant.name] = {"title": variant.title, "keys": variant.keys(), **measured}
    return evaluation
