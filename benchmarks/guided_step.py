"""Cost of Algorithm 1's identity guidance: a guided DDIM step against a plain one.

A plain step is one UNet call; a guided step adds the VAE decode of x0-hat, the aligned
face through the recogniser, and their backward pass (never the UNet's). Measured on the
test-size SD1.5 (real VAE size; ``--unet sd15``: SD1.5's full UNet, the real cost) and the
ArcFace-shaped test recogniser, on a photo whose face is smaller than the frame, decoding
the whole frame and only the face crop. Each configuration runs in its own process so its
peak resident memory is its own.

    .venv/bin/python benchmarks/guided_step.py [--size 256] [--steps 4] [--unet sd15 --checkpointing]
"""
from __future__ import annotations

# sd15 arguments: --unet sd15 --size 512 --steps 4 --checkpointing

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffpriv_testmodels.cache import BENCHMARK_MODELS, UNET_WORDS, astronaut, benchmark_models  # noqa: E402
CONFIGS = ("plain", "guided, whole frame", "guided, face crop")


def measure(config: str, size: int, steps: int, models: Path, checkpointing: bool) -> dict:
    import torch

    from diffpriv_core import ddim
    from diffpriv_core.faces.detect import detect_faces
    from diffpriv_core.faces.recognizers import load_recognizer
    from diffpriv_core.guided import IdentityCorrection, IdentityGuidance, face_target
    from diffpriv_core.key_types import KeyE
    from diffpriv_core.recovery import conditioned_eps
    from diffpriv_core.schedule import Grid, ddim_grid
    from diffpriv_core.tasks import TASKS
    from diffpriv_testmodels.comfy_models import ARCFACE_ONNX, TEST_THRESHOLD, CHECKPOINT
    from diffpriv_testmodels.inprocess import load_host_in_process, pack_module

    host = load_host_in_process()
    adapters = pack_module("nodes.adapters")
    model, _clip, vae = host.sd.load_checkpoint_guess_config(str(models / CHECKPOINT))[:3]
    photo = astronaut(size)
    g = torch.Generator().manual_seed(0)
    key_e = KeyE(torch.randn(10, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g))
    eps = adapters.ComfyEpsModel(model)
    conditioned = conditioned_eps(eps, [key_e], tau=0.4)

    def eps_fn(z, t):
        with torch.no_grad():  # as the sampler node: Algorithm 1 never backpropagates through the UNet
            return conditioned(z, t)

    with torch.no_grad():
        z0 = eps.to_z(vae.encode(photo))
    grid = ddim_grid(steps * 2).tail(0.5)
    correction = None
    if config != "plain":
        embedder = load_recognizer(models / ARCFACE_ONNX, TEST_THRESHOLD)
        target = face_target(embedder, photo[0], detect_faces(photo[0])[0])
        guidance = IdentityGuidance(embedder, "anonymize", TASKS["anonymize"].lambdas, (target,),
                                    crop_margin=0.5 if config.endswith("crop") else None)
        decoder = adapters.ComfyDecoder(vae, model.get_model_object("latent_format"), checkpointed=checkpointing)
        correction = IdentityCorrection(guidance, target, decoder, grid)
    z = ddim.add_noise(z0, torch.randn(z0.shape, generator=g), grid.alphas[0])
    ddim.sample(eps_fn, z, Grid(grid.timesteps[:1], grid.alphas[:2]), correction)  # warm-up: first calls allocate
    start = time.perf_counter()
    ddim.sample(eps_fn, z, grid, correction)
    seconds = (time.perf_counter() - start) / grid.steps
    return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "device": str(model.load_device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--unet", choices=list(BENCHMARK_MODELS), default="test")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the VAE decoder")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.size, args.steps, BENCHMARK_MODELS[args.unet], args.checkpointing)))
        return
    benchmark_models(args.unet)
    results = {}
    for config in CONFIGS:
        flags = ["--size", str(args.size), "--steps", str(args.steps), "--unet", args.unet]
        flags += ["--checkpointing"] if args.checkpointing else []
        done = subprocess.run([sys.executable, __file__, "--child", config, *flags], cwd=ROOT, capture_output=True,
                              text=True, check=True)
        results[config] = json.loads(done.stdout.strip().splitlines()[-1])
    plain = results["plain"]["seconds"]
    decoder = "a gradient-checkpointed VAE decoder" if args.checkpointing else "the real-size VAE"
    print(f"{args.size}x{args.size} px photo (the face about a sixth of its width), {UNET_WORDS[args.unet]} with "
          f"{decoder}, ArcFace-shaped test recogniser, device {results['plain']['device']}; mean over {args.steps} steps after one "
          "warm-up step, each configuration in its own process.\n")
    print("| step | seconds | vs plain | peak memory (MiB) |\n|---|---|---|---|")
    for config, r in results.items():
        print(f"| {config} | {r['seconds']:.3f} | {r['seconds'] / plain:.2f}x | {r['peak_mib']:.0f} |")
    if args.unet == "test":
        print("\nThe test-size UNet is far smaller than SD1.5's, so these ratios overstate the guidance's share; "
              "`--unet sd15` measures them against SD1.5's full UNet.")


if __name__ == "__main__":
    main()
