"""Face alignment: how each recogniser wants its face cut out (the similarity transform of
five landmarks to a template, or a detector box crop), and a differentiable warp that
applies it.

The transform is estimated once, from the ORIGINAL image's five landmarks, and the same
fixed transform aligns every intermediate image of the guided sampler (method.md: Stage II
decision), so arbitrary photos work and not only FFHQ-aligned crops.

Matrices are 2x3 and map pixel coordinates of the source image (pixel centres at
integers, as in OpenCV's ``warpAffine``) to pixel coordinates of the aligned crop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ARCFACE_SIZE = 112


@dataclass(frozen=True)
class Alignment:
    """``five_point``: the similarity transform of the five landmarks to the ArcFace template
    (ArcFace, SFace: OpenCV's ``alignCrop`` uses the same template). ``box``: the detector's
    box grown by ``margin`` pixels of the crop in total, stretched to the crop (FaceNet:
    facenet-pytorch's MTCNN crop, margin 32 at 160 px)."""

    kind: str
    margin: float = 0.0


FIVE_POINT = Alignment("five_point")
FACENET_BOX = Alignment("box", margin=32.0)

# insightface's ``face_align.arcface_dst`` (left eye, right eye, nose, mouth left, mouth
# right in a 112 x 112 crop). insightface is optional, so its value is kept here for when it
# is absent; a test checks the two never drift apart.
_ARCFACE_DST_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


def arcface_template(size: int = ARCFACE_SIZE) -> np.ndarray:
    """The five landmark positions of insightface's ArcFace template in a ``size`` crop;
    FaceNet's 160 px crop uses the same template scaled."""
    try:
        from insightface.utils.face_align import arcface_dst
    except ImportError:
        arcface_dst = _ARCFACE_DST_112
    return np.asarray(arcface_dst, dtype=np.float64) * (size / ARCFACE_SIZE)


def alignment_matrix(landmarks, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """The least-squares similarity transform (skimage, as insightface's ``estimate_norm``)
    from five source landmarks [5, 2] to the template of a ``size`` crop, as a [2, 3] matrix."""
    from skimage.transform import SimilarityTransform

    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    dst = arcface_template(size)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = SimilarityTransform.from_estimate(src, dst)
    else:
        tform = SimilarityTransform()
        tform = tform if tform.estimate(src, dst) else None
    if not tform:
        raise ValueError(f"cannot estimate a similarity transform from landmarks {src.tolist()}")
    return torch.from_numpy(tform.params[:2].copy()).to(torch.float32)


def box_matrix(box, size: int, margin: float) -> torch.Tensor:
    """[2, 3]: the box (x1, y1, x2, y2, pixel edges) grown as facenet-pytorch's
    ``extract_face`` grows it, onto a ``size`` crop. Unlike it, a box that runs off the
    photo is not clipped (that would stretch the face): outside the photo is black."""
    x1, y1, x2, y2 = (float(v) for v in box)
    grow_x = margin * (x2 - x1) / (size - margin) / 2
    grow_y = margin * (y2 - y1) / (size - margin) / 2
    x1, x2, y1, y2 = x1 - grow_x, x2 + grow_x, y1 - grow_y, y2 + grow_y
    sx, sy = size / (x2 - x1), size / (y2 - y1)
    # pixel centres: crop pixel u covers [u, u + 1) of the crop's edges
    return torch.tensor([[sx, 0.0, sx * (0.5 - x1) - 0.5], [0.0, sy, sy * (0.5 - y1) - 0.5]], dtype=torch.float32)


def face_matrix(face, size: int, alignment: Alignment) -> torch.Tensor:
    """The [2, 3] alignment of a detected ``Face`` (box and five landmarks) for a recogniser."""
    if alignment.kind == "five_point":
        return alignment_matrix(face.landmarks, size)
    if alignment.kind == "box":
        return box_matrix(face.box, size, alignment.margin)
    raise ValueError(f"unknown face alignment {alignment.kind!r}")


def shift_source(matrix: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """The same alignment for a sub-image whose top-left pixel sits at (dx, dy) in the
    source: crop pixel p is source pixel p + (dx, dy)."""
    shifted = matrix.clone()
    shifted[..., 2] = shifted[..., 2] + shifted[..., 0] * dx + shifted[..., 1] * dy
    return shifted


def warp_faces(images: torch.Tensor, matrices: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiably align faces: [B, H, W, 3] (ComfyUI) or [B, 3, H, W] images and [B, 2, 3]
    (or one [2, 3]) matrices -> [B, 3, size, size]. Outside the source the crop is black,
    as in insightface's ``norm_crop``."""
    from kornia.geometry.transform import warp_affine

    if images.shape[1] != 3 and images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    matrices = matrices.to(images.device, images.dtype).expand(images.shape[0], 2, 3)
    # align_corners=True is OpenCV's pixel-centre convention, the one the matrices use.
    return warp_affine(images, matrices, (size, size), mode="bilinear", padding_mode="zeros", align_corners=True)
