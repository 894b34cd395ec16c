"""Identity energies of Stage II (their scale lambda_t is the task's, tasks.py).

Embeddings are L2-normalised [*, D] face-recogniser outputs, so cosine = dot product.
``original`` is F(x), the embedding of the face being protected; ``samples`` are
F(x0hat_i) of the batch of predictions guided together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tasks import TASKS


def cosines_to(original: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """cos(F(x), F(x0hat_i)) for every sample: [B]."""
    return samples @ original.reshape(-1)


def identity_distance_loss(original: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """L_Idis = sum_i max(cos(F(x), F(x0hat_i)), 0): push every sample away from the person,
    but not past orthogonal (an opposite face is as identifying as the same one)."""
    return cosines_to(original, samples).clamp(min=0).sum()


def diversity_loss(samples: torch.Tensor) -> torch.Tensor:
    """L_div = sum over unique pairs i < j of max(cos(F(x0hat_i), F(x0hat_j)), 0): the batch's
    anonymous faces should be different people from each other too."""
    i, j = torch.triu_indices(samples.shape[0], samples.shape[0], offset=1, device=samples.device)
    return (samples[i] * samples[j]).sum(-1).clamp(min=0).sum()


def identity_similarity_loss(original: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """L_is = 1 - cos(F(x), F(x0hat)), summed over samples: keep the identity for machines."""
    return (1.0 - cosines_to(original, samples)).sum()


def energy(mode: str, original: torch.Tensor, samples: torch.Tensor, diversity: bool = True) -> torch.Tensor:
    """The energy Algorithm 1 descends: L_Idis (+ L_div) to anonymize, L_is to hide."""
    if mode == "anonymize":
        distance = identity_distance_loss(original, samples)
        return distance + diversity_loss(samples) if diversity else distance
    if mode == "hide":
        return identity_similarity_loss(original, samples)
    raise ValueError(f"mode must be one of {', '.join(TASKS)}, got {mode!r}")


@dataclass(frozen=True)
class SimilarityTarget:
    """Guidance to a target identity distance instead of the fixed lambda_t.

    The goal is a cosine between the original and each sample, under the guiding
    recogniser: at most ``threshold - margin`` to anonymize (another person for it), at
    least ``threshold + margin`` to hide (still the same person). At every step each sample
    still short of the goal gets the step that would close the gap to first order (a
    Polyak step, |cos - goal| / |g|^2, whatever the recogniser's gradient scale), times a
    gain that grows by ``growth`` while the gap stays open (the diffusion steps in between
    pull back) and shrinks once the goal is reached; a sample at the goal is left alone.
    No step exceeds ``cap``. Recognisers differ in gradient scale by orders of magnitude,
    so a fixed lambda tuned for one means little for another; a target means the same for all.
    """

    threshold: float  # the recogniser's same-person cosine
    margin: float = 0.05
    cap: float = 1000.0
    growth: float = 1.5

    def goal(self, mode: str) -> float:
        return self.threshold - self.margin if mode == "anonymize" else self.threshold + self.margin

    def gap(self, mode: str, cosines: torch.Tensor) -> torch.Tensor:
        """How far each sample's cosine is short of the goal (0 once there)."""
        gap = cosines - self.goal(mode) if mode == "anonymize" else self.goal(mode) - cosines
        return gap.clamp(min=0)

    def step(self, mode: str, cosines: torch.Tensor, grad: torch.Tensor,
             gains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each sample's lambda for this step, the gains for the next) from the samples'
        cosines, the energy's gradient [B, ...] and the current gains [B]."""
        gap = self.gap(mode, cosines)
        size = grad.flatten(1).pow(2).sum(1).clamp(min=1e-20)
        scales = (gains * gap / size).clamp(max=self.cap)
        gains = torch.where(gap > 0, gains * self.growth, gains / self.growth)
        return scales, gains


def normalize_gradient(grad: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """FreeDoM-style rescaling: each sample's gradient gets the norm of that sample's DDIM
    update z_next - z_t, so lambda_t is relative to the step and does not depend on the face
    network's gradient scale (which differs by orders of magnitude between recognisers)."""
    scale = update.flatten(1).norm(dim=1) / grad.flatten(1).norm(dim=1).clamp(min=1e-12)
    return grad * scale.reshape(-1, *(1,) * (grad.ndim - 1))
