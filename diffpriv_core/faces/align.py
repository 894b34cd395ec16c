"""Face alignment: the similarity transform to a recogniser's template, and a
differentiable warp that applies it.

The transform is estimated once, from the ORIGINAL image's five landmarks, and the same
fixed transform aligns every intermediate image of the guided sampler (method.md: Stage II
decision), so arbitrary photos work and not only FFHQ-aligned crops.

Matrices are 2x3 and map pixel coordinates of the source image (pixel centres at
integers, as in OpenCV's ``warpAffine``) to pixel coordinates of the aligned crop.
"""
from __future__ import annotations

import numpy as np
import torch

ARCFACE_SIZE = 112

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
