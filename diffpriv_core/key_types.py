"""The key types the stages hand to each other (and that the key file stores)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .key_format import BDIA, PAIR
from .schedule import STAGES

EMBED_SHAPE = (77, 768)  # SD 1.x: 77 tokens of CLIP ViT-L/14 text width


@dataclass
class KeyE:
    """key-E: the per-stage conditionings C^0..C^9 MSI learned for one image, plus UC.

    ``stages`` [10, 77, 768] float32 (row i conditions timesteps 100 i .. 100 i + 99),
    ``uc`` [1, 77, 768] float32 (the empty prompt), ``meta`` free text about how it was made.
    """

    stages: torch.Tensor
    uc: torch.Tensor
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.stages.ndim != 3 or self.stages.shape[0] != STAGES:
            raise ValueError(f"key-E needs {STAGES} stage embeddings [{STAGES}, tokens, dim], got {tuple(self.stages.shape)}")
        if tuple(self.uc.shape) != (1, *self.stages.shape[1:]):
            raise ValueError(f"key-E's UC must be [1, {self.stages.shape[1]}, {self.stages.shape[2]}], got {tuple(self.uc.shape)}")
        if self.stages.dtype != torch.float32 or self.uc.dtype != torch.float32:
            raise ValueError("key-E tensors must be float32")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.meta.items()):
            raise ValueError("key-E metadata must map str to str")

    def condition(self, stage: int | None) -> torch.Tensor:
        """[1, tokens, dim]: C^stage, or UC for None."""
        return self.uc if stage is None else self.stages[stage:stage + 1]


@dataclass
class KeyI:
    """key-I: the DDIM inversion of one image's latent under its key-E.

    A ``bdia`` key-I is two states of the inversion, ``latent`` at the top level of the grid
    and ``below`` one level less noisy: BDIA sampling needs both to retrace the inversion
    exactly (ddim.bdia_sample). The other inversions leave one latent and ``below`` None.
    """

    latent: torch.Tensor  # [4, h, w] float32, SD scaled latent space
    steps: int
    inversion: str  # "bdia", "fixed_point" or "ddim"
    refine: int  # fixed-point iterations per step (0 for "bdia" and "ddim")
    meta: dict[str, str] = field(default_factory=dict)
    below: torch.Tensor | None = None  # bdia only: the state one grid level below ``latent``

    def __post_init__(self):
        if self.latent.ndim != 3 or self.latent.shape[0] != 4:
            raise ValueError(f"key-I must be one [4, h, w] latent, got {tuple(self.latent.shape)}")
        if (self.below is not None) != (self.inversion == BDIA):
            raise ValueError("a bdia key-I needs its second latent (below), and only a bdia key-I has one; "
                             f"this {self.inversion!r} key-I {'has' if self.below is not None else 'lacks'} it")
        if self.below is not None:
            if tuple(self.below.shape) != tuple(self.latent.shape):
                raise ValueError(f"a bdia key-I's two latents must have one shape, got {tuple(self.latent.shape)} "
                                 f"and {tuple(self.below.shape)}")
            if not bool(torch.isfinite(self.below).all()):
                raise ValueError("a bdia key-I's second latent holds NaN or infinite values")


PAIR_MISMATCH = ("key-E and key-I do not belong together: this key-I was made from another key-E (another "
                 "photo's key). Use the key-E and key-I of one key file")


def key_e_id(key_e: KeyE) -> str:
    """key-E's identity, a digest of its tensors: key-I records it (``meta["pair"]``), so a
    key-I only runs with the key-E it was made from."""
    h = hashlib.sha256(b"diffprivacy key-E\0")
    for t in (key_e.stages, key_e.uc):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def belong_together(key_e: KeyE, key_i: KeyI) -> bool:
    return key_i.meta.get(PAIR) == key_e_id(key_e)
