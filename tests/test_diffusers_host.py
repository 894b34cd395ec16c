"""The core without ComfyUI: key-I and recovery over diffusers components, and our DDIM
loop against diffusers' own scheduler driving the same UNet."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffpriv_core import ddim
from diffpriv_core.adapters.diffusers import DiffusersEps
from diffpriv_core.key_types import KeyE, KeyI
from diffpriv_core.recovery import (KeyMismatchError, check_keys, conditioned_eps, make_key_i, recover, recovery_steps,
                                    retrace, unconditional_key_e)
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


class Counted:
    """An eps model that counts its calls."""

    def __init__(self, eps):
        self.eps, self.calls = eps, 0

    def __call__(self, z, t, cond):
        self.calls += 1
        return self.eps(z, t, cond)


def test_exact_keys_recover_each_image_of_a_batch_under_its_own_key_e():
    eps = Counted(DiffusersEps(tiny_components()["unet"]))
    g = torch.Generator().manual_seed(5)
    z0 = torch.randn(3, 4, 8, 8, generator=g) * 0.5
    keys_e = [random_key_e(10 + n) for n in range(3)]
    seen = []
    keys_i = make_key_i(eps, z0, keys_e, steps=10, callback=lambda *a: seen.append(a[:2]))  # the default: bdia
    assert eps.calls == 10 and seen == [(k, 10) for k in range(10)], "one UNet call per inversion step"
    assert all(k.inversion == "bdia" and k.refine == 0 and k.below.shape == k.latent.shape for k in keys_i)
    assert [recovery_steps(k) for k in keys_i] == [9] * 3

    rel = lambda z, ref: ((z - ref).pow(2).mean() / ref.pow(2).mean()).item()  # noqa: E731
    eps.calls, seen = 0, []
    together = recover(eps, keys_i, keys_e, callback=lambda *a: seen.append(a[:2]))
    assert eps.calls == 9 and seen == [(k, 9) for k in range(9)]
    for n in range(3):
        assert rel(together[n], z0[n]) < 1e-8, n  # to float rounding
        alone = recover(eps, keys_i[n:n + 1], keys_e[n:n + 1])[0]  # batched kernels round a little otherwise
        assert rel(alone, z0[n]) < 1e-8 and rel(alone, together[n]) < 1e-8, "batched recovery is recovery one by one"
        # Another image's key-E, or UC, run on this key-I does not give this image back.
        assert rel(retrace(eps, keys_i[n:n + 1], [keys_e[(n + 1) % 3]])[0], z0[n]) > 0.1
        assert rel(retrace(eps, keys_i[n:n + 1], [unconditional_key_e(keys_e[n])])[0], z0[n]) > 0.1
    with pytest.raises(KeyMismatchError, match="do not belong together"):
        recover(eps, keys_i, keys_e[::-1])


def test_a_batch_mixing_bdia_and_single_latent_keys_is_refused():
    eps = DiffusersEps(tiny_components()["unet"])
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 0.5
    key_e = random_key_e(7)
    exact = make_key_i(eps, z0, [key_e], steps=4)
    plain = make_key_i(eps, z0, [key_e], steps=4, mode="ddim")
    assert recovery_steps(plain[0]) == 4 and plain[0].below is None
    with pytest.raises(KeyMismatchError, match="mix bdia keys"):
        recover(eps, exact + plain, [key_e])
    with pytest.raises(ValueError, match="at least 2 steps"):
        make_key_i(eps, z0, [key_e], steps=1)
    one_step = KeyI(z0[0], 1, "bdia", 0, {"grid": ddim_grid(1).describe()}, below=z0[0])
    with pytest.raises(KeyMismatchError, match="at least 2"):
        check_keys([one_step])


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
