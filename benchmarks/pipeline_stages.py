"""The whole protection of one face (or of several, as one batch), stage by stage, through
the pack's own nodes.

Runs the nodes in process on random-weight models with the real shapes: MSI Inversion
(key-E), Identity Energy Guidance, the Guided DDIM Sampler with and without guidance, DDIM
Inversion Key (key-I) and Recover, on the astronaut photo (``--faces N``: N copies of it, the
nodes' batch of N faces at their default batch sizes). Every time comes from this one
run, so the ratios hold even on a noisy machine. Peak memory: on a GPU each stage's own
(allocated tensors), on the CPU the process's so far. Timing does not depend on the
weights, so random ones give the real cost.

    .venv/bin/python benchmarks/pipeline_stages.py                         # test size, minutes on a CPU
    .venv/bin/python benchmarks/pipeline_stages.py --unet sd15 --size 512 --steps 50 --samples 4 --msi-steps 60
    .venv/bin/python benchmarks/pipeline_stages.py --unet sd15 --size 512 --task hide --preset --device cuda --dtype bf16
    .venv/bin/python benchmarks/pipeline_stages.py --dry ...  # the same, tiny, on the CPU: checks, measures nothing
"""
from __future__ import annotations

# sd15 arguments: --unet sd15 --size 512 --steps 50 --samples 4 --msi-steps 60
# gpu arguments: --unet sd15 --size 512 --task anonymize --preset --msi-steps 40 --device cuda --dtype fp32
# gpu arguments: --unet sd15 --size 512 --task anonymize --preset --msi-steps 40 --device cuda --dtype bf16
# gpu arguments: --unet sd15 --size 512 --task hide --preset --msi-steps 40 --device cuda --dtype fp32
# gpu arguments: --unet sd15 --size 512 --task hide --preset --msi-steps 40 --device cuda --dtype bf16
# gpu arguments: --unet sd15 --size 512 --task anonymize --preset --msi-steps 40 --faces 6 --device cuda --dtype fp32
# gpu arguments: --unet sd15 --size 512 --task anonymize --preset --msi-steps 40 --faces 6 --device cuda --dtype bf16

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffpriv_testmodels.cache import BENCHMARK_MODELS, UNET_WORDS, astronaut, astronaut_face, benchmark_models  # noqa: E402


