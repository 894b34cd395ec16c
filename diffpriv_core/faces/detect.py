"""Face detection with 5 landmarks.

MTCNN from facenet-pytorch is the default: its weights ship inside the package, so it
works offline out of the box. insightface's SCRFD (the detector of its model packs, which
users of IPAdapter/InstantID/ReActor already have) is used when its file is given; it needs
the optional insightface and onnxruntime packages.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model_files import KnownModel, find_face_model

MTCNN = "mtcnn"
SCRFD_INPUT = (640, 640)  # insightface's FaceAnalysis default detection size
KNOWN_DETECTORS = (
    KnownModel("insightface", "models/buffalo_l/det_10g.onnx", "SCRFD-10G detector of insightface's buffalo_l pack",
               "insightface model zoo (github.com/deepinsight/insightface, python-package README)",
               "non-commercial research only"),
    KnownModel("insightface", "models/antelopev2/scrfd_10g_bnkps.onnx", "SCRFD-10G of insightface's antelopev2 pack",
               "insightface model zoo", "non-commercial research only"),
)
SCRFD_FILES = frozenset(m.file for m in KNOWN_DETECTORS) | {"det_2.5g.onnx", "det_500m.onnx"}


class NoFaceError(ValueError):
    """No face passed the detector's thresholds in an image that needs one."""

    def __init__(self, index: int, detail: str = ""):
        super().__init__(f"no face found in image {index} of the batch{detail}")
        self.index = index


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    # MTCNN: left eye, right eye, nose, mouth left, mouth right; dlib (evaluation): the 68 iBUG points
    landmarks: tuple[tuple[float, float], ...]
    score: float

    @property
    def size(self) -> float:
        x1, y1, x2, y2 = self.box
        return min(x2 - x1, y2 - y1)

    def moved(self, dx: float, dy: float) -> "Face":
        """The same face in a picture whose pixel (x, y) is this one's (x - dx, y - dy)."""
        x1, y1, x2, y2 = self.box
        return Face((x1 + dx, y1 + dy, x2 + dx, y2 + dy), tuple((x + dx, y + dy) for x, y in self.landmarks),
                    self.score)

    def as_dict(self) -> dict:
        return {"box": list(self.box), "landmarks": [list(p) for p in self.landmarks], "score": self.score}

    @classmethod
    def from_dict(cls, d: dict) -> "Face":
        return cls(tuple(map(float, d["box"])), tuple(tuple(map(float, p)) for p in d["landmarks"]), float(d["score"]))


@functools.lru_cache(maxsize=4)
def _mtcnn(min_face_size: int):
    from facenet_pytorch import MTCNN

    return MTCNN(keep_all=True, min_face_size=min_face_size, device="cpu", post_process=False)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H, W, C] float in [0, 1] (ComfyUI IMAGE layout) -> [H, W, 3] uint8 RGB."""
    arr = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


@functools.lru_cache(maxsize=2)
def _scrfd(path: str):
    try:
        from insightface.model_zoo.scrfd import SCRFD
    except ImportError as exc:
        raise ImportError("the insightface detector needs the optional insightface and onnxruntime packages "
                          "(pip install 'comfyui-diffprivacy[insightface]'); or use mtcnn") from exc
    detector = SCRFD(model_file=path)
    detector.prepare(ctx_id=-1, input_size=SCRFD_INPUT)
    return detector


def is_detector_file(path: Path) -> bool:
    """insightface packs hold several ONNX files; the detectors go by these names."""
    return path.name in SCRFD_FILES


def find_detector(name: str, folders: list[str]) -> Path:
    """An insightface detector file by (relative) name, or the error that says where to get one."""
    return find_face_model(name, folders, KNOWN_DETECTORS, "face detector")


def _mtcnn_detect(photo: np.ndarray, min_size: int) -> list[Face]:
    boxes, probs, points = _mtcnn(max(int(min_size), 12)).detect(photo, landmarks=True)
    if boxes is None:
        return []
    return [Face(tuple(float(v) for v in b), tuple((float(x), float(y)) for x, y in p), float(s))
            for b, s, p in zip(boxes, probs, points)]


def _border_needed(faces: list[Face], height: int, width: int) -> int:
    """The black border that puts every face's refinement candidate (about its box, squared
    and grown by a quarter) inside the photo; 0 when they all are."""
    worst = 0.0
    for face in faces:
        x1, y1, x2, y2 = face.box
        half = 0.625 * max(x2 - x1, y2 - y1)  # half the side of the grown square
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        worst = max(worst, half - cx, half - cy, cx + half - width, cy + half - height)
    return int(np.ceil(worst))


def _mtcnn_faces(image: torch.Tensor, min_size: int) -> list[Face]:
    """MTCNN's faces, also right for a face cut by the photo's edge. facenet-pytorch clips a
    candidate box to the photo and stretches what is left to its refinement networks' input,
    yet applies their box and landmark regression to the unclipped box, so the landmarks of
    such a face come out about 20 px off (and a recogniser reading there sees another
    person). The original MTCNN pads with black instead; so does this, when a face needs it:
    detect again on the photo in a black border, and move the faces back."""
    photo = to_uint8(image)
    faces = _mtcnn_detect(photo, min_size)
    height, width = photo.shape[:2]
    border = _border_needed(faces, height, width)
    if not border:
        return faces
    framed = np.pad(photo, ((border, border), (border, border), (0, 0)))
    faces = [f.moved(-border, -border) for f in _mtcnn_detect(framed, min_size)]
    return [f for f in faces if 0 <= (f.box[0] + f.box[2]) / 2 < width and 0 <= (f.box[1] + f.box[3]) / 2 < height]


def _scrfd_faces(image: torch.Tensor, path: Path, min_score: float) -> list[Face]:
    bgr = np.ascontiguousarray(to_uint8(image)[..., ::-1])  # insightface works on OpenCV's BGR
    boxes, points = _scrfd(str(path)).detect(bgr, input_size=SCRFD_INPUT, max_num=0, det_thresh=min_score)
    return [Face(tuple(float(v) for v in b[:4]), tuple((float(x), float(y)) for x, y in p), float(b[4]))
            for b, p in zip(boxes, points)]


def detect_faces(image: torch.Tensor, min_score: float = 0.9, min_size: int = 20,
                 detector: str | Path = MTCNN) -> list[Face]:
    """Faces in one [H, W, C] image, largest first; ``detector`` is "mtcnn" or the path of
    an insightface SCRFD file."""
    faces = _mtcnn_faces(image, min_size) if detector == MTCNN else _scrfd_faces(image, Path(detector), min_score)
    return sorted((f for f in faces if f.score >= min_score and f.size >= min_size), key=lambda f: -f.size)


def box_mask(height: int, width: int, faces: list[Face]) -> torch.Tensor:
    """A [H, W] mask, 1 inside any face box."""
    mask = torch.zeros(height, width)
    for f in faces:
        x1, y1, x2, y2 = f.box
        mask[max(int(y1), 0):max(int(np.ceil(y2)), 0), max(int(x1), 0):max(int(np.ceil(x2)), 0)] = 1.0
    return mask
