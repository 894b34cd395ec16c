"""Guided DDIM does what its energy says, on a toy host: a random eps function over a
64 px image's 8 x 8 latent, a tiny convolutional decoder and a random-weight face net.

Same seed, same noise: the only difference between two runs is the guidance, so every
comparison below is the guidance's own effect.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffpriv_core import guided, schedule
from diffpriv_core.energy import SimilarityTarget
from diffpriv_core.faces.align import warp_faces
from diffpriv_core.tasks import LambdaSchedule
from diffpriv_testmodels.toy_host import ToyDecoder, ToyFaceNet

TABLE = schedule.alphas_cumprod()
GRID = schedule.ddim_grid(25)


class Toy:
    def __init__(self, latent_side: int = 8, box=(0, 0, 64, 64)):
        torch.manual_seed(0)
        self.decoder = ToyDecoder().requires_grad_(False)
        self.net = ToyFaceNet().requires_grad_(False)
        self.drift = torch.randn(1, 4, latent_side, latent_side)
        self.z0 = torch.randn(1, 4, latent_side, latent_side)
        scale = 32 / (box[2] - box[0])  # the face box -> the net's 32 px "aligned" crop
        matrix = torch.tensor([[scale, 0.0, -scale * box[0]], [0.0, scale, -scale * box[1]]])
        with torch.no_grad():
            reference = self.net(warp_faces(self.decoder(self.z0), matrix, 32))[0]
        self.target = guided.FaceTarget(matrix, box, reference, (8 * latent_side, 8 * latent_side))

    def eps(self, z, t):
        """The noise predictor of N(0, I) data, plus a fixed drift so samples are not trivial."""
        return math.sqrt(1.0 - float(TABLE[t])) * z + 0.1 * self.drift

    def guidance(self, mode, scale, **options):
        return guided.IdentityGuidance(self.net, mode, LambdaSchedule(scale, scale), (self.target,), **options)

    def run(self, guidance=None, batch=4, strength=0.6, **options):
        return guided.protect(self.eps, self.z0, GRID, strength, batch, seed=7, guidance=guidance,
                              decoder=self.decoder, **options)

    def embed(self, latents):
        with torch.no_grad():
            return self.net(warp_faces(self.decoder(latents), self.target.matrix, 32))

    def cos_to_original(self, latents) -> float:
        return float((self.embed(latents) @ self.target.embedding).mean())

    def pairwise_cos(self, latents) -> float:
        emb = self.embed(latents)
        i, j = torch.triu_indices(len(emb), len(emb), offset=1)
        return float((emb[i] * emb[j]).sum(-1).mean())


@pytest.fixture(scope="module")
def toy():
    return Toy()


@pytest.fixture(scope="module")
def unguided(toy):
    return toy.run()


def test_anonymize_moves_the_samples_away_from_the_person(toy, unguided):
    guided_out = toy.run(toy.guidance("anonymize", 0.3))
    before, after = toy.cos_to_original(unguided), toy.cos_to_original(guided_out)
    assert after < before - 0.2, (before, after)


def test_the_diversity_term_makes_the_samples_different_people(toy):
    with_div = toy.run(toy.guidance("anonymize", 0.3))
    without = toy.run(toy.guidance("anonymize", 0.3, diversity=False))
    assert toy.pairwise_cos(with_div) < toy.pairwise_cos(without) - 0.05


def test_hide_keeps_the_identity_for_the_recogniser(toy):
    plain = toy.run(batch=1, strength=0.8)
    hidden = toy.run(toy.guidance("hide", 1.0), batch=1, strength=0.8)
    before, after = toy.cos_to_original(plain), toy.cos_to_original(hidden)
    assert after > before + 0.2, (before, after)


def test_normalized_guidance_also_works(toy, unguided):
    out = toy.run(toy.guidance("anonymize", 0.3, normalize=True))
    assert toy.cos_to_original(out) < toy.cos_to_original(unguided) - 0.05


def test_lambda_zero_is_exactly_no_guidance(toy, unguided):
    assert torch.equal(toy.run(toy.guidance("anonymize", 0.0)), unguided)


class CountBackward(torch.autograd.Function):
    """Identity on the noise prediction that counts the backward passes through it."""

    calls = 0

    @staticmethod
    def forward(ctx, eps):
        return eps.clone()

    @staticmethod
    def backward(ctx, grad):
        CountBackward.calls += 1
        return grad


def test_the_energy_gradient_never_runs_the_noise_models_backward(toy):
    unet_weight = torch.ones((), requires_grad=True)  # the noise model's output carries autograd history
    eps = lambda z, t: CountBackward.apply(toy.eps(z, t) * unet_weight)  # noqa: E731
    x0 = guided.ddim.predict_x0(torch.randn(2, 4, 8, 8), eps(torch.randn(2, 4, 8, 8), 500), GRID.alphas[3])
    CountBackward.calls = 0
    x0.sum().backward(retain_graph=True)
    assert CountBackward.calls == 1  # the probe sees a backward pass through the noise model
    CountBackward.calls = 0
    correction = guided.IdentityCorrection(toy.guidance("anonymize", 0.3), toy.target, toy.decoder, GRID)
    grad = correction.energy_gradient(x0)
    assert CountBackward.calls == 0 and grad.abs().sum() > 0
    assert not grad.requires_grad  # nothing of the energy's graph rides on into the next step
    out = guided.protect(eps, toy.z0, GRID, 0.2, 2, seed=1, guidance=toy.guidance("anonymize", 0.3),
                         decoder=toy.decoder)
    assert CountBackward.calls == 0 and out.shape == (2, 4, 8, 8)


def test_outside_the_mask_the_original_comes_back(toy):
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1.0  # protect the right half only
    out = toy.run(toy.guidance("anonymize", 0.3), masks=mask)
    assert torch.equal(out[..., :4], toy.z0[..., :4].expand(4, -1, -1, -1))
    assert (out[..., 4:] - toy.z0[..., 4:]).abs().mean() > 0.1


def test_decoding_only_the_face_crop_gives_the_whole_frames_gradient():
    toy = Toy(latent_side=16, box=(40, 36, 88, 84))  # a 48 px face in a 128 px frame
    x0 = torch.randn(2, 4, 16, 16)
    whole = guided.IdentityCorrection(toy.guidance("anonymize", 1.0), toy.target, toy.decoder, GRID)
    cropped = guided.IdentityCorrection(toy.guidance("anonymize", 1.0, crop_margin=0.25), toy.target, toy.decoder, GRID)
    g_whole, g_crop = whole.energy_gradient(x0), cropped.energy_gradient(x0)
    top, left, bottom, right = cropped.window((16, 16))
    assert (top, left, bottom, right) == (3, 3, 12, 13)  # 24..96 x 28..100 px
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[top:bottom, left:right] = False
    assert g_crop[..., outside].abs().max() == 0
    # Only the decoder's border effects at the window's edge differ.
    assert F.cosine_similarity(g_whole.flatten(), g_crop.flatten(), dim=0) > 0.95


def test_an_uncropped_reference_guides_like_the_cropped_one(toy):
    """A 70 px reference whose 64 px centre was encoded: same gradient as a 64 px reference."""
    target = toy.target
    padded = guided.FaceTarget(guided.shift_source(target.matrix, -3, -3), target.box, target.embedding, (70, 70))
    x0 = torch.randn(2, 4, 8, 8)
    gradient = [guided.IdentityCorrection(toy.guidance("anonymize", 1.0), t, toy.decoder, GRID).energy_gradient(x0)
                for t in (target, padded)]
    assert torch.allclose(*gradient, atol=1e-6)


def test_a_reference_smaller_than_its_padded_latent_guides_like_a_full_size_one(toy):
    """A 59 px reference padded to 64 px before encoding: its frame starts at the corner, so
    the guidance is the same as for a 64 px reference with the same face."""
    target = toy.target
    smaller = guided.FaceTarget(target.matrix, target.box, target.embedding, (59, 61))
    x0 = torch.randn(2, 4, 8, 8)
    gradient = [guided.IdentityCorrection(toy.guidance("anonymize", 1.0), t, toy.decoder, GRID).energy_gradient(x0)
                for t in (target, smaller)]
    assert torch.allclose(*gradient, atol=1e-6)


def test_one_reference_serves_a_batch_and_missing_references_are_named(toy):
    one = toy.guidance("hide", 1.0)
    assert one.target_for(5) is toy.target
    two = guided.IdentityGuidance(toy.net, "hide", LambdaSchedule(1, 1), (toy.target, None))
    assert two.target_for(1) is None
    with pytest.raises(ValueError, match="image 2 of the batch"):
        two.target_for(2)


def test_a_similarity_target_steps_to_the_goal_whatever_the_gradient_scale():
    target = SimilarityTarget(threshold=0.4, margin=0.1, cap=10.0, growth=2.0)
    assert target.goal("anonymize") == pytest.approx(0.3) and target.goal("hide") == pytest.approx(0.5)
    cosines = torch.tensor([0.9, 0.2, 0.9])
    grad = torch.tensor([[0.1, 0.0], [3.0, 4.0], [0.01, 0.0]])  # squared norms 0.01, 25, 1e-4
    scales, gains = target.step("anonymize", cosines, grad, torch.ones(3))
    # off by 0.6: the first-order step 0.6 / 0.01; at the goal: nothing; a step beyond the cap: capped
    assert scales.tolist() == pytest.approx([10.0, 0.0, 10.0]) and gains.tolist() == [2.0, 0.5, 2.0]
    scales, _ = target.step("anonymize", cosines, grad * 100, torch.ones(3))
    assert scales[0] == pytest.approx(0.6 / 100.0)  # a 10x larger gradient, a 100x smaller lambda
    scales, gains = target.step("hide", cosines, grad, torch.ones(3))
    assert scales.tolist() == pytest.approx([0.0, 0.3 / 25, 0.0]) and gains.tolist() == [0.5, 2.0, 0.5]


@pytest.mark.parametrize("mode, goal_side", [("anonymize", -1), ("hide", 1)])
def test_target_mode_ends_beyond_the_goal_where_a_tiny_fixed_lambda_does_not(toy, mode, goal_side):
    """lambda_t is 1e-3, far too small for this recogniser; the target mode finds the scale."""
    strength, batch = (0.6, 2) if mode == "anonymize" else (0.8, 1)
    fixed = toy.run(toy.guidance(mode, 1e-3), batch=batch, strength=strength)
    reference = toy.cos_to_original(fixed)
    goal = reference - 0.3 if mode == "anonymize" else min(reference + 0.2, 0.95)
    target = SimilarityTarget(threshold=goal - goal_side * 0.05, margin=0.05, cap=1e4)
    guidance = toy.guidance(mode, 1e-3, target=target)
    out = toy.run(guidance, batch=batch, strength=strength)
    achieved = guided.achieved_similarity(guidance, toy.decoder, out)
    assert torch.allclose(achieved, toy.embed(out) @ toy.target.embedding, atol=1e-5)
    assert ((achieved - goal) * goal_side >= 0).all(), (reference, goal, achieved)


def test_picture_similarity_reads_the_face_where_the_sampler_does(toy):
    """The Identity Similarity node's measure of decoded pictures is the sampler's own report."""
    latents = toy.z0 + 0.5 * torch.randn(3, *toy.z0.shape[1:], generator=torch.Generator().manual_seed(1))
    pictures = toy.decoder(latents)
    reported = guided.achieved_similarity(toy.guidance("anonymize", 1.0), toy.decoder, latents)
    assert torch.allclose(guided.picture_similarity(toy.net, toy.target, pictures), reported, atol=1e-6)
    assert guided.picture_similarity(toy.net, toy.target, toy.decoder(toy.z0))[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="the pictures are 56 x 64 px, their original 64 x 64"):
        guided.picture_similarity(toy.net, toy.target, pictures[:, :, :56])


class LinearFaceNet(torch.nn.Module):
    """8 px "faces" [B, 3, 8, 8] -> the unit vector of a fixed linear map: simple enough that
    the energy's gradient can be written out by hand."""

    input_size = 8

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = weights

    def forward(self, x):
        return F.normalize(x.flatten(1) @ self.weights, dim=-1)


