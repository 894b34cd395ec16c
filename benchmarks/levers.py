"""What each lever saves on one face, and whether it changes the result: every lever runs
against its baseline in this one process, on the same inputs, and the table gives both
times, their ratio and the largest difference between the two results.

    .venv/bin/python benchmarks/levers.py [--size 256] [--steps 10] [--msi-steps 8] [--only msi batch ...]

Runs through the pack's ComfyUI adapters on the benchmark models (the test-size SD1.5 UNet
with the real-size VAE and CLIP ViT-L/14, random weights, the ArcFace-shaped test
recogniser) and the astronaut photo. Levers:
- MSI, faithful preset: the photo's VAE moments and CLIP features computed once per flip
  instead of at every step (both encoders are deterministic; the preset now does this).
- Stage II: the anonymize candidates in one UNet / decoder / recogniser batch, against one
  candidate at a time (L_div off here: it couples the candidates, so only the batch computes it).
- The guidance step (decoder + recogniser forward and backward) under bf16 autocast, and
  with the decoder in channels_last memory format, against fp32 contiguous.
- Attention through torch's scaled_dot_product_attention, against ComfyUI's choice for
  this device, in the UNet's passes.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffpriv_testmodels.cache import astronaut, benchmark_models  # noqa: E402
# torch's own autocast (comfy-test's rule asks for comfy.ops): the benchmark measures autocast itself.
from torch import autocast as torch_autocast  # noqa: E402


def timed(fn):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def relative(a, b) -> float:
    """|a - b| / |a| over the whole tensor."""
    return float((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-30))


class Setup:
    """The host's networks, the photo and its face, as the nodes would hold them."""

    def __init__(self, args):
        import torch

        from diffpriv_core.faces.detect import detect_faces
        from diffpriv_core.faces.recognizers import load_recognizer
        from diffpriv_testmodels.comfy_models import ARCFACE_ONNX, TEST_THRESHOLD, CHECKPOINT, CLIP_VISION
        from diffpriv_testmodels.inprocess import load_host_in_process, pack_module

        models = benchmark_models("test")
        host = load_host_in_process(cpu=True)
        import comfy.clip_vision

        self.adapters, self.msi_adapters = pack_module("nodes.adapters"), pack_module("nodes.msi_adapters")
        self.gradients = pack_module("nodes.host").gradients
        with torch.inference_mode():
            self.model, self.clip, self.vae = host.sd.load_checkpoint_guess_config(str(models / CHECKPOINT))[:3]
            self.clip_vision = comfy.clip_vision.load(str(models / CLIP_VISION))
            photo = astronaut(args.size)
            raw = self.vae.encode(photo)
        with self.gradients():
            self.photo = photo.clone()
            self.face_model = load_recognizer(models / ARCFACE_ONNX, TEST_THRESHOLD)
            self.face = detect_faces(self.photo[0])[0]
            self.eps = self.adapters.ComfyEpsModel(self.model)
            self.z0 = self.eps.to_z(raw.clone())

    def msi_host(self):
        from diffpriv_core.msi_train import MSIHost

        a, m = self.adapters, self.msi_adapters
        return MSIHost(eps=a.ComfyEpsModel(self.model, differentiable=True), codec=m.ComfyCodec(self.vae, self.model),
                       text=m.ComfyText(self.clip), features=m.ComfyImageFeatures(self.clip_vision),
                       alphas=m.alphas_of(self.model))

    def uc_key_e(self):
        """A key-E of the empty prompt at every stage, for the levers that do not train MSI."""
        import torch

        from diffpriv_core.key_types import KeyE

        with torch.no_grad():
            uc = self.msi_adapters.ComfyText(self.clip).encode_empty().float()
        return KeyE(uc.expand(10, -1, -1).clone(), uc.clone())

    def decoder(self, network=None):
        decoder = self.adapters.ComfyDecoder(self.vae, self.model.model.latent_format)
        if network is not None:
            decoder.network = network
        return decoder


def msi_encodings(s: Setup, args) -> tuple:
    from diffpriv_core.msi_train import preset, train_msi

    with s.gradients():
        host = s.msi_host()
        config = preset("faithful", steps=args.msi_steps)
        base_t, base = timed(lambda: train_msi(s.photo, host, dataclasses.replace(config, reuse_encodings=False)))
        lever_t, lever = timed(lambda: train_msi(s.photo, host, dataclasses.replace(config, reuse_encodings=True)))
    s.key_e = lever.key
    return (f"MSI faithful, {args.msi_steps} steps: photo encoded once per flip, not at every step", base_t, lever_t,
            f"key-E max abs diff {max_diff(base.key.stages, lever.key.stages):.1e}")


def guidance(s: Setup, diversity: bool = False):
    from diffpriv_core import guided
    from diffpriv_core.tasks import TASKS

    target = guided.face_target(s.face_model, s.photo[0], s.face)
    return guided.IdentityGuidance(s.face_model, "anonymize", TASKS["anonymize"].lambdas, (target,),
                                   diversity=diversity, crop_margin=0.5), target


