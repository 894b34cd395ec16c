"""The two keys of Diff-Privacy, as plain tensors plus metadata."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .schedule import STAGES

EMBED_SHAPE = (77, 768)


@dataclass
class KeyE:
    """key-E: the per-image stage conditionings C^0..C^9 and the unconditional UC."""

    stages: torch.Tensor  # [10, 77, 768] float32
    uc: torch.Tensor  # [1, 77, 768] float32
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if tuple(self.stages.shape) != (STAGES, *EMBED_SHAPE):
            raise ValueError(f"key-E must hold {STAGES} conditionings of shape {EMBED_SHAPE}, got {tuple(self.stages.shape)}")
        if tuple(self.uc.shape) != (1, *EMBED_SHAPE):
            raise ValueError(f"key-E's unconditional embedding must be (1, 77, 768), got {tuple(self.uc.shape)}")

    def condition(self, stage: int | None) -> torch.Tensor:
        """[1, 77, 768]: C^stage, or UC for None."""
        return self.uc if stage is None else self.stages[stage:stage + 1]


@dataclass
class KeyI:
    """key-I: the DDIM inversion of one image's latent under its key-E."""

    latent: torch.Tensor  # [4, h, w] float32, SD scaled latent space
    steps: int
    inversion: str  # "ddim" or "fixed_point"
    refine: int  # fixed-point iterations per step (0 for "ddim")
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.latent.ndim != 3 or self.latent.shape[0] != 4:
            raise ValueError(f"key-I must be one [4, h, w] latent, got {tuple(self.latent.shape)}")
