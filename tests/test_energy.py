"""The identity energies and the lambda_t schedule, on hand-made embeddings."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffpriv_core import energy
from diffpriv_core.tasks import TASKS, LambdaSchedule


def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


ORIGINAL = unit([1.0, 0.0, 0.0])[0]


def test_identity_distance_counts_only_samples_still_resembling_the_person():
    samples = unit([1.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    # cosines 0.707, -1, 0: the opposite face is not rewarded for being "more" anonymous
    assert energy.identity_distance_loss(ORIGINAL, samples).item() == pytest.approx(math.sqrt(0.5))


def test_diversity_sums_each_unique_pair_once():
    samples = unit([1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0])
    # pairs: (0,1) cos 1; (0,2) 0; (0,3) -1 -> 0; (1,2) 0; (1,3) -1 -> 0; (2,3) 0
    assert energy.diversity_loss(samples).item() == pytest.approx(1.0)
    assert energy.diversity_loss(samples[:1]).item() == 0.0


def test_identity_similarity_is_one_minus_cosine():
    samples = unit([1.0, 1.0, 0.0])
    assert energy.identity_similarity_loss(ORIGINAL, samples).item() == pytest.approx(1 - math.sqrt(0.5))


def test_energy_per_mode():
    samples = unit([1.0, 1.0, 0.0], [1.0, 0.0, 1.0])
    anonymize = energy.energy("anonymize", ORIGINAL, samples)
    assert anonymize.item() == pytest.approx(2 * math.sqrt(0.5) + 0.5)
    assert energy.energy("anonymize", ORIGINAL, samples, diversity=False).item() == pytest.approx(2 * math.sqrt(0.5))
    assert energy.energy("hide", ORIGINAL, samples).item() == pytest.approx(2 * (1 - math.sqrt(0.5)))
    with pytest.raises(ValueError, match="mode"):
        energy.energy("blur", ORIGINAL, samples)


def test_the_lambda_schedules_switch_at_t_600_and_scale():
    """The reference code's lambda_t (the paper gives none): anonymize 1; hide 1.5 above t = 600, 2.5
    at and below it."""
    anonymize, hide = TASKS["anonymize"].lambdas, TASKS["hide"].lambdas
    assert [anonymize(t) for t in (999, 601, 600, 0)] == [1.0, 1.0, 1.0, 1.0]
    assert [hide(t) for t in (999, 601, 600, 0)] == [1.5, 1.5, 2.5, 2.5]
    assert LambdaSchedule(0.0, 0.0).is_off and not hide.is_off
    assert [hide.scaled(2.0)(t) for t in (999, 0)] == [3.0, 5.0] and hide.scaled(0.0).is_off


def test_normalized_gradient_has_the_size_of_each_samples_update():
    grad = torch.randn(3, 4, 8, 8) * torch.tensor([1e-6, 1.0, 1e3]).reshape(3, 1, 1, 1)
    update = torch.randn(3, 4, 8, 8) * 0.1
    scaled = energy.normalize_gradient(grad, update)
    assert torch.allclose(scaled.flatten(1).norm(dim=1), update.flatten(1).norm(dim=1), rtol=1e-4)
    assert torch.allclose(F.cosine_similarity(scaled.flatten(1), grad.flatten(1)), torch.ones(3))
