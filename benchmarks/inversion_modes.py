"""Recovery error of each inversion mode, measured in one run.

Inverts a VAE-encoded photo under a key-E with every mode, recovers it, and prints the
latent error relative to the latent's power, the pixel error after decoding (against the
VAE's own reconstruction and against the photo), and the time per image relative to plain
DDIM. Uses the seeded test-size models (random weights: the figures say how exact the
inversion is, nothing about picture quality).

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
    fn = conditioned_eps(eps, [key_e])
    grid = ddim_grid(args.steps)
    print(f"{args.steps} DDIM steps, one {args.size}x{args.size} photo, "
          "test-size SD1.5 with random weights (the figures say how exactly recovery retraces the inversion, "
          f"nothing about picture quality). VAE encode/decode alone: pixel MSE vs photo {vae_err:.2e}.\n")
    print("| mode | refine | latent rel. MSE | pixel MSE vs VAE recon | pixel MSE vs photo | time vs ddim |")
    print("|---|---|---|---|---|---|")
    base_time = None
    for mode, refine in (("ddim", 0), ("fixed_point", 2), ("fixed_point", 5), ("fixed_point", 10), ("fixed_point", 20)):
        start = time.perf_counter()
        with torch.no_grad():
            key_i = ddim.invert(fn, z0, grid, refine=refine)
            z = ddim.sample(fn, key_i, grid)
        seconds = time.perf_counter() - start
        base_time = base_time or seconds
        pixels = vae.decode(eps.to_samples(z))
        rel = ((z - z0).pow(2).mean() / z0.pow(2).mean()).item()
        print(f"| {mode} | {refine} | {rel:.2e} | {(pixels - reconstruction).pow(2).mean().item():.2e} "
              f"| {(pixels - photo).pow(2).mean().item():.2e} | {seconds / base_time:.1f}x |")


if __name__ == "__main__":
    main()
