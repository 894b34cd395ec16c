"""Identity energies of Stage II (their scale lambda_t is the task's, tasks.py).

Embeddings are L2-normalised [*, D] face-recogniser outputs, so cosine = dot product.
``original`` is F(x), the embedding of the face being protected; ``samples`` are
F(x0hat_i) of the batch of predictions guided together.
"""
from __future__ import annotations

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


def normalize_gradient(grad: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """FreeDoM-style rescaling: each sample's gradient gets the norm of that sample's DDIM
    update z_next - z_t, so lambda_t is relative to the step and does not depend on the face
    network's gradient scale (which differs by orders of magnitude between recognisers)."""
    scale = update.flatten(1).norm(dim=1) / grad.flatten(1).norm(dim=1).clamp(min=1e-12)
    return grad * scale.reshape(-1, *(1,) * (grad.ndim - 1))