def test_one_guided_step_is_the_ddim_step_minus_lambda_times_the_energys_gradient_in_x0():
    """Algorithm 1's step, pinned by numbers computed by hand (numpy, float64): from z_t at
    t = 500 to level 400, z' = sqrt(a') x0 + sqrt(1 - a') eps - lambda * dE/dx0, with x0 =
    (z_t - sqrt(1 - a) eps) / sqrt(a) and E = 1 - cos(F(x), F(Decode(x0))) (hiding's L_is),
    for a linear decoder (the latent's first three channels are the picture) and face net."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    weights, z_t = torch.randn(3 * 8 * 8, 6, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    reference = F.normalize(torch.randn(6, generator=g), dim=0)
    lam = 0.7
    a, a_next = float(TABLE[500]), float(TABLE[400])
    grid = schedule.Grid((500,), (a, a_next))
    decode = lambda z: z[:, :3].permute(0, 2, 3, 1)  # noqa: E731
    net = LinearFaceNet(weights)
    target = guided.FaceTarget(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), (0.0, 0.0, 8.0, 8.0), reference, (8, 8))
    guidance = guided.IdentityGuidance(net, "hide", LambdaSchedule(lam, lam), (target,))
    correction = guided.IdentityCorrection(guidance, target, decode, grid)
    stepped = guided.ddim.sample(lambda z, t: 0.3 * z + 0.1, z_t, grid, correction)

    z, w, r = z_t.double().numpy()[0], weights.double().numpy(), reference.double().numpy()
    eps = 0.3 * z + 0.1
    x0 = (z - np.sqrt(1 - a) * eps) / np.sqrt(a)
    e = x0[:3].reshape(-1) @ w  # the face net before its normalisation
    de = -(r / np.linalg.norm(e) - (r @ e) * e / np.linalg.norm(e) ** 3)  # d(1 - cos(r, e)) / de
    grad = np.zeros_like(x0)
    grad[:3] = (w @ de).reshape(3, 8, 8)
    expected = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps - lam * grad
    assert np.abs(lam * grad).max() > 1e-2  # the guidance moves the step well beyond float error
    assert np.abs(stepped[0].double().numpy() - expected).max() < 1e-5


def test_an_image_seeded_by_its_index_in_its_own_photo_starts_from_the_same_noise_in_any_batch():
    originals = torch.randn(3, 4, 8, 8)
    seen = []

    def sample_group(group, z0, noise):
        seen.append(noise)
        return z0

    guided.protect_batch(sample_group, originals, samples=2, seed=5, groups=guided.image_groups(3, 2, 4),
                         noise_index=[0, 1, 0])
    alone = guided.start_noise((2, 4, 8, 8), 5, 0)
    assert torch.equal(seen[0][:2], alone) and torch.equal(seen[1], alone), "photo 2's face 0 = photo 1's face 0"
    assert not torch.equal(seen[0][2:], alone)
    with pytest.raises(ValueError, match="2 noise indices for 3 images"):
        guided.protect_batch(sample_group, originals, 2, 5, noise_index=[0, 1])
