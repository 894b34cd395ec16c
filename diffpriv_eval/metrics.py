"""Pixel and perceptual recovery metrics (paper Table 2), on RGB uint8 images scaled
to [0, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

# LPIPS backbone: torchvision weights that torch.hub would download on first use.
LPIPS_NET = "alex"
_LPIPS_TORCHVISION_WEIGHTS = "AlexNet_Weights"


def _unit(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((_unit(a) - _unit(b)) ** 2))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """dB, data range 1; infinite for identical images (a perfect recovery)."""
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(_unit(a), _unit(b), data_range=1.0))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM with Wang et al.'s Gaussian window (sigma 1.5), as torchmetrics and the
    original paper compute it, rather than scikit-image's default 7x7 uniform window."""
    return float(structural_similarity(_unit(a), _unit(b), data_range=1.0, channel_axis=-1,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


def lpips_weights_file() -> Path:
    """Where torch.hub keeps the LPIPS backbone's ImageNet weights."""
    import torch
    import torchvision.models

    url = getattr(torchvision.models, _LPIPS_TORCHVISION_WEIGHTS).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def lpips_unavailable_reason() -> str | None:
    """Why LPIPS cannot be computed offline, or None when it can. Computing it without
    the backbone weights would make torchvision download them, which this toolkit never does."""
    try:
        import torchmetrics.functional.image  # noqa: F401
        weights = lpips_weights_file()
    except ImportError as exc:
        return f"LPIPS needs torchmetrics and torchvision ({exc})"
    if not weights.is_file():
        return (f"LPIPS backbone weights ({LPIPS_NET}) are not on this machine: expected {weights}; "
                "nothing is downloaded. Put the file there to enable LPIPS.")
    return None


def lpips(a: np.ndarray, b: np.ndarray) -> float:
    """LPIPS (AlexNet) distance; call only when lpips_unavailable_reason() is None."""
    import torch
    from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

    def batch(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(_unit(image)).float().permute(2, 0, 1)[None]

    return float(learned_perceptual_image_patch_similarity(batch(a), batch(b), net_type=LPIPS_NET, normalize=True))