def candidates_batched(s: Setup, args) -> tuple:
    import torch

    from diffpriv_core import ddim, guided
    from diffpriv_core.recovery import conditioned_eps
    from diffpriv_core.schedule import ddim_grid
    from diffpriv_core.tasks import TASKS

    task = TASKS["anonymize"]
    tail = ddim_grid(args.steps).tail(task.strength)
    conditioned = conditioned_eps(s.eps, [s.key_e], task.tau)

    def eps_fn(z, t):
        with torch.no_grad():  # as the sampler node: Algorithm 1 never backpropagates through the UNet
            return conditioned(z, t)
    noise = guided.start_noise((task.samples, *s.z0.shape[1:]), 0, 0)
    with s.gradients():
        start = ddim.add_noise(s.z0.expand(task.samples, -1, -1, -1), noise, tail.alphas[0])
        guide, target = guidance(s)

        def run(z):
            return ddim.sample(eps_fn, z, tail, guided.IdentityCorrection(guide, target, s.decoder(), tail))

        base_t, base = timed(lambda: torch.cat([run(start[i:i + 1]) for i in range(task.samples)]))
        lever_t, lever = timed(lambda: run(start))
    return (f"Stage II, {task.samples} candidates x {tail.steps} steps: one batch, not one at a time", base_t, lever_t,
            f"latents max abs diff {max_diff(base, lever):.1e}")


def guidance_step(s: Setup, args, label: str, autocast: bool = False, channels_last: bool = False) -> tuple:
    """The energy gradient of the 4 candidates' x0 estimates, ``args.repeats`` times."""
    import copy

    import torch

    from diffpriv_core import guided

    with s.gradients():
        guide, target = guidance(s, diversity=True)
        jitter = torch.randn(4, *s.z0.shape[1:], generator=torch.Generator().manual_seed(0))
        x0 = s.z0.expand(4, -1, -1, -1) + 0.3 * jitter
        base = guided.IdentityCorrection(guide, target, s.decoder(), None)
        network = copy.deepcopy(base.decoder.network)
        if channels_last:
            network = network.to(memory_format=torch.channels_last)
        lever = guided.IdentityCorrection(guide, target, s.decoder(network), None)
        context = torch_autocast("cpu", dtype=torch.bfloat16) if autocast else torch_autocast("cpu", enabled=False)

        def lever_gradient():
            with context:
                return lever.energy_gradient(x0)

        base_t, base_grad = timed(lambda: [base.energy_gradient(x0) for _ in range(args.repeats)][-1])
        lever_t, lever_grad = timed(lambda: [lever_gradient() for _ in range(args.repeats)][-1])
    return (f"guidance step (4 candidates, face crop) x {args.repeats}: {label}", base_t, lever_t,
            f"gradient relative diff {relative(base_grad, lever_grad):.1e}")


def sdpa_attention(s: Setup, args) -> tuple:
    """The UNet's passes with torch's SDPA in every attention layer, against the default."""
    import comfy.ldm.modules.attention as attention
    import torch

    from diffpriv_core.recovery import conditioned_eps

    eps_fn = conditioned_eps(s.eps, [s.key_e])
    z = s.z0.expand(4, -1, -1, -1).contiguous()

    def passes():
        with torch.no_grad():
            return [eps_fn(z, t) for t in range(999, 0, -1000 // args.steps)][-1]

    default = attention.optimized_attention
    with s.gradients():
        base_t, base = timed(passes)
        attention.optimized_attention = attention.attention_pytorch
        try:
            lever_t, lever = timed(passes)
        finally:
            attention.optimized_attention = default
    return (f"UNet, {args.steps} passes of 4 latents: torch SDPA, not ComfyUI's default ({default.__name__})", base_t,
            lever_t, f"eps max abs diff {max_diff(base, lever):.1e}")


LEVERS = {"msi": msi_encodings, "batch": candidates_batched, "sdpa": sdpa_attention,
          "bf16": lambda s, args: guidance_step(s, args, "bf16 autocast", autocast=True),
          "channels_last": lambda s, args: guidance_step(s, args, "decoder channels_last", channels_last=True)}


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="photo side in pixels (the face is about a sixth)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM grid steps (anonymize samples 60%% of them)")
    parser.add_argument("--msi-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="guidance steps timed per variant")
    parser.add_argument("--only", nargs="+", choices=list(LEVERS),
                        help="these levers (default: all but bf16, which a CPU without bf16 instructions runs for "
                             "far longer than the rest together)")
    parser.add_argument("--dry", action="store_true",
                        help="1 MSI step, a 2-step grid, 1 repeat: checks, measures nothing")
    args = parser.parse_args(argv)
    if args.dry:
        args.msi_steps, args.steps, args.repeats = 1, 2, 1
    torch.manual_seed(0)
    s = Setup(args)
    rows = []
    chosen = args.only or [name for name in LEVERS if name != "bf16"]
    if "msi" in chosen:
        rows.append(msi_encodings(s, args))  # its key-E conditions the other levers
    else:
        s.key_e = s.uc_key_e()
    for name in chosen:
        if name != "msi":
            rows.append(LEVERS[name](s, args))
            print(rows[-1], file=sys.stderr, flush=True)
    dry = "DRY RUN (nothing measured): " if args.dry else ""
    print(f"{dry}Levers on one {args.size} px photo (astronaut), test-size SD1.5 UNet with the real-size VAE and "
          f"CLIP ViT-L/14 (random weights), ArcFace-shaped test recogniser, CPU ({torch.get_num_threads()} threads), "
          "fp32 unless said. Each lever ran right after its baseline, on the same inputs, in this one process.\n")
    print("| lever | baseline s | lever s | baseline / lever | result |\n|---|---|---|---|---|")
    for label, base_t, lever_t, result in rows:
        print(f"| {label} | {base_t:.2f} | {lever_t:.2f} | {base_t / lever_t:.2f}x | {result} |")


if __name__ == "__main__":
    main()
