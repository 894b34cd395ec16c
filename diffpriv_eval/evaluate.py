"""All measurements over a set of cases, as one JSON-ready dictionary.

Identity is measured at the primary (largest) MTCNN face of each original; originals
without a face are listed under "skipped" and left out of every table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from diffpriv_eval import metrics
from diffpriv_eval.detectors import Detector, MtcnnDetector
from diffpriv_eval.diversity import pairwise_distances
from diffpriv_eval.identity import protection_success_rate
from diffpriv_eval.images import Case
from diffpriv_eval.recognizers import Recognizer, cosines, distances
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
                faces: Sequence[Face]) -> tuple[dict, EmbeddingSet]:
    """Each candidate's identity distance to its original (`originals`: their
    embeddings), and between candidates of the same original (diversity)."""
    owner = [k for k, case in enumerate(cases) for _ in case.protected]
    result = {"threshold": recognizer.threshold, "candidates": len(owner)}
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
              faces: Sequence[Face]) -> dict:
    """Pixel metrics and, per recogniser, the identity cosine of recovered vs original."""
    recovered = [(k, c) for k, c in enumerate(cases) if c.recovered is not None]
    if not recovered:
        return {"images": 0}
    lpips_reason = metrics.lpips_unavailable_reason()
    per_image = {c.stem: _pixel_metrics(c.original, c.recovered, lpips_reason is None) for _, c in recovered}
    index = [k for k, _ in recovered]
    for recognizer in recognizers:
        embedded = recognizer.embed([c.recovered for _, c in recovered], [faces[k] for k in index])
        for (_, c), value in zip(recovered, cosines(originals[recognizer.name][index], embedded)):
            per_image[c.stem][f"identity_cosine_{recognizer.name}"] = float(value)
    names = next(iter(per_image.values())).keys()
    return {"images": len(recovered), "lpips_not_computed": lpips_reason,
            "mean": {n: _mean([v[n] for v in per_image.values()]) for n in names}, "per_image": per_image}


def _utility(detector: Detector, cases: Sequence[Case]) -> dict:
    found = [detector.detect(c.original) for c in cases]
    with_face = [(c, f[0]) for c, f in zip(cases, found) if f]
    result = {"originals": len(cases), "original_detection_rate": len(with_face) / len(cases)}
    pairs = [(ref, image) for c, ref in with_face for image in c.protected]
    if pairs:
        result["protected"] = compare_detections([r for r, _ in pairs], [detector.detect(i) for _, i in pairs]).as_dict()
    return result


def evaluate(cases: Sequence[Case], recognizers: Sequence[Recognizer], detectors: Sequence[Detector]) -> Evaluation:
    """Protection, recovery, utility and diversity for `cases` (see the module doc)."""
    reference = MtcnnDetector()
    located = [(c, reference.detect(c.original)) for c in cases]
    usable = [(c, found[0]) for c, found in located if found]
    kept, faces = [c for c, _ in usable], [f for _, f in usable]
    evaluation = Evaluation({
        "cases": [c.stem for c in kept],
        "skipped": {c.stem: "no face found by MTCNN in the original" for c, found in located if not found},
        "resized": {c.stem: c.resized for c in cases if c.resized},
        "faces": {c.stem: f.as_dict() for c, f in usable},
        "protection": {}, "recovery": {"images": 0}, "utility": {},
    })
    if not kept:
        return evaluation
    originals = {r.name: r.embed([c.original for c in kept], faces) for r in recognizers}
    for recognizer in recognizers:
        result, embeddings = _protection(recognizer, originals[recognizer.name], kept, faces)
        evaluation.results["protection"][recognizer.name] = result
        evaluation.embeddings[recognizer.name] = embeddings
    evaluation.results["recovery"] = _recovery(recognizers, originals, kept, faces)
    for detector in detectors:
        evaluation.results["utility"][detector.name] = _utility(detector, kept)
    return evaluation
