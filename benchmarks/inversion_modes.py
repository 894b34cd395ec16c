"""Recovery error of each inversion mode, measured in one run.

Inverts a VAE-encoded photo under a key-E with every mode, recovers it, and prints the UNet
calls key-I and recovery make, the latent error relative to the latent's power, the pixel
error after decoding (against the VAE's own reconstruction and against the photo), and the
time per image (key-I and recovery) relative to plain DDIM. Uses the seeded test-size
models (random weights: the figures say how exact the inversion is, nothing about picture
quality).

    .venv/bin/python benchmarks/inversion_modes.py [--steps 50] [--size 64]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffpriv_testmodels.cache import astronaut, comfy_test_models  # noqa: E402
from diffpriv_testmodels.comfy_models import CHECKPOINT  # noqa: E402
from diffpriv_testmodels.inprocess import load_host_in_process, pack_module  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    models = comfy_test_models()
    host = load_host_in_process()
    from diffpriv_core import ddim
    from diffpriv_core.key_types import KeyE
    from diffpriv_core.recovery import conditioned_eps
    from diffpriv_core.schedule import ddim_grid

    adapters = pack_module("nodes.adapters")
    model, _clip, vae = host.sd.load_checkpoint_guess_config(str(models / CHECKPOINT))[:3]
    photo = astronaut(args.size)
    g = torch.Generator().manual_seed(0)
    key_e = KeyE(torch.randn(10, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g))
    eps = adapters.ComfyEpsModel(model)
    samples = vae.encode(photo)
    z0 = eps.to_z(samples)
    reconstruction = vae.decode(samples)
    vae_err = (reconstruction - photo).pow(2).mean().item()
    conditioned = conditioned_eps(eps, [key_e])
    calls = [0]

    def fn(z, t):
        calls[0] += 1
        return conditioned(z, t)

    grid = ddim_grid(args.steps)
    print(f"{args.steps} DDIM steps, one {args.size}x{args.size} photo, "
          "test-size SD1.5 with random weights (the figures say how exactly recovery retraces the inversion, "
          f"nothing about picture quality). VAE encode/decode alone: pixel MSE vs photo {vae_err:.2e}.\n")
    print("| mode | refine | UNet calls: key-I | UNet calls: recovery | latent rel. MSE | pixel MSE vs VAE recon "
          "| pixel MSE vs photo | time vs ddim |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.no_grad():  # warm-up, untimed: the first UNet calls pay for allocations
        ddim.sample(conditioned, z0, ddim_grid(4))
    base_time = None
    modes = (("ddim", 0), ("bdia", 0), ("fixed_point", 2), ("fixed_point", 4), ("fixed_point", 5),
             ("fixed_point", 10), ("fixed_point", 20))
    for mode, refine in modes:
        start = time.perf_counter()
        with torch.no_grad():
            calls[0] = 0
            if mode == "bdia":  # the pair of states BDIA's key-I is, and BDIA sampling from it
                top, below = ddim.bdia_invert(fn, z0, grid)
                inversion_calls, calls[0] = calls[0], 0
                z = ddim.bdia_sample(fn, top, below, grid)
            else:
                key_i = ddim.invert(fn, z0, grid, refine=refine)
                inversion_calls, calls[0] = calls[0], 0
                z = ddim.sample(fn, key_i, grid)
            recovery_calls = calls[0]
        seconds = time.perf_counter() - start
        base_time = base_time or seconds
        pixels = vae.decode(eps.to_samples(z))
        rel = ((z - z0).pow(2).mean() / z0.pow(2).mean()).item()
        print(f"| {mode} | {refine if mode == 'fixed_point' else '-'} | {inversion_calls} | {recovery_calls} "
              f"| {rel:.2e} | {(pixels - reconstruction).pow(2).mean().item():.2e} "
              f"| {(pixels - photo).pow(2).mean().item():.2e} | {seconds / base_time:.1f}x |")
    print("\nbdia (the default) is ours: an exactly invertible pair, BDIA inversion and BDIA sampling; its key-I is "
          "two latents. The paper inverts by plain DDIM (ddim); fixed_point was the previous default (4 refinements). "
          "UNet calls are the cost whatever the hardware (fixed_point stops refining a step where it no longer "
          "improves); times are wall clock on a shared machine.")


if __name__ == "__main__":
    main()
