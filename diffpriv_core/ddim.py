"""Deterministic DDIM (eta = 0): the step, the x0 estimate, sampling and inversion, and
BDIA's exactly invertible pair of inversion and sampling (key-I's default).

Small pure functions over an ``eps_fn(z, t) -> eps`` callable in SD's scaled latent space,
in the manner of k-diffusion's sampling.py. The loops run in float32 whatever the model's
dtype, because inversion and recovery must retrace the same path.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

import torch

from .schedule import Grid

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


class StepCallback(Protocol):
    def __call__(self, step: int, total: int, z: torch.Tensor, x0: torch.Tensor) -> None: ...


class Correction(Protocol):
    """Changes the latent a DDIM step produced (energy guidance, background blending)."""

    def __call__(self, step: int, t: int, z_next: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor: ...


def k_diffusion_scale(sigma):
    """sqrt(1 + sigma^2) = 1 / sqrt(alpha_bar): k-diffusion's (and ComfyUI's) x is the
    scaled latent z times this, with sigma = sqrt((1 - alpha_bar) / alpha_bar). ``sigma``
    is a float or a tensor (broadcast against the latents)."""
    return torch.sqrt(1.0 + sigma**2) if torch.is_tensor(sigma) else math.sqrt(1.0 + sigma**2)


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """The noise prediction of a k-diffusion model that returned ``denoised`` for x at sigma."""
    return (x - denoised) / sigma


def predict_x0(z: torch.Tensor, eps: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 10: the clean latent implied by z at level alpha and the predicted noise."""
    return (z - math.sqrt(1.0 - alpha) * eps) / math.sqrt(alpha)


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_next: float) -> torch.Tensor:
    """Eq. 2 with eta = 0: move the (x0, eps) pair to level alpha_next,
    z_{t-1} = sqrt(a_{t-1}) x0 + sqrt(1 - a_{t-1}) eps. The paper prints Eq. 2 without the
    sqrt(a_{t-1}) on x0; DDIM's step (Song et al. 2021, Eq. 12) has it, and so does this one."""
    return math.sqrt(alpha_next) * x0 + math.sqrt(1.0 - alpha_next) * eps


def add_noise(z0: torch.Tensor, noise: torch.Tensor, alpha: float) -> torch.Tensor:
    """q(z_t | z_0): the forward process at level alpha."""
    return math.sqrt(alpha) * z0 + math.sqrt(1.0 - alpha) * noise


def _eps32(eps_fn: EpsFn, z: torch.Tensor, t: int) -> torch.Tensor:
    return eps_fn(z, t).to(torch.float32)


