"""Noise schedule and timestep grids of Stable Diffusion 1.x, and the stage index.

One grid serves sampling, inversion and recovery (the reference code is off by one
between them). It is the grid of ComfyUI's ``ddim_uniform`` scheduler and of diffusers'
DDIMScheduler with ``timestep_spacing="leading"``, ``steps_offset=1``,
``set_alpha_to_one=True``: timesteps 1, 1+T/N, ..., and a final clean level (alpha_bar 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

T = 1000
STAGES = 10
STAGE_SPAN = T // STAGES
BETA_START = 0.00085
BETA_END = 0.012


def alphas_cumprod(num_timesteps: int = T, beta_start: float = BETA_START, beta_end: float = BETA_END) -> torch.Tensor:
    """alpha_bar(t) for t = 0..T-1 of SD's "scaled linear" beta schedule, in float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def stage_of(t: int) -> int:
    """Stage index i = t // 100 of a timestep (10 stages over 1000 steps)."""
    return min(int(t) // STAGE_SPAN, STAGES - 1)


@dataclass(frozen=True)
class Grid:
    """A descending DDIM grid: ``timesteps[k]`` is the level the k-th step starts from,
    ``alphas[k]`` its alpha_bar, and ``alphas[-1]`` the level the last step lands on."""

    timesteps: tuple[int, ...]
    alphas: tuple[float, ...]

    def __post_init__(self):
        if len(self.alphas) != len(self.timesteps) + 1:
            raise ValueError("a grid needs one more alpha level than timesteps")

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def tail(self, strength: float) -> "Grid":
        """The last ``round(strength * steps)`` steps, as img2img runs them (S_ns)."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength (S_ns) must be in (0, 1], got {strength}")
        n = max(1, min(self.steps, int(round(strength * self.steps))))
        start = self.steps - n
        return Grid(self.timesteps[start:], self.alphas[start:])

    def sigmas(self) -> torch.Tensor:
        """The same levels as k-diffusion sigmas, sqrt((1 - a) / a); 0 for the clean level."""
        a = torch.tensor(self.alphas, dtype=torch.float64)
        return ((1.0 - a) / a).sqrt()

    def describe(self) -> str:
        """A compact text form, stored in key files to refuse keys made on another grid."""
        return ",".join(str(t) for t in self.timesteps)


def ddim_grid(steps: int, table: torch.Tensor | None = None) -> Grid:
    """The ``steps``-step DDIM grid (ComfyUI ``ddim_uniform`` / diffusers leading + offset 1)."""
    table = alphas_cumprod() if table is None else table
    n = table.shape[0]
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be between 1 and {n}, got {steps}")
    stride = max(n // steps, 1)
    ts = list(range(1, n, stride))[::-1]
    return Grid(tuple(ts), tuple(float(table[t]) for t in ts) + (1.0,))


def grid_from_sigmas(sigmas: torch.Tensor, table: torch.Tensor | None = None) -> Grid:
    """A grid from a descending k-diffusion sigma list (what a SAMPLER receives), position by
    position: step k starts at ``sigmas[k]``.

    Timesteps are the nearest table entries (used for the stage index and the lambda
    schedule); alphas come from the sigmas themselves so the step matches the sampler's.
    Two steps that snap to the same timestep would be indistinguishable to everything that
    goes by timestep (the embedding, lambda_t, the model call), so such schedules are refused.
    """
    table = alphas_cumprod() if table is None else table
    s = sigmas.detach().double().cpu()
    alphas = 1.0 / (1.0 + s**2)
    table_sigmas = ((1.0 - table) / table).sqrt()
    ts = [int((table_sigmas.log() - torch.log(x)).abs().argmin()) for x in s[:-1]]
    first_step: dict[int, int] = {}
    for k, t in enumerate(ts):
        j = first_step.setdefault(t, k)
        if j != k:
            raise ValueError(f"the sigma schedule puts steps {j} and {k} of {len(ts)} (sigmas {float(s[j]):.4g} and "
                             f"{float(s[k]):.4g}) on the same timestep {t}: Guided DDIM needs one timestep per step; "
                             "use fewer steps or the ddim_uniform scheduler")
    return Grid(tuple(ts), tuple(float(a) for a in alphas))


def scheduled_stage(t: int, tau: float) -> int | None:
    """Eq. 16: the stage whose embedding C^{t//100} conditions timestep t, or None
    (the unconditional embedding) when t <= tau * T."""
    return stage_of(t) if t > tau * T else None


def embedding_schedule(tau: float) -> list[tuple[int | None, int, int]]:
    """Eq. 16 as inclusive timestep ranges: (stage, first t, last t) for each stage above
    tau * T, and (None, 0, tau * T) for the unconditional embedding below."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    cut = int(tau * T)  # t <= cut -> UC
    ranges: list[tuple[int | None, int, int]] = [(None, 0, cut)] if cut >= 0 else []
    for stage in range(STAGES):
        lo, hi = max(stage * STAGE_SPAN, cut + 1), stage * STAGE_SPAN + STAGE_SPAN - 1
        if lo <= hi:
            ranges.append((stage, lo, hi))
    return ranges
