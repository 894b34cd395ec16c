"""The core without ComfyUI: key-I and recovery over diffusers components, and our DDIM
loop against diffusers' own scheduler driving the same UNet."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffpriv_core import ddim
from diffpriv_core.adapters.diffusers import DiffusersEps
from diffpriv_core.key_types import KeyE
from diffpriv_core.recovery import KeyMismatchError, conditioned_eps, make_key_i, recover
from diffpriv_core.schedule import ddim_grid
from diffpriv_testmodels.tiny_diffusers import TOKEN_DIM, tiny_components
from test_ddim import SD


def random_key_e(seed: int) -> KeyE:
    g = torch.Generator().manual_seed(seed)
    return KeyE(torch.randn(10, 77, TOKEN_DIM, generator=g), torch.randn(1, 77, TOKEN_DIM, generator=g))


def test_recovery_with_diffusers_components():
    eps = DiffusersEps(tiny_components()["unet"])
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 8, 8, generator=g) * 0.5
    key_e, other = random_key_e(1), random_key_e(2)
    keys_i = make_key_i(eps, z0, [key_e], steps=20, mode="fixed_point", refine=8)
    plain_i = make_key_i(eps, z0, [key_e], steps=20, mode="ddim")
    err = lambda z: (z - z0).pow(2).mean().item()  # noqa: E731
    right = err(recover(eps, keys_i, [key_e]))
    assert right < 1e-4 * z0.pow(2).mean().item()
    assert err(recover(eps, plain_i, [key_e])) > 10 * right
    with pytest.raises(KeyMismatchError, match="do not belong together"):  # another photo's key-E
        recover(eps, keys_i, [other])
    assert err(recover(eps, keys_i[::-1], [key_e])) > 1000 * right  # each image's key-I is its own


@torch.no_grad()
def test_our_loop_equals_diffusers_scheduler_on_the_same_unet():
    unet = tiny_components()["unet"]
    key_e = random_key_e(3)
    eps_fn = conditioned_eps(DiffusersEps(unet), [key_e])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ours = ddim.sample(eps_fn, z, ddim_grid(25))
    sched = DDIMScheduler(**SD)
    sched.set_timesteps(25)
    ref = z.clone()
    for t in sched.timesteps:
        cond = key_e.condition(int(t) // 100)
        ref = sched.step(unet(ref, t, encoder_hidden_states=cond).sample, t, ref, eta=0.0).prev_sample
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