def sample(
    eps_fn: EpsFn,
    z: torch.Tensor,
    grid: Grid,
    correction: Correction | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run every step of ``grid`` from level ``grid.alphas[0]`` down to ``grid.alphas[-1]``."""
    z = z.to(torch.float32)
    for k, t in enumerate(grid.timesteps):
        eps = _eps32(eps_fn, z, t)
        x0 = predict_x0(z, eps, grid.alphas[k])
        z_next = ddim_step(x0, eps, grid.alphas[k + 1])
        if correction is not None:
            z_next = correction(k, t, z_next, x0, eps)
        z = z_next
        if callback is not None:
            callback(k, grid.steps, z, x0)
    return z


def invert_step(eps_fn: EpsFn, z_next: torch.Tensor, t: int, alpha: float, alpha_next: float,
                refine: int = 0) -> torch.Tensor:
    """Eq. 4: find z at level ``alpha`` that one DDIM step (at timestep t) maps to ``z_next``.

    Plain DDIM inversion evaluates the noise at z_next instead of the unknown z. With
    ``refine`` > 0 the estimate is improved by fixed-point iteration on the exact step
    equation z = sqrt(a) x0(z_next, eps(z)) + sqrt(1 - a) eps(z), which leaves the key a
    single latent and recovery unchanged. Where the iteration stops contracting (large
    steps on a rough model), each image keeps its iterate whose sampling step lands
    closest to ``z_next``, so refinement never ends worse than where it started.
    """
    eps = _eps32(eps_fn, z_next, t)
    z = ddim_step(predict_x0(z_next, eps, alpha_next), eps, alpha)
    if refine == 0:
        return z
    best, best_miss, improved = z, None, None
    for _ in range(refine):
        eps = _eps32(eps_fn, z, t)
        miss = (ddim_step(predict_x0(z, eps, alpha), eps, alpha_next) - z_next).flatten(1).norm(dim=1)
        improved = torch.ones_like(miss, dtype=torch.bool) if best_miss is None else miss <= best_miss
        if not bool(improved.any()):
            return best  # diverging for every image: stop spending UNet calls
        best_miss = miss if best_miss is None else torch.minimum(miss, best_miss)
        best = torch.where(_per_image(improved, z), z, best)
        z = ddim_step(predict_x0(z_next, eps, alpha_next), eps, alpha)
    # The newest iterate is unmeasured: keep it where the last measurement still improved.
    return torch.where(_per_image(improved, z), z, best)


def _per_image(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return flags.view(-1, *[1] * (like.ndim - 1))


def invert(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    grid: Grid,
    refine: int = 0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM inversion of z0 (at level ``grid.alphas[-1]``) up to level ``grid.alphas[0]``:
    the exact reverse of ``sample`` on the same grid when ``refine`` converges."""
    z = z0.to(torch.float32)
    for n, k in enumerate(reversed(range(grid.steps))):
        z = invert_step(eps_fn, z, grid.timesteps[k], grid.alphas[k], grid.alphas[k + 1], refine)
        if callback is not None:
            callback(n, grid.steps, z, z0)
    return z


# --- BDIA (gamma = 1): an exactly invertible pair of inversion and sampling ------------
# Fixed-point inversion only approaches the inverse of DDIM's step, and pays a UNet call per
# refinement. BDIA (Zhang et al. 2023, "Exact diffusion inversion via bi-directional
# integration approximation") makes each step an explicit, invertible update of TWO states:
# with D(z_k; k -> j) the DDIM move of z_k (level k) to level j on the noise predicted AT z_k,
#     z_{k-1} = z_{k+1} + D(z_k; k -> k-1) - D(z_k; k -> k+1)        (one eps call, at z_k)
# which sampling undoes by subtracting the same difference: exact in exact arithmetic,
# whatever the model. In float32 each step's rounding is carried on, and on coarse grids a
# rough model can amplify it (the tests' random-weight UNet: a 40% error on a 6-step grid for
# some latents, rounding-level on 20 and 50 steps). The key is therefore the last two states.


def _bdia_difference(eps_fn: EpsFn, z_mid: torch.Tensor, grid: Grid, mid: int, up: int, down: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """D(z_mid; mid -> up) - D(z_mid; mid -> down) with one eps call at level ``mid``, and
    the x0 estimate it implies. Inversion adds it and sampling subtracts it, so the two
    compute bit-identical differences from the same z_mid."""
    eps = _eps32(eps_fn, z_mid, grid.timesteps[mid])
    x0 = predict_x0(z_mid, eps, grid.alphas[mid])
    return ddim_step(x0, eps, grid.alphas[up]) - ddim_step(x0, eps, grid.alphas[down]), x0


def _check_bdia_grid(grid: Grid) -> None:
    if grid.steps < 2:
        raise ValueError(f"BDIA needs at least 2 steps (its key is two states, one level apart), got {grid.steps}")


def bdia_invert(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    grid: Grid,
    callback: StepCallback | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert z0 (at level ``grid.alphas[-1]``) up to level ``grid.alphas[0]`` by BDIA:
    one UNet call per step. Returns (top, below), the states at levels 0 and 1, which
    ``bdia_sample`` takes back down to z0 exactly (to float rounding).

    The first step (bottom -> one level up) is plain DDIM inversion (noise evaluated at the
    bottom state): whatever it gives is what sampling's last BDIA step starts from, so its
    approximation does not matter for exactness. Every further level is the BDIA update,
    noise evaluated at the middle state.
    """
    _check_bdia_grid(grid)
    n = grid.steps
    down = z0.to(torch.float32)
    mid = invert_step(eps_fn, down, grid.timesteps[n - 1], grid.alphas[n - 1], grid.alphas[n])
    if callback is not None:
        callback(0, n, mid, down)
    for step, k in enumerate(range(n - 2, -1, -1), start=1):  # k: the level being made
        diff, x0 = _bdia_difference(eps_fn, mid, grid, k + 1, k, k + 2)
        down, mid = mid, down + diff
        if callback is not None:
            callback(step, n, mid, x0)
    return mid, down


def bdia_sample(
    eps_fn: EpsFn,
    top: torch.Tensor,
    below: torch.Tensor,
    grid: Grid,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """The exact inverse of ``bdia_invert``: from the states at levels 0 and 1 down to the
    bottom level, ``grid.steps - 1`` UNet calls (the state at level 1 is already known)."""
    _check_bdia_grid(grid)
    up, mid = top.to(torch.float32), below.to(torch.float32)
    for k in range(1, grid.steps):  # k: the middle level, whose noise is evaluated
        diff, x0 = _bdia_difference(eps_fn, mid, grid, k, k - 1, k + 1)
        up, mid = mid, up - diff
        if callback is not None:
            callback(k - 1, grid.steps - 1, mid, x0)
    return mid
