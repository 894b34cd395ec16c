"""Crowded pictures made from the real face photos that ship in installed packages, with
the true box of every face: what a detector's recall and false positives are measured on
(benchmarks/face_recall.py), and the small faces the tests protect.

The faces are scikit-image's astronaut and cameraman, the six people of insightface's
t1.jpg, insightface's Tom Hanks crop and the 100 faces of scikit-image's ``lfw_subset``
(25 x 25 px, grey, cut from the brows to the chin). Each is pasted under a soft oval onto a
real photo or texture at a chosen size (the longer side of its face box), some mirrored,
some rotated in the picture's plane; ``lfw_subset``'s 100 patches of non-faces are pasted
too, as distractors. The true boxes are the face boxes of the full-size photos (MTCNN at
full resolution, checked by eye; for the LFW crops, MTCNN's median box over all 100),
moved, scaled and rotated with the face. A rotated face's box is its unrotated box about
the rotated centre.

Pictures of real groups come from ``group_at_scale``: t1.jpg itself, shrunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .sample_photos import insightface_image

# (x1, y1, x2, y2) of each face in its full-size photo.
T1_FACES = ((51, 265, 169, 395), (463, 266, 573, 412), (907, 63, 1011, 200), (739, 344, 840, 477),
            (273, 149, 372, 262), (1133, 276, 1227, 397))
ASTRONAUT_FACE = (182, 64, 267, 174)
CAMERA_FACE = (198, 117, 257, 198)
HANKS_FACE = (-1, 2, 82, 118)
LFW_FACE = (1.6, -0.5, 20.3, 23.9)  # in every 25 x 25 face of lfw_subset
HEAD = 1.7  # a pasted head: the face box's longer side times this, square about its centre
BACKGROUNDS = ("coffee", "rocket", "hubble_deep_field", "chelsea", "brick", "grass", "gravel", "coins")


@dataclass(frozen=True)
class Source:
    """A face to paste: a picture holding it and its box in that picture."""

    name: str
    photo: np.ndarray  # RGB uint8
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class TrueFace:
    """A face in a made picture: its box (x1, y1, x2, y2) and how it was made."""

    box: tuple[float, float, float, float]
    source: str
    angle: float = 0.0  # degrees, in the picture's plane

    @property
    def size(self) -> float:
        """The longer side of the box: the size the picture was asked to hold."""
        x1, y1, x2, y2 = self.box
        return max(x2 - x1, y2 - y1)


@dataclass(frozen=True)
class Crowd:
    picture: np.ndarray  # RGB uint8
    faces: list[TrueFace]


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(image[..., None], 3, -1) if image.ndim == 2 else np.ascontiguousarray(image[..., :3])


def photo_sources() -> list[Source]:
    """The faces of full photos, with the photo around them (hair, ears, background)."""
    import skimage.data

    t1 = insightface_image("t1.jpg")
    sources = [Source(f"t1_{i}", t1, box) for i, box in enumerate(T1_FACES)]
    sources += [Source("astronaut", _rgb(skimage.data.astronaut()), ASTRONAUT_FACE),
                Source("cameraman", _rgb(skimage.data.camera()), CAMERA_FACE),
                Source("hanks", insightface_image("Tom_Hanks_54745.png"), HANKS_FACE)]
    return sources


def lfw_sources() -> tuple[list[Source], list[np.ndarray]]:
    """lfw_subset's 100 faces (as sources) and its 100 patches of non-faces."""
    import skimage.data

    lfw = skimage.data.lfw_subset()
    return [Source(f"lfw_{i}", _rgb(lfw[i]), LFW_FACE) for i in range(100)], [_rgb(p) for p in lfw[100:]]


def background(name: str, width: int, height: int) -> np.ndarray:
    """A scikit-image picture, resized to cover ``width`` x ``height`` and cut to it."""
    import skimage.data

    image = Image.fromarray(_rgb(getattr(skimage.data, name)()))
    scale = max(width / image.width, height / image.height)
    image = image.resize((math.ceil(image.width * scale), math.ceil(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)))


