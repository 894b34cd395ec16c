"""The DDIM core against diffusers' schedulers, and the invert -> recover round trip."""
from __future__ import annotations

import pytest
import torch
# torch's own layers, not comfy.ops: a stand-in network for the test.
from torch.nn import Conv2d, Linear
from diffusers import DDIMInverseScheduler, DDIMScheduler

from diffpriv_core import ddim
from diffpriv_core.schedule import (Grid, alphas_cumprod, ddim_grid, embedding_schedule, grid_from_sigmas,
                                    scheduled_stage, stage_of)

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
          steps_offset=1, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=True)


def test_alpha_table_matches_diffusers():
    ref = DDIMScheduler(**SD).alphas_cumprod.double()
    assert torch.allclose(alphas_cumprod(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("steps", [10, 50, 100, 250])
def test_grid_matches_diffusers_timesteps(steps):
    sched = DDIMScheduler(**SD)
    sched.set_timesteps(steps)
    assert list(ddim_grid(steps).timesteps) == sched.timesteps.tolist()
    assert ddim_grid(steps).alphas[-1] == 1.0


def test_grid_round_trips_through_sigmas():
    grid = ddim_grid(50)
    again = grid_from_sigmas(grid.sigmas().float())
    assert again.timesteps == grid.timesteps
    assert torch.allclose(torch.tensor(again.alphas), torch.tensor(grid.alphas), rtol=1e-5)


def karras_sigmas(n: int, sigma_min: float = 0.0292, sigma_max: float = 14.6146, rho: float = 7.0) -> torch.Tensor:
    """k-diffusion's (and ComfyUI's "karras") schedule over SD1.5's sigma range, ending at 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)]).float()


def test_sigmas_map_to_timesteps_position_by_position():
    sigmas = karras_sigmas(20)  # 20 distinct timesteps
    grid = grid_from_sigmas(sigmas)
    assert grid.steps == 20 and len(set(grid.timesteps)) == 20
    assert list(grid.timesteps) == sorted(grid.timesteps, reverse=True)
    # Each step keeps its own sigma (the alphas come from the sigmas, not from the timesteps).
    assert torch.allclose(torch.tensor(grid.alphas[:-1], dtype=torch.float64) ** -1 - 1, sigmas[:-1].double() ** 2,
                          rtol=1e-5)


def test_a_schedule_that_repeats_a_timestep_is_refused():
    with pytest.raises(ValueError, match=r"steps 47 and 48 of 50 .* on the same timestep 1: Guided DDIM needs one "
                                         r"timestep per step"):
        grid_from_sigmas(karras_sigmas(50))


def test_tail_is_img2img_strength():
    grid = ddim_grid(50)
    tail = grid.tail(0.6)
    assert tail.steps == 30 and tail.timesteps[0] == 581 and tail.alphas[-1] == 1.0
    with pytest.raises(ValueError):
        grid.tail(0.0)


def test_stage_and_tau_schedule():
    assert [stage_of(t) for t in (0, 99, 100, 581, 999)] == [0, 0, 1, 5, 9]
    assert scheduled_stage(401, 0.4) == 4 and scheduled_stage(400, 0.4) is None and scheduled_stage(381, 0.4) is None


def test_step_matches_diffusers_ddim_step():
    sched = DDIMScheduler(**SD)
    sched.set_timesteps(50)
    grid = ddim_grid(50)
    g = torch.Generator().manual_seed(0)
    for k in (0, 17, 49):
        z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        ours = ddim.ddim_step(ddim.predict_x0(z, eps, grid.alphas[k]), eps, grid.alphas[k + 1])
        ref = sched.step(eps, grid.timesteps[k], z, eta=0.0).prev_sample
        assert torch.allclose(ours, ref, atol=1e-5), k


def test_inversion_step_matches_diffusers_inverse_scheduler():
    inv = DDIMInverseScheduler(**SD)
    inv.set_timesteps(50)
    grid = ddim_grid(50)
    assert inv.timesteps.tolist() == list(reversed(grid.timesteps))
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g)
    for n, t in enumerate(inv.timesteps.tolist()):
        eps = torch.randn(1, 4, 8, 8, generator=g)
        k = grid.steps - 1 - n
        ours = ddim.invert_step(lambda _z, _t, e=eps: e, z, t, grid.alphas[k], grid.alphas[k + 1])
        ref = inv.step(eps, t, z).prev_sample
        assert torch.allclose(ours, ref, atol=1e-5), t
        z = ref


class ToyEps(torch.nn.Module):
    """A small nonlinear, condition-dependent noise predictor."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = Conv2d(4, 4, 3, padding=1)
        self.cond = Linear(8, 4)

    def forward(self, z, t, cond):
        return torch.tanh(self.conv(z) + self.cond(cond)[:, :, None, None] + t / 1000.0)


def conditioned(model, stage_conds):
    return lambda z, t: model(z, t, stage_conds[stage_of(t)][None].expand(z.shape[0], -1))


@torch.no_grad()
def test_round_trip_recovers_and_wrong_keys_do_not():
    model = ToyEps()
    g = torch.Generator().manual_seed(2)
    key_e, other_e = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    z0, other_z0 = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    grid = ddim_grid(50)

    def err(recovered):
        return (recovered - z0).pow(2).mean().item()

    key_i = ddim.invert(conditioned(model, key_e), z0, grid)
    right = err(ddim.sample(conditioned(model, key_e), key_i, grid))
    wrong_e = err(ddim.sample(conditioned(model, other_e), key_i, grid))
    uc_as_e = err(ddim.sample(conditioned(model, torch.zeros(10, 8)), key_i, grid))
    other_i = ddim.invert(conditioned(model, key_e), other_z0, grid)
    wrong_i = err(ddim.sample(conditioned(model, key_e), other_i, grid))
    refined = err(ddim.sample(conditioned(model, key_e), ddim.invert(conditioned(model, key_e), z0, grid, refine=4), grid))

    assert right < 0.05 * z0.pow(2).mean().item()
    for wrong in (wrong_e, uc_as_e, wrong_i):
        assert wrong > 20 * right
    assert refined < right / 10


def test_sample_runs_in_float32_and_calls_back_every_step():
    seen = []
    out = ddim.sample(lambda z, t: torch.zeros_like(z, dtype=torch.float16), torch.randn(1, 4, 8, 8).half(),
                      ddim_grid(10), callback=lambda k, n, z, x0: seen.append((k, n)))
    assert out.dtype == torch.float32
    assert seen == [(k, 10) for k in range(10)]


def test_grid_validation():
    with pytest.raises(ValueError):
        Grid((1, 2), (0.5, 1.0))
    with pytest.raises(ValueError):
        ddim_grid(0)


@pytest.mark.parametrize("tau", [0.0, 0.4, 0.45, 0.6, 1.0])
def test_embedding_schedule_covers_every_timestep_once(tau):
    ranges = embedding_schedule(tau)
    for t in range(1000):
        owners = [stage for stage, lo, hi in ranges if lo <= t <= hi]
        assert owners == [scheduled_stage(t, tau)], t


@torch.no_grad()
def test_refinement_never_ends_worse_than_plain_inversion_on_a_rough_model():
    """A model rough enough that fixed-point iteration stops contracting at large steps:
    refinement keeps its best iterate instead of diverging."""
    model = ToyEps(seed=5)
    model.conv.weight.mul_(16.0)
    g = torch.Generator().manual_seed(6)
    key_e, z0 = torch.randn(10, 8, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    grid = ddim_grid(4)
    fn = conditioned(model, key_e)

    def err(refine):
        return (ddim.sample(fn, ddim.invert(fn, z0, grid, refine=refine), grid) - z0).pow(2).mean().item()

    assert err(10) <= err(0)


class CountingEps:
    """An eps_fn that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, z, t):
        self.calls += 1
        return self.fn(z, t)


@torch.no_grad()
@pytest.mark.parametrize("steps", [2, 3, 50])
def test_bdia_recovery_retraces_the_inversion_to_rounding_with_one_call_per_step(steps):
    model = ToyEps()
    g = torch.Generator().manual_seed(2)
    key_e, z0 = torch.randn(10, 8, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    grid = ddim_grid(steps)
    fn = CountingEps(conditioned(model, key_e))
    seen = []
    top, below = ddim.bdia_invert(fn, z0, grid, callback=lambda k, n, z, x0: seen.append((k, n)))
    assert fn.calls == steps and seen == [(k, steps) for k in range(steps)]
    assert top.shape == below.shape == z0.shape and top.dtype == torch.float32

    fn.calls, seen = 0, []
    recovered = ddim.bdia_sample(fn, top, below, grid, callback=lambda k, n, z, x0: seen.append((k, n)))
    assert fn.calls == steps - 1 and seen == [(k, steps - 1) for k in range(steps - 1)]
    # Exact to float32 rounding, not merely close: the error is a few ulps of the latent.
    assert (recovered - z0).abs().max().item() < 1e-4
    assert (recovered - z0).pow(2).mean().item() < 1e-10 * z0.pow(2).mean().item()
    # The pair of states is the key: plain DDIM from the top state alone does not recover.
    plain = ddim.sample(fn, top, grid)
    assert (plain - z0).pow(2).mean().item() > 1e6 * (recovered - z0).pow(2).mean().item()


@torch.no_grad()
def test_bdia_with_a_wrong_key_e_or_a_wrong_state_does_not_recover():
    model = ToyEps()
    g = torch.Generator().manual_seed(3)
    key_e, other_e = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    z0 = torch.randn(1, 4, 16, 16, generator=g)
    grid = ddim_grid(50)
    top, below = ddim.bdia_invert(conditioned(model, key_e), z0, grid)

    def rel(recovered):
        return ((recovered - z0).pow(2).mean() / z0.pow(2).mean()).item()

    right = rel(ddim.bdia_sample(conditioned(model, key_e), top, below, grid))
    wrong_e = rel(ddim.bdia_sample(conditioned(model, other_e), top, below, grid))
    uc_as_e = rel(ddim.bdia_sample(conditioned(model, torch.zeros(10, 8)), top, below, grid))
    other_below = rel(ddim.bdia_sample(conditioned(model, key_e), top, torch.randn_like(below), grid))
    assert right < 1e-10
    for wrong in (wrong_e, uc_as_e, other_below):
        assert wrong > 0.1, wrong


def test_bdia_needs_two_steps():
    fn = lambda z, t: torch.zeros_like(z)  # noqa: E731
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="at least 2 steps"):
        ddim.bdia_invert(fn, z, ddim_grid(1))
    with pytest.raises(ValueError, match="at least 2 steps"):
        ddim.bdia_sample(fn, z, z, ddim_grid(1))