class Stages:
    """Times each stage once and keeps the rows of the table, and the network passes the
    stage's node reported (its history's ``passes``, per image of its batch)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.rows: list[tuple[str, float, int, float]] = []
        self.passes: dict[str, dict[str, int]] = {}
        self.calls: dict[str, dict[str, int]] = {}  # calls of the batch the first face was in

    def run(self, name: str, units: int, fn):
        """Runs ``fn`` (a node's execute) and returns its NodeOutput."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        self.rows.append((name, time.perf_counter() - start, units, self.peak_mib()))
        entries = (out.ui or {}).get("passes", [])
        self.passes[name] = {k: v for entry in entries[:1] for k, v in entry["passes"].items()}  # the first face's
        self.calls[name] = {k: v for entry in entries[:1] for k, v in entry.get("calls", {}).items()}
        print(f"{name}: {self.rows[-1][1]:.1f} s", file=sys.stderr, flush=True)
        return out

    def peak_mib(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def seconds(self, name: str) -> float:
        return next(s for n, s, _, _ in self.rows if n == name)


# ComfyUI's precision flags per --dtype: every network in it (ComfyUI's own choice otherwise).
DTYPE_OPTIONS = {"fp32": {"force_fp32": True},
                 "bf16": {"bf16_unet": True, "bf16_vae": True, "bf16_text_enc": True}}
# A dry run's bf16: the UNet only. bf16 convolutions are very slow on most CPUs (the VAE's
# gradient path would take minutes even at 64 px); the dry run checks that the flags reach
# ComfyUI and the pipeline runs with a bf16 network in it, and the GPU run does the rest.
DRY_DTYPE_OPTIONS = dict(DTYPE_OPTIONS, bf16={"bf16_unet": True})
DRY = dict(unet="test", size=64, steps=2, msi_steps=1, samples=1, device="cpu")  # a face filling 64 px


def measure(args) -> tuple[Stages, str]:
    import torch

    from diffpriv_core.faces.recognizers import load_recognizer
    from diffpriv_core.msi_train import DEFAULT_PRESET
    from diffpriv_testmodels.comfy_models import ARCFACE_ONNX, TEST_THRESHOLD, CHECKPOINT, CLIP_VISION
    from diffpriv_testmodels.inprocess import load_host_in_process

    options = (DRY_DTYPE_OPTIONS if args.dry else DTYPE_OPTIONS).get(args.dtype, {})
    host = load_host_in_process(cpu=args.device == "cpu", **options)
    import comfy.clip_vision  # importable once the host is on the path
    import comfy.model_management

    nodes = host.pack.nodes
    models = BENCHMARK_MODELS[args.unet]
    photo = astronaut_face(args.size) if args.dry else astronaut(args.size)
    photo = photo.expand(args.faces, *photo.shape[1:]).clone()
    stages = Stages(cuda=args.device == "cuda")
    with torch.inference_mode():  # as ComfyUI runs prompts
        model, clip, vae = host.sd.load_checkpoint_guess_config(str(models / CHECKPOINT))[:3]
        if args.dtype == "bf16" and model.model.get_dtype() != torch.bfloat16:
            raise SystemExit(f"--dtype bf16 asked, but ComfyUI runs the UNet in {model.model.get_dtype()} "
                             f"on {comfy.model_management.get_torch_device()}")
        clip_vision = comfy.clip_vision.load(str(models / CLIP_VISION))
        with nodes.host.gradients():  # as the loader node: the sampler differentiates through it
            face_model = load_recognizer(models / ARCFACE_ONNX, TEST_THRESHOLD)
        latent = {"samples": vae.encode(photo)}
        key_e = stages.run("MSI Inversion (key-E)", args.msi_steps, lambda: nodes.msi.MSIInversion.execute(
            model, clip, vae, clip_vision, photo, DEFAULT_PRESET, args.msi_steps, 0.0, 0)).args[0]
        positive = nodes.scheduler.EmbeddingScheduler.execute(key_e, args.task, args.tau).args[0]
        guidance = stages.run("Identity Energy Guidance (reference)", 1, lambda: nodes.guidance.IdentityGuidanceNode.execute(
            face_model, photo, args.task, 1.0, False, True, "face crop", 0, 0.5, "error", True)).args[0]
        sampled = round(args.steps * args.s_ns)

        def sample(with_guidance):
            return nodes.protect.GuidedDDIMSampler.execute(model, vae, positive, latent, "custom", args.s_ns,
                                                           args.steps, args.samples, 0,
                                                           guidance if with_guidance else None)

        stages.run("Guided DDIM Sampler, no guidance", sampled, lambda: sample(False))
        stages.run("Guided DDIM Sampler, guided (face crop)", sampled, lambda: sample(True))
        key_i_mode = nodes.recovery.KEY_I
        key_i = stages.run(f"DDIM Inversion Key (key-I, {key_i_mode.mode})", args.steps,
                           lambda: nodes.recovery.DDIMInversionKey.execute(model, latent, key_e, args.steps,
                                                                           key_i_mode.mode, key_i_mode.refine)).args[0]
        stages.run("Recover", args.steps, lambda: nodes.recovery.Recover.execute(model, key_i, key_e))
    return stages, str(model.load_device)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from diffpriv_core.tasks import TASKS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=list(BENCHMARK_MODELS), default="test")
    parser.add_argument("--size", type=int, default=256, help="photo side in pixels (the face is about a sixth)")
    parser.add_argument("--task", choices=list(TASKS), default="anonymize", help="energy, S_ns and tau of this task")
    # Defaults keep the test size to a few minutes on a CPU; --preset takes the task's.
    parser.add_argument("--steps", type=int, default=20, help="DDIM grid steps (sampling runs the last S_ns of them)")
    parser.add_argument("--samples", type=int, default=2, help="candidates per face")
    parser.add_argument("--faces", type=int, default=1, help="faces protected together, as one batch")
    parser.add_argument("--preset", action="store_true", help="the task preset's steps and candidates")
    parser.add_argument("--msi-steps", type=int, default=10,
                        help="MSI training steps measured (the default preset has at most 350: the table projects)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["auto", *DTYPE_OPTIONS], default="auto",
                        help="the networks' precision (auto: ComfyUI's choice for the device)")
    parser.add_argument("--dry", action="store_true",
                        help="the same run, tiny, on the CPU (test UNet, a face filling 64 px, a 2-step grid, 1 "
                             "candidate, 1 MSI step; bf16 for the UNet only): checks that the script works, "
                             "measures nothing")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    args.s_ns, args.tau = task.strength, task.tau
    if args.preset:
        args.steps, args.samples = task.steps, task.samples
    if args.dry:
        vars(args).update(DRY)
    return args


def main(argv: list[str] | None = None) -> None:
    from diffpriv_core.msi_train import DEFAULT_PRESET, PRESETS as MSI_PRESETS
    from diffpriv_core.passes import TITLES

    args = parse(argv)
    benchmark_models(args.unet)
    stages, device = measure(args)
    precision = "ComfyUI's default precision" if args.dtype == "auto" else args.dtype
    if args.dry and args.dtype == "bf16":
        precision = "bf16 UNet, the rest fp32"
    faces = f"{args.faces} faces of " if args.faces > 1 else ""
    print(f"{'DRY RUN (nothing measured): ' if args.dry else ''}{faces}One {args.size}x{args.size} px photo, "
          f"{UNET_WORDS[args.unet]} with the real-size VAE and CLIP ViT-L/14 (random weights), ArcFace-shaped test "
          f"recogniser, device {device}, {precision}; {args.task} with {args.samples} candidate(s), S_ns "
          f"{args.s_ns} of a {args.steps}-step grid, MSI {DEFAULT_PRESET} preset with {args.msi_steps} steps (its time includes "
          "the CLIP features, computed once). Each stage ran once, in this order, in one process.\n")
    memory = "peak memory of the stage (MiB)" if stages.cuda else "peak memory so far (MiB)"
    print(f"| stage | seconds | per step | {memory} |\n|---|---|---|---|")
    for name, seconds, units, peak in stages.rows:
        print(f"| {name} | {seconds:.2f} | {seconds / units:.3f} | {peak:.0f} |")
    print(f"\nNetwork passes each stage reported for one face, and the calls in sequence its batch of "
          f"{args.faces} face(s) made (the workflow's VAE Encode of the photo and VAE Decode of the "
          f"{args.samples} candidate(s) come on top):\n")
    print("| stage | " + " | ".join(TITLES.values()) + " | UNet calls |\n|---|" + "---|" * (len(TITLES) + 1))
    for name, counts in stages.passes.items():
        print(f"| {name} | " + " | ".join(str(counts.get(key, 0)) for key in TITLES)
              + f" | {stages.calls[name].get('unet_forward', 0)} |")
    plain, guided = stages.seconds("Guided DDIM Sampler, no guidance"), stages.seconds(
        "Guided DDIM Sampler, guided (face crop)")
    msi = stages.seconds("MSI Inversion (key-E)")
    protect = sum(s for n, s, _, _ in stages.rows if n not in ("Recover", "Guided DDIM Sampler, no guidance"))
    msi_full = msi / args.msi_steps * MSI_PRESETS[DEFAULT_PRESET].steps
    print(f"\nGuided sampling costs {guided / plain:.2f}x the same sampling without guidance. Protecting the "
          f"face (MSI, guidance, guided sampling, key-I) took {protect:.1f} s; recovering it "
          f"{stages.seconds('Recover'):.1f} s. With MSI's full {DEFAULT_PRESET} preset ({MSI_PRESETS[DEFAULT_PRESET].steps} steps at "
          f"most; projected from the {args.msi_steps} measured here) protecting would take at most "
          f"{protect - msi + msi_full:.1f} s.")


if __name__ == "__main__":
    main()
