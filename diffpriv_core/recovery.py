"""key-I and Stage III: DDIM inversion of the original under key-E, and recovery.

key-I is the inversion of the ORIGINAL latent with C^{t//100} at every step (no UC, no
CFG); recovery samples from key-I with the same key-E on the same grid, by the sampler
that matches the inversion. Both run in float32 on ``ddim_grid(steps)``.

Modes (``MODES``):
- ``bdia`` (default, ours): BDIA inversion, one UNet call per step; key-I is the top two
  states and recovery is BDIA sampling, which retraces the inversion to float rounding in
  steps - 1 calls (ddim.bdia_invert / bdia_sample).
- ``fixed_point`` (ours): each DDIM inversion step refined ``refine`` times (1 + refine
  calls per step); one latent, recovered by plain DDIM, exact only where the refinement
  converged.
- ``ddim``: plain DDIM inversion, as the paper does; approximate.
"""
from __future__ import annotations

import torch

from . import ddim
from .adapters.protocols import EpsModel
from .key_format import BDIA, INVERSIONS
from .key_types import PAIR, PAIR_MISMATCH, KeyE, KeyI, belong_together, key_e_id
from .schedule import STAGES, ddim_grid, scheduled_stage, stage_of

MODES = INVERSIONS  # bdia (the default), fixed_point, ddim
BDIA_MIN_STEPS = 2  # BDIA's key is two states one level apart


class KeyMismatchError(ValueError):
    """A key that cannot recover with this model or this version of the pack."""


def conditioned_eps(eps_model: EpsModel, keys_e: list[KeyE], tau: float | None = None,
                    batch_size: int = 0) -> ddim.EpsFn:
    """eps_fn(z, t) conditioned per image on its C^{t//100} (or on UC at t <= tau*T when
    ``tau`` is given: the protection schedule, Eq. 16). ``batch_size`` > 0: at most that many
    latents per UNet call (0: all in one). The rows do not depend on each other, so the
    result does not depend on it; it bounds memory."""

    def eps_fn(z, t):
        stage = stage_of(t) if tau is None else scheduled_stage(t, tau)
        cond = torch.cat([k.condition(stage) for k in keys_e]).float()
        cond = cond.expand(z.shape[0], -1, -1) if len(keys_e) == 1 else cond
        size = z.shape[0] if batch_size <= 0 else batch_size
        return torch.cat([eps_model(z[first:first + size], t, cond[first:first + size])
                          for first in range(0, z.shape[0], size)])

    return eps_fn


def make_key_i(eps_model: EpsModel, z0: torch.Tensor, keys_e: list[KeyE], steps: int, mode: str = BDIA,
               refine: int = 4, meta: dict[str, str] | None = None,
               callback: ddim.StepCallback | None = None, batch_size: int = 0) -> list[KeyI]:
    """key-I of each latent in the batch z0 [B, 4, h, w] (scaled), one key-E per image.
    ``refine`` is used by ``fixed_point`` mode only. ``callback`` is called once per
    inversion step (``steps`` times in every mode). ``batch_size``: latents per UNet call
    (0: the whole batch in one), which the keys do not depend on."""
    if mode not in MODES:
        raise ValueError(f"inversion mode must be one of {MODES}, got {mode!r}")
    if mode == BDIA and steps < BDIA_MIN_STEPS:
        raise ValueError(f"bdia inversion needs at least {BDIA_MIN_STEPS} steps (its key is two states one level "
                         f"apart), got {steps}: use more steps, or another mode")
    refine = refine if mode == "fixed_point" else 0
    grid = ddim_grid(steps)
    fn = conditioned_eps(eps_model, keys_e, batch_size=batch_size)
    with torch.no_grad():
        if mode == BDIA:
            z, below = ddim.bdia_invert(fn, z0, grid, callback=callback)
        else:
            z, below = ddim.invert(fn, z0, grid, refine=refine, callback=callback), None
    meta = dict(meta or {}, grid=grid.describe())
    return [KeyI(z[n].cpu(), steps, mode, refine, {**meta, PAIR: key_e_id(key_e)},
                 below=None if below is None else below[n].cpu())
            for n, key_e in zip(range(len(z)), keys_e * len(z) if len(keys_e) == 1 else keys_e, strict=True)]


