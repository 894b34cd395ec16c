"""Baselines, to calibrate the metrics on real photos.

Blur and mosaic act on a face box (the whole image when none is given), as deployed
anonymisers do; their strength is in pixels, so it means the same on any photo size.
Identity guidance without diffusion is the method's identity energy alone, applied to the
photo itself: what a gradient attack on the guiding recogniser does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image, ImageFilter

if TYPE_CHECKING:
    from diffpriv_core.adapters.protocols import FaceEmbedder
    from diffpriv_core.faces.detect import Face

Box = tuple[float, float, float, float]


def _region(image: np.ndarray, box: Box | None) -> tuple[int, int, int, int]:
    height, width = image.shape[:2]
    if box is None:
        return 0, 0, width, height
    x1, y1, x2, y2 = box
    return max(int(x1), 0), max(int(y1), 0), min(int(np.ceil(x2)), width), min(int(np.ceil(y2)), height)


def _apply(image: np.ndarray, box: Box | None, transform: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    x1, y1, x2, y2 = _region(image, box)
    out = np.array(image, copy=True)
    out[y1:y2, x1:x2] = np.asarray(transform(Image.fromarray(out[y1:y2, x1:x2])))
    return out


def gaussian_blur(image: np.ndarray, sigma: float, box: Box | None = None) -> np.ndarray:
    """Gaussian blur with standard deviation `sigma` pixels."""
    return _apply(image, box, lambda region: region.filter(ImageFilter.GaussianBlur(sigma)))


def mosaic(image: np.ndarray, block: float, box: Box | None = None) -> np.ndarray:
    """Pixelation into blocks of `block` pixels (each block's mean colour)."""
    def pixelate(region: Image.Image) -> Image.Image:
        small = (max(1, round(region.width / block)), max(1, round(region.height / block)))
        return region.resize(small, Image.Resampling.BOX).resize(region.size, Image.Resampling.NEAREST)

    return _apply(image, box, pixelate)


BASELINES: dict[str, Callable[..., np.ndarray]] = {"blur": gaussian_blur, "mosaic": mosaic}
GUIDANCE = "guidance"  # identity guidance without diffusion; needs a face and a recogniser
GUIDANCE_STEPS = 12
GUIDANCE_CAP = 10.0  # the largest lambda of one step


def identity_guidance(image: np.ndarray, face: "Face", recognizer: "FaceEmbedder", margin: float = 0.05,
                      steps: int = GUIDANCE_STEPS) -> np.ndarray:
    """Anonymization by the identity energy alone (``guided.guide_without_diffusion``, the
    image as its own latent: an identity codec in place of the VAE, no UNet, no noise), to
    the target ``recognizer``'s threshold minus ``margin`` in cosine; as 8-bit pixels."""
    import torch

    from diffpriv_core import guided
    from diffpriv_core.energy import SimilarityTarget
    from diffpriv_core.tasks import LambdaSchedule

    pixels = torch.from_numpy(np.array(image)).float().div(255)
    target = guided.face_target(recognizer, pixels, face)
    goal = SimilarityTarget(recognizer.threshold, margin=margin, cap=GUIDANCE_CAP)
    guidance = guided.IdentityGuidance(recognizer, "anonymize", LambdaSchedule(1.0, 1.0), (target,),
                                       diversity=False, target=goal)
    z = guided.guide_without_diffusion(pixels.permute(2, 0, 1)[None], guidance, _pixels_as_image, steps)
    return _pixels_as_image(z)[0].clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def _pixels_as_image(z):
    """The identity codec's decoder: the latent [B, 3, H, W] is the image [B, H, W, 3]."""
    return z.permute(0, 2, 3, 1)
