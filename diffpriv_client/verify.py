"""Fail closed: what a protect prompt brought back is checked before anything of it is
written, and "ok" means every face found was protected and has its key.

The checks, on the photo as the command sent it (pictures.read_photo), after batch.download
has made sure a key came back at all:
- every face Face Detect reported (its ``diffprivacy_faces`` history output) has a key (a
  whole-image key holds every face of its picture); without that report only a
  whole-image run is checked (--whole-image, or a workflow whose MSI trains on the photo
  itself): in every-face mode nothing else says that every face was found;
- in every picture of the photo's size (the protected photos), every face with a key
  changed: at least CHANGED_SHARE of its box's pixels differ from the original's; a
  whole-image key's picture changed in that share of all its pixels;
- a protected photo from Face Paste changed no pixel outside the squares of the faces
  with a key (a changed face without its key could never be recovered);
- with ``strict``, Face Detect reported no possible face (a candidate scoring under its
  threshold, or one its size or selection settings left out): those are not protected.
Pictures of other sizes (a workflow's crops, masks, previews) are no protected photos and
are written as saved. Every number a server reports is checked before it is used.
"""
from __future__ import annotations

import math

import numpy as np

from diffpriv_core.key_format import face_crop_summary, read_container

from . import graphs
from .comfy_http import PromptResult
from .pictures import Photo, decode_picture, read_photo

# A pixel changed when one of its channels moved by more than this many levels (of 255).
CHANGED_LEVELS = 2
# A face counts as changed when at least this share of its box's pixels changed (its
# feathered mask covers about 90 % of the box with full weight).
CHANGED_SHARE = 0.5
REPORT_KEY = "diffprivacy_faces"  # Face Detect's history output
MAX_REPORTED = 10_000  # faces or possible faces a report may list
MAX_COORDINATE = 1 << 20