def recovery_steps(key_i: KeyI) -> int:
    """The UNet calls (per image) recovery makes from ``key_i``: its progress bar's total.
    BDIA sampling starts from two known states, so it makes one call fewer than steps."""
    return key_i.steps - 1 if key_i.inversion == BDIA else key_i.steps


def check_checkpoint(meta: dict[str, str], fingerprint: str | None, what: str) -> None:
    """Refuse a key made with another checkpoint than the one whose UNet has ``fingerprint``."""
    made_with = meta.get("checkpoint")
    if fingerprint and not made_with:
        raise KeyMismatchError(f"this {what} has no checkpoint fingerprint, so it cannot be checked against the "
                               "loaded model; make it again with this pack")
    if fingerprint and made_with != fingerprint:
        raise KeyMismatchError(f"this {what} was made with another checkpoint (fingerprint {made_with}); the "
                               f"loaded model's is {fingerprint}. Load the checkpoint the key was made with.")


def check_keys(keys_i: list[KeyI], fingerprint: str | None = None) -> int:
    """The step count a batch of key-Is share; refuses keys this model or pack cannot recover."""
    steps = {k.steps for k in keys_i}
    if len(steps) != 1 or len({tuple(k.latent.shape) for k in keys_i}) != 1:
        raise KeyMismatchError("the key-Is of one batch must share step count and size; recover them separately")
    if len({k.inversion == BDIA for k in keys_i}) != 1:
        raise KeyMismatchError("the key-Is of one batch mix bdia keys with fixed_point / ddim keys, which recover by "
                               "another sampler; recover them separately")
    if keys_i[0].inversion == BDIA and keys_i[0].steps < BDIA_MIN_STEPS:
        raise KeyMismatchError(f"this bdia key-I has {keys_i[0].steps} step; a bdia key has at least "
                               f"{BDIA_MIN_STEPS}, so it was not made by this pack")
    grid = ddim_grid(steps.pop())
    for k in keys_i:
        check_checkpoint(k.meta, fingerprint, "key-I")
        if k.meta.get("grid") != grid.describe():
            raise KeyMismatchError(f"this key-I was made on another timestep grid ({k.steps} steps), or has none; "
                                   "it cannot be recovered with this version of the pack")
    return grid.steps


def recover(eps_model: EpsModel, keys_i: list[KeyI], keys_e: list[KeyE], fingerprint: str | None = None,
            callback: ddim.StepCallback | None = None, batch_size: int = 0) -> torch.Tensor:
    """Stage III: the latents [B, 4, h, w] (scaled) that key-I + key-E give back. Refuses a
    key-E and key-I that do not belong together (another photo's key-E, UC). ``batch_size``:
    latents per UNet call (0: all in one)."""
    check_keys(keys_i, fingerprint)
    pairs = zip(keys_e * len(keys_i) if len(keys_e) == 1 else keys_e, keys_i, strict=True)
    if not all(belong_together(e, i) for e, i in pairs):
        raise KeyMismatchError(PAIR_MISMATCH)
    return retrace(eps_model, keys_i, keys_e, callback, batch_size)


def retrace(eps_model: EpsModel, keys_i: list[KeyI], keys_e: list[KeyE],
            callback: ddim.StepCallback | None = None, batch_size: int = 0) -> torch.Tensor:
    """Deterministic sampling from each key-I under the key-E given for it, on the key-Is'
    grid, by the sampler matching their inversion (BDIA for bdia keys, DDIM otherwise),
    whether or not the two belong together: recovery's sampling, without its checks. Only
    ``recover`` (which checks) and the wrong-key experiment (paper Fig. 7, which shows what
    keys that do not belong together give) call it. ``callback`` is called
    ``recovery_steps`` times."""
    grid = ddim_grid(check_keys(keys_i))
    fn = conditioned_eps(eps_model, keys_e, batch_size=batch_size)
    top = torch.stack([k.latent for k in keys_i])
    with torch.no_grad():
        if keys_i[0].inversion == BDIA:
            return ddim.bdia_sample(fn, top, torch.stack([k.below for k in keys_i]), grid, callback=callback)
        return ddim.sample(fn, top, grid, callback=callback)


def unconditional_key_e(key_e: KeyE) -> KeyE:
    """A key-E that conditions every stage on key-E's UC, the empty prompt's encoding: the
    key-E anyone without one has (the wrong-key experiment's "UC as key-E")."""
    return KeyE(key_e.uc.expand(STAGES, -1, -1).clone(), key_e.uc.clone(), dict(key_e.meta))
