"""What the method needs from a host (ComfyUI or diffusers), and nothing more.

Conventions shared by every implementation:
- images are [B, H, W, 3] float in [0, 1] (ComfyUI's IMAGE layout);
- latents ``z`` are SD's *scaled* latents (VAE latent x 0.18215), float32, [B, 4, H/8, W/8];
- ``t`` is an integer timestep in 0..999 of the SD1.5 schedule;
- conditionings are [B, 77, 768] text-encoder hidden states.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from ..faces.align import Alignment


class EpsModel(Protocol):
    """The frozen UNet as a noise predictor. Differentiable w.r.t. ``z_t`` and ``cond`` when
    autograd is on (MSI training backpropagates into the conditioning)."""

    def __call__(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor: ...


class LatentCodec(Protocol):
    def encode_moments(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior, already scaled like ``z``."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable decode to [B, H, W, 3], NOT clamped (a clamp zeroes gradients)."""


class TextEncoder(Protocol):
    def encode_with_token(self, token_embedding: torch.Tensor) -> torch.Tensor:
        """Encode the one-placeholder prompt with the placeholder's input embedding replaced
        by ``token_embedding`` [B, 768] (before positional embeddings); differentiable."""

    def encode_empty(self) -> torch.Tensor:
        """The unconditional embedding UC: the empty prompt, [1, 77, 768]."""


class ImageFeatures(Protocol):
    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        """CLIP ViT-L/14 hidden states [B, tokens, 1024] of blocks 3, 7, 11, 15 and the last
        block (before the final layer norm), for a [B, H, W, 3] image in [0, 1]; the
        implementation converts to CLIP's input range and size itself."""


class FaceEmbedder(Protocol):
    input_size: int  # side of the aligned crop it takes (ArcFace 112, FaceNet 160)
    alignment: "Alignment"  # how the crop is cut from a detected face (faces.align)

    def __call__(self, aligned: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] aligned faces in [0, 1] -> [B, D] L2-normalised identity embeddings;
        differentiable w.r.t. the input, parameters frozen."""