class NotProtected(RuntimeError):
    """The photo fails: a face was not protected, or has no key, or cannot be checked.
    ``report`` holds what the command found (for summary.json)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def check_protected(source, strict: bool, graph: dict, result: PromptResult, pictures: list[tuple[str, bytes]],
                    keys: list[bytes], whole_image: bool = False) -> dict:
    """Check what a protect prompt for the photo at ``source`` brought back (``pictures``:
    (SaveImage node id, bytes); ``keys``: key files, already checked as keys; ``whole_image``:
    the user said each photo is one face, --whole-image). Returns the summary's fields
    {"photo", "detection"}; raises NotProtected, with them and the faces of the keys that
    came back, when the photo must fail."""
    photo = read_photo(source)
    detection = detection_report(result)
    report = {"photo": {"size": list(photo.size), "notes": list(photo.notes)}, "detection": detection}
    faces = [face_crop_summary(read_container(data).meta) for data in keys]
    whole_image = whole_image or graphs.msi_sees_the_photo(graph)
    problems = _key_problems(faces, detection, whole_image, bool(graphs.nodes_of(graph, graphs.FACE_DETECT)))
    if strict and detection and detection["possible"]:
        problems.append(f"{_count(len(detection['possible']), 'possible face')} not protected (--strict): "
                        + ", ".join(f"box {p['box']} score {p['score']:.2f}" for p in detection["possible"]))
    pasted = graphs.pasted_saves(graph)
    # Under a whole-image key every face found must have changed too.
    changed = faces + (detection["faces"] if detection and None in faces else [])
    for number, (node_id, data) in enumerate(pictures, 1):
        picture = decode_picture(data)
        if picture.shape == photo.pixels.shape:
            problems += _picture_problems(photo, picture, changed, node_id in pasted, f"picture {number}")
    if problems:
        raise NotProtected("; ".join(problems), dict(report, faces=[face for face in faces if face is not None]))
    return report


def _key_problems(faces: list[dict | None], detection: dict | None, whole_image: bool,
                  has_face_detect: bool) -> list[str]:
    if detection is None:
        if has_face_detect:
            return ["the workflow's Face Detect sent no report of the faces it found (diffprivacy_faces: a server "
                    "with an older Diff-Privacy pack, or a Face Detect no output depends on): nothing says every "
                    "face was protected"]
        if whole_image:
            return []
        return ["the workflow has no Face Detect, so nothing says every face of the photo was found and "
                "protected: use a workflow with Face Detect (the shipped every-face ones), or --whole-image when "
                "each photo is one face"]
    if None in faces:  # a whole-image key: its picture, every face in it, comes back from it
        return []
    keyed = {face["face"] for face in faces if face is not None}
    return [f"face {face['face']} ({face['size']:g} px at {face['box']}) was found but no key came back for it"
            for face in detection["faces"] if face["face"] not in keyed]


def _picture_problems(photo: Photo, picture: np.ndarray, faces: list[dict | None], pasted: bool,
                      which: str) -> list[str]:
    changed = (np.abs(picture.astype(np.int16) - photo.pixels).max(axis=-1) > CHANGED_LEVELS)
    problems = []
    for face in faces:
        region = changed if face is None else _region(changed, face["box"])
        share = float(region.mean()) if region.size else 0.0
        if share < CHANGED_SHARE:
            what = "the picture" if face is None else f"face {face['face']}"
            problems.append(f"{what} came back unchanged in {which}: {share:.0%} of its pixels changed "
                            f"(at least {CHANGED_SHARE:.0%} must)")
    squares = [face["crop"] for face in faces if face is not None and "crop" in face]
    if pasted and squares:
        outside = np.any(picture != photo.pixels, axis=-1)
        for x, y, side in squares:
            outside[max(0, y):max(0, y + side), max(0, x):max(0, x + side)] = False
        if outside.any():
            ys, xs = np.nonzero(outside)
            problems.append(f"{which} changed {int(outside.sum())} pixels outside every face with a key (within "
                            f"x {xs.min()}-{xs.max()}, y {ys.min()}-{ys.max()}): a face changed without its key")
    return problems


def _region(mask: np.ndarray, box) -> np.ndarray:
    """The part of ``mask`` inside a face box (clipped to the picture)."""
    height, width = mask.shape
    x1, y1, x2, y2 = box
    xs = slice(min(width, max(0, math.floor(x1))), min(width, max(0, math.ceil(x2))))
    ys = slice(min(height, max(0, math.floor(y1))), min(height, max(0, math.ceil(y2))))
    return mask[ys, xs]


# --- what Face Detect reported --------------------------------------------------------
def detection_report(result: PromptResult) -> dict | None:
    """Face Detect's report of the photo (image 0 of its batch): detector, thresholds, the
    faces to protect ({"face", "box", "score", "size"}) and the possible faces not protected
    ({"box", "score"}); None when no node reported (a workflow without Face Detect, or a
    server whose pack predates the report). A report that is not the numbers Face Detect
    writes raises NotProtected: the photo cannot be checked."""
    entries = [entry for output in result.outputs.values() if isinstance(output, dict)
               for entry in output.get(REPORT_KEY) or []]
    if not entries:
        return None
    try:
        (entry,) = [e for e in entries if isinstance(e, dict) and e.get("image") == 0] or [None]
        return {"detector": _text(entry.get("detector")), "min_size": _number(entry.get("min_size")),
                "min_score": _number(entry.get("min_score")),
                "faces": [{"face": _index(f["face"]), "box": _box(f["box"]), "score": _score(f["score"]),
                           "size": _number(f["size"])} for f in _bounded(entry["faces"])],
                "possible": [{"box": _box(p["box"]), "score": _score(p["score"])}
                             for p in _bounded(entry.get("possible", []))]}
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise NotProtected(f"Face Detect's report cannot be read ({exc}): the photo cannot be checked",
                           {"detection": None}) from None


def _bounded(items) -> list:
    if not isinstance(items, list) or len(items) > MAX_REPORTED:
        raise ValueError(f"a list of at most {MAX_REPORTED} entries expected")
    return items


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > MAX_COORDINATE:
        raise ValueError(f"{value!r} is not a bounded number")
    return round(float(value), 2)


def _index(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_REPORTED:
        raise ValueError(f"{value!r} is not a face index")
    return value


def _score(value) -> float:
    score = _number(value)
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"score {value!r} is not within 0 to 1")
    return round(float(value), 4)


def _box(value) -> list[float]:
    if not isinstance(value, list) or len(value) != 4:
        raise ValueError(f"{value!r} is not a box [x1, y1, x2, y2]")
    return [round(_number(v), 1) for v in value]


def _text(value) -> str:
    if not isinstance(value, str) or len(value) > 200:
        raise ValueError(f"{value!r} is not a detector name")
    return value


# --- what the command says -------------------------------------------------------------
def describe(name: str, entry: dict) -> str:
    """One line per photo: the faces found (sizes, scores), the protection each got, and the
    possible faces not protected."""
    detection, faces = entry.get("detection"), entry.get("faces") or []
    if detection is None:
        if not faces:
            return f"{name}: {entry['status']}"
        return f"{name}: {entry['status']}, {_count(len(faces), 'face')} protected, each with its key"
    keyed = {face["face"]: face for face in faces}
    found = ", ".join(f"#{f['face']} {f['size']:g} px score {f['score']:.2f}"
                      + (f" {keyed[f['face']]['protection']}" if keyed.get(f["face"], {}).get("protection") else "")
                      + ("" if f["face"] in keyed else " NO KEY") for f in detection["faces"])
    line = f"{name}: {entry['status']}, {_count(len(detection['faces']), 'face')} found ({found or 'none'})"
    if detection["possible"]:
        line += (f"; {_count(len(detection['possible']), 'possible face')} NOT protected: "
                 + ", ".join(f"box {p['box']} score {p['score']:.2f}" for p in detection["possible"]))
    return line


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"