def _patch(source: Source, size: float, head: float) -> tuple[Image.Image, float, tuple[float, float]]:
    """The square around the face (its longer side x ``head``), scaled so the face's longer
    side is ``size`` px; with the scale and the face box centre's offset from the patch
    centre, in output pixels. Where the square leaves the photo, its edge is repeated."""
    x1, y1, x2, y2 = source.box
    longer = max(x2 - x1, y2 - y1)
    side = longer * head
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = math.floor(cx - side / 2), math.floor(cy - side / 2)
    n = math.ceil(side)
    h, w = source.photo.shape[:2]
    ys = np.clip(np.arange(top, top + n), 0, h - 1)
    xs = np.clip(np.arange(left, left + n), 0, w - 1)
    region = source.photo[ys][:, xs]
    scale = size / longer
    out = max(2, round(n * scale))
    scale = out / n
    centre_offset = ((cx - left - n / 2) * scale, (cy - top - n / 2) * scale)
    return Image.fromarray(region).resize((out, out), Image.LANCZOS), scale, centre_offset


def _oval(side: int, feather: float = 0.25) -> np.ndarray:
    """[side, side] alpha: 1 inside an oval a little smaller than the square, 0 at its edge."""
    coords = (np.arange(side) + 0.5) / side * 2 - 1
    r = np.sqrt(coords[None, :] ** 2 + coords[:, None] ** 2)
    return np.clip((1 - r) / feather, 0, 1)


def _paste(canvas: np.ndarray, patch: Image.Image, alpha: np.ndarray, cx: float, cy: float) -> None:
    """Blend ``patch`` into ``canvas`` in place, centred at (cx, cy), under ``alpha``; what
    falls outside the canvas is cut off."""
    side = patch.width
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    h, w = canvas.shape[:2]
    ys, xs = slice(max(0, y0), min(h, y0 + side)), slice(max(0, x0), min(w, x0 + side))
    inner = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
    region = canvas[ys, xs].astype(np.float32)
    a = alpha[inner][..., None]
    canvas[ys, xs] = np.round(region * (1 - a) + np.asarray(patch, np.float32)[inner] * a).astype(np.uint8)


def _place(occupied: list[tuple[float, float, float]], radius: float, width: int, height: int,
           rng: np.random.Generator) -> tuple[float, float] | None:
    """A centre for a disc of ``radius`` inside the picture, clear of the discs placed."""
    for _ in range(400):
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        if all(math.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in occupied):
            return cx, cy
    return None


