"""Utility of protected images (paper Table 4): is the face still detected where it was,
and do its box and landmarks stay put."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from diffpriv_core.faces.detect import Face

# A detection counts as the same face when its box overlaps the reference this much.
MIN_IOU = 0.3


def iou(a: Face, b: Face) -> float:
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def match_face(reference: Face, candidates: Sequence[Face]) -> Face | None:
    """The candidate that best overlaps the reference, if any overlaps enough."""
    best = max(candidates, key=lambda f: iou(reference, f), default=None)
    return best if best is not None and iou(reference, best) >= MIN_IOU else None


def box_distance(a: Face, b: Face) -> float:
    """Mean Euclidean distance, in pixels, of the top-left and bottom-right corners."""
    corners = np.reshape(a.box, (2, 2)) - np.reshape(b.box, (2, 2))
    return float(np.linalg.norm(corners, axis=1).mean())


def landmark_distance(a: Face, b: Face) -> float:
    """Mean Euclidean distance, in pixels, of corresponding landmarks."""
    return float(np.linalg.norm(np.subtract(a.landmarks, b.landmarks), axis=1).mean())


@dataclass(frozen=True)
class UtilityResult:
    images: int
    detection_rate: float  # fraction of images where the reference face was found again
    box_distance: float | None  # px, mean over detected faces; None when none was found
    landmark_distance: float | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def compare_detections(references: Sequence[Face], detections: Sequence[Sequence[Face]]) -> UtilityResult:
    """references[i]: the face found in original i; detections[i]: what the same detector
    found in its protected version."""
    matches = [(ref, match_face(ref, found)) for ref, found in zip(references, detections, strict=True)]
    found = [(ref, m) for ref, m in matches if m is not None]
    if not matches:
        raise ValueError("no images to compare")
    return UtilityResult(
        images=len(matches),
        detection_rate=len(found) / len(matches),
        box_distance=float(np.mean([box_distance(r, m) for r, m in found])) if found else None,
        landmark_distance=float(np.mean([landmark_distance(r, m) for r, m in found])) if found else None,
    )
