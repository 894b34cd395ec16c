"""The whole protection of one face, stage by stage, through the pack's own nodes.

Runs the nodes in process on random-weight models with the real shapes: MSI Inversion
(key-E), Identity Energy Guidance, the Guided DDIM Sampler with and without guidance, DDIM
Inversion Key (key-I) and Recover, on the astronaut photo. Every time comes from this one
run, so the ratios hold even on a noisy machine; peak memory is the process's so far.

    .venv/bin/python benchmarks/pipeline_stages.py                         # test size, minutes on a CPU
    .venv/bin/python benchmarks/pipeline_stages.py --unet sd15 --size 512 --steps 50 --samples 4 --msi-steps 60
"""
from __future__ import annotations

# sd15 arguments: --unet sd15 --size 512 --steps 50 --samples 4 --msi-steps 60

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffpriv_testmodels.cache import BENCHMARK_MODELS, UNET_WORDS, astronaut, benchmark_models  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stages:
    """Times each stage once and keeps the rows of the table."""

    def __init__(self):
        self.rows: list[tuple[str, float, int, float]] = []

    def run(self, name: str, units: int, fn):
        start = time.perf_counter()
        out = fn()
        self.rows.append((name, time.perf_counter() - start, units, peak_mib()))
        print(f"{name}: {self.rows[-1][1]:.1f} s", file=sys.stderr, flush=True)
        return out

    def seconds(self, name: str) -> float:
        return next(s for n, s, _, _ in self.rows if n == name)


def measure(args) -> tuple[Stages, str]:
    import torch

    from diffpriv_core.faces.recognizers import load_recognizer
    from diffpriv_testmodels.comfy_models import ARCFACE_ONNX, CHECKPOINT, CLIP_VISION
    from diffpriv_testmodels.inprocess import load_host_in_process

    host = load_host_in_process()
    import comfy.clip_vision  # importable once the host is on the path
    nodes = host.pack.nodes
    models = BENCHMARK_MODELS[args.unet]
    photo = astronaut(args.size)
    stages = Stages()
    with torch.inference_mode():  # as ComfyUI runs prompts
        model, clip, vae = host.sd.load_checkpoint_guess_config(str(models / CHECKPOINT))[:3]
        clip_vision = comfy.clip_vision.load(str(models / CLIP_VISION))
        with nodes.host.gradients():  # as the loader node: the sampler differentiates through it
            face_model = load_recognizer(models / ARCFACE_ONNX)
        latent = {"samples": vae.encode(photo)}
        key_e = stages.run("MSI Inversion (key-E)", args.msi_steps, lambda: nodes.msi.MSIInversion.execute(
            model, clip, vae, clip_vision, photo, "fast", args.msi_steps, 0.0, 0).args[0])
        positive = nodes.scheduler.EmbeddingScheduler.execute(key_e, "anonymize", 0.4).args[0]
        guidance = stages.run("Identity Energy Guidance (reference)", 1, lambda: nodes.guidance.IdentityGuidanceNode.execute(
            face_model, photo, "anonymize", 1.0, False, True, "face crop", 0, 0.5, "error", True).args[0])
        sampled = round(args.steps * 0.6)

        def sample(with_guidance):
            return nodes.protect.GuidedDDIMSampler.execute(model, vae, positive, latent, "custom", 0.6, args.steps,
                                                           args.samples, 0, guidance if with_guidance else None)

        stages.run("Guided DDIM Sampler, no guidance", sampled, lambda: sample(False))
        stages.run("Guided DDIM Sampler, guided (face crop)", sampled, lambda: sample(True))
        key_i = stages.run("DDIM Inversion Key (key-I, fixed_point 4)", args.steps,
                           lambda: nodes.recovery.DDIMInversionKey.execute(model, latent, key_e, args.steps,
                                                                           "fixed_point", 4).args[0])
        stages.run("Recover", args.steps, lambda: nodes.recovery.Recover.execute(model, key_i, key_e))
    return stages, str(model.load_device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=list(BENCHMARK_MODELS), default="test")
    parser.add_argument("--size", type=int, default=256, help="photo side in pixels (the face is about a sixth)")
    # Defaults keep the test size to a few minutes on a CPU; the sd15 arguments are the presets'.
    parser.add_argument("--steps", type=int, default=20, help="DDIM grid steps (sampling runs the last 60%%)")
    parser.add_argument("--samples", type=int, default=2, help="candidates per photo")
    parser.add_argument("--msi-steps", type=int, default=10, help="MSI training steps (the fast preset has 60)")
    args = parser.parse_args()
    benchmark_models(args.unet)
    stages, device = measure(args)
    print(f"One {args.size}x{args.size} px photo, {UNET_WORDS[args.unet]} with the real-size VAE and CLIP "
          f"ViT-L/14 (random weights), ArcFace-shaped test recogniser, device {device}; anonymize with "
          f"{args.samples} candidates, S_ns 0.6 of a {args.steps}-step grid, MSI fast preset with {args.msi_steps} "
          "steps (its time includes the CLIP features, computed once). Each stage ran once, in this order, in one "
          "process.\n")
    print("| stage | seconds | per step | peak memory so far (MiB) |\n|---|---|---|---|")
    for name, seconds, units, peak in stages.rows:
        print(f"| {name} | {seconds:.2f} | {seconds / units:.3f} | {peak:.0f} |")
    plain, guided = stages.seconds("Guided DDIM Sampler, no guidance"), stages.seconds(
        "Guided DDIM Sampler, guided (face crop)")
    protect = sum(s for n, s, _, _ in stages.rows if n not in ("Recover", "Guided DDIM Sampler, no guidance"))
    print(f"\nGuided sampling costs {guided / plain:.2f}x the same sampling without guidance. Protecting the "
          f"face (MSI, guidance, guided sampling, key-I) took {protect:.1f} s; recovering it "
          f"{stages.seconds('Recover'):.1f} s.")


if __name__ == "__main__":
    main()