def crowd(sizes: list[float], seed: int = 0, width: int = 960, height: int = 640, rotate: float = 0.3,
          distractors: int = 6, backdrop: str | None = None, edge_face: float | None = None) -> Crowd:
    """A picture holding one face per entry of ``sizes`` (the longer side of its box, px),
    at random places that do not overlap: faces of 32 px and less are LFW faces half of the
    time, the others faces of full photos; about half are mirrored and ``rotate`` of them
    turned by 10-30 degrees in the picture's plane. Larger faces are placed first, so a
    picture that cannot hold them all drops the smallest (never silently: see ``faces``).
    ``edge_face``: first, a face of that size cut by the picture's left edge (a fifth of its
    box outside), the astronaut's."""
    rng = np.random.default_rng(seed)
    photos, (lfw, non_faces) = photo_sources(), lfw_sources()
    canvas = background(backdrop or BACKGROUNDS[seed % len(BACKGROUNDS)], width, height).copy()
    occupied, faces = [], []
    if edge_face:
        source = next(s for s in photos if s.name == "astronaut")
        patch, scale, (ox, oy) = _patch(source, edge_face, HEAD)
        x1, y1, x2, y2 = source.box
        half_w, half_h = (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
        fx, fy = 0.3 * 2 * half_w, height / 2  # the box from -0.2 to 0.8 of its width: a fifth outside
        cx, cy = fx - ox, fy - oy
        _paste(canvas, patch, _oval(patch.width, 0.15), cx, cy)
        fx, fy = round(cx - patch.width / 2) + patch.width / 2 + ox, round(cy - patch.width / 2) + patch.width / 2 + oy
        occupied.append((cx, cy, patch.width / 2 * 1.05))
        faces.append(TrueFace((fx - half_w, fy - half_h, fx + half_w, fy + half_h), source.name))
    for size in sorted(sizes, reverse=True):
        tight = size <= 32 and rng.random() < 0.5
        source = lfw[rng.integers(len(lfw))] if tight else photos[rng.integers(len(photos))]
        patch, scale, (ox, oy) = _patch(source, size, 1.0 if tight else HEAD)
        alpha = _oval(patch.width, 0.15) if not tight else np.minimum(_oval(patch.width, 0.6) * 3, 1)
        mirrored = rng.random() < 0.5
        if mirrored:
            patch, ox = patch.transpose(Image.FLIP_LEFT_RIGHT), -ox
            alpha = alpha[:, ::-1]
        angle = float(rng.choice([-1, 1]) * rng.uniform(10, 30)) if rng.random() < rotate else 0.0
        if angle:
            patch = patch.rotate(angle, resample=Image.BICUBIC, fillcolor=(0, 0, 0))
            alpha = np.asarray(Image.fromarray(alpha.astype(np.float32)).rotate(angle, resample=Image.BILINEAR))
            rad = math.radians(angle)  # PIL turns counter-clockwise on screen (y points down)
            ox, oy = ox * math.cos(rad) + oy * math.sin(rad), -ox * math.sin(rad) + oy * math.cos(rad)
        spot = _place(occupied, patch.width / 2 * 1.05, width, height, rng)
        if spot is None:
            continue
        cx, cy = spot
        _paste(canvas, patch, alpha, cx, cy)
        occupied.append((cx, cy, patch.width / 2 * 1.05))
        x1, y1, x2, y2 = source.box
        half_w, half_h = (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
        fx, fy = round(cx - patch.width / 2) + patch.width / 2 + ox, round(cy - patch.width / 2) + patch.width / 2 + oy
        faces.append(TrueFace((fx - half_w, fy - half_h, fx + half_w, fy + half_h), source.name, angle))
    for _ in range(distractors):
        size = int(rng.integers(16, 49))
        patch = Image.fromarray(non_faces[rng.integers(len(non_faces))]).resize((size, size), Image.BICUBIC)
        spot = _place(occupied, size / 2 * 1.05, width, height, rng)
        if spot is not None:
            _paste(canvas, patch, np.minimum(_oval(size, 0.6) * 3, 1), *spot)
            occupied.append((*spot, size / 2 * 1.05))
    return Crowd(canvas, faces)


def group_at_scale(scale: float) -> Crowd:
    """insightface's t1.jpg (six people, faces of about 100-145 px) shrunk by ``scale``."""
    t1 = Image.fromarray(insightface_image("t1.jpg"))
    size = (round(t1.width * scale), round(t1.height * scale))
    picture = np.asarray(t1.resize(size, Image.LANCZOS))
    fx, fy = size[0] / t1.width, size[1] / t1.height
    return Crowd(picture, [TrueFace((x1 * fx, y1 * fy, x2 * fx, y2 * fy), f"t1_{i}")
                           for i, (x1, y1, x2, y2) in enumerate(T1_FACES)])


def match(found_boxes: list[tuple[float, float, float, float]], scores: list[float],
          truth: list[TrueFace]) -> tuple[list[bool], list[bool]]:
    """Which true faces were found, and which detections are true faces: a detection finds a
    face when its centre lies within half the face's longer side of the face's centre and
    its longer side is within a factor of two of the face's; each face is found at most
    once, detections taken by score. (Centre and size rather than IoU: detectors draw their
    boxes differently, CenterFace's taller than MTCNN's.)"""
    found = [False] * len(truth)
    true_detection = [False] * len(found_boxes)
    for d in sorted(range(len(found_boxes)), key=lambda k: -scores[k]):
        x1, y1, x2, y2 = found_boxes[d]
        cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1)
        best, best_distance = None, None
        for k, face in enumerate(truth):
            if found[k]:
                continue
            tx1, ty1, tx2, ty2 = face.box
            distance = math.hypot(cx - (tx1 + tx2) / 2, cy - (ty1 + ty2) / 2)
            if distance <= face.size / 2 and 0.5 <= side / face.size <= 2 and \
                    (best_distance is None or distance < best_distance):
                best, best_distance = k, distance
        if best is not None:
            found[best] = True
            true_detection[d] = True
    return found, true_detection
