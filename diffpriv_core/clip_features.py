"""What both hosts share to give MSI its CLIP ViT-L/14 features: the input conversion
and which blocks are kept."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# Blocks 3, 7, 11, 15 (0-based) and the last one, as the reference MSI reads them.
FEATURE_BLOCKS = (3, 7, 11, 15, -1)
# OpenAI CLIP's input statistics (ViT-L/14 @224).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


def to_clip_pixels(image: torch.Tensor, size: int = CLIP_SIZE, mean: Sequence[float] = CLIP_MEAN,
                   std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """[B, H, W, 3] in [0, 1] -> CLIP's normalised [B, 3, size, size] input: the shorter side
    resized to ``size`` (bicubic, antialiased), centre-cropped, standardised.

    The reference code fed CLIP ``astype(uint8)`` of a [-1, 1] image (almost all zeros);
    this is the correct conversion (method.md, Stage I decision).
    """
    x = image[..., :3].movedim(-1, 1).float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bicubic", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def pick_blocks(block_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs of FEATURE_BLOCKS from every block's output, in block order; cloned,
    because some hosts add residuals in place into the tensors they hand out."""
    if len(block_outputs) < max(FEATURE_BLOCKS) + 2:  # the last block must come after block 15
        raise ValueError(f"MSI needs a CLIP image encoder with at least {max(FEATURE_BLOCKS) + 2} blocks "
                         f"(OpenAI CLIP ViT-L/14 has 24), got {len(block_outputs)}")
    return [block_outputs[k].float().clone() for k in FEATURE_BLOCKS]


def check_vit_l14(kind: str, hidden_size: int, layers: int, patch_size: int) -> None:
    """Refuse image encoders MSI was not built for (its first layers expect 1024 features)."""
    if (kind, hidden_size, layers, patch_size) != ("clip", 1024, 24, 14):
        raise ValueError(
            "MSI needs the OpenAI CLIP ViT-L/14 image encoder (hidden size 1024, 24 layers, patch 14), "
            "e.g. clip_vit_large_patch14.safetensors in models/clip_vision; the CLIP_VISION given is "
            f"{kind} with hidden size {hidden_size}, {layers} layers, patch {patch_size}")
