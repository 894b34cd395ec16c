"""Network passes per protected face: what each setting costs, whatever the hardware.

    python benchmarks/passes_per_face.py [--msi-steps N]

Runs the core's chain for one face on toy networks (diffpriv_testmodels/toy_host.py), every
host network behind the pass counter (diffpriv_core/passes.py): the photo's VAE encode, MSI
(key-E), the reference embedding, Stage II, the VAE decode of the candidates, key-I, and
recovery (counted apart: it is paid when a face is given back, not when it is protected).
The counts do not depend on the networks' size: early stopping is the only data-dependent
part, and it runs for real here.

Settings: the paper's (MSI's reference 6100 steps with the photo encoded at every step, as
the reference code does, the whole frame decoded at every guided step, plain DDIM
inversion) and this pack's defaults (MSI's parallel preset, the face crop decoded, BDIA
inversion), for both tasks.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LATENT = 64  # a 512 px photo
BOX = (192.0, 160.0, 320.0, 288.0)  # the face, about a quarter of the photo's width
CROP_MARGIN = 0.5  # the Identity Energy Guidance node's face-crop margin


@dataclass(frozen=True)
class Setting:
    name: str
    task: str
    msi: str  # MSI preset
    encode_every_step: bool  # MSI encodes the photo at every step (the reference code), else once per flip
    crop: bool  # decode the face crop (else the whole frame) at every guided step
    inversion: tuple[str, int]  # key-I mode, refinements


SETTINGS = [
    Setting("paper, anonymize", "anonymize", "faithful", True, False, ("ddim", 0)),
    Setting("ours, anonymize", "anonymize", "parallel", False, True, ("bdia", 0)),
    Setting("paper, hide", "hide", "faithful", True, False, ("ddim", 0)),
    Setting("ours, hide", "hide", "parallel", False, True, ("bdia", 0)),
]


class Chain:
    """The toy networks behind one pass counter, and the core's stages of one face on them."""

    def __init__(self):
        import torch

        from diffpriv_core.passes import PassCounter
        from diffpriv_testmodels.toy_host import ToyDecoder, ToyFaceNet, toy_host

        torch.manual_seed(0)
        self.counter = PassCounter()
        host, nets = toy_host(positional=True)
        c = self.counter
        self.msi_host = c.msi_host(host)
        self.photo = torch.rand(1, LATENT * 8, LATENT * 8, 3, generator=torch.Generator().manual_seed(0))
        self.z0 = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(1))
        self.decode = c.decoder(ToyDecoder().requires_grad_(False))
        self.embedder = c.embedder(ToyFaceNet().requires_grad_(False))
        self.eps = c.eps(nets.latent_eps)

    def counted(self, stage) -> tuple[dict, object]:
        """(the passes ``stage()`` made, its result)."""
        self.counter.clear()
        result = stage()
        return self.counter.as_dict(), result

    def msi(self, name: str, encode_every_step: bool, steps: int | None):
        from diffpriv_core.msi_train import preset, train_msi
        from diffpriv_testmodels.toy_host import SHAPE

        config = preset(name, steps=steps, shape=SHAPE, reuse_encodings=not encode_every_step)
        return train_msi(self.photo, self.msi_host, config).key

    def protect(self, task_name: str, crop: bool, key_e):
        """Reference embedding, Stage II with the similarity the sampler node reports, and the
        VAE decode of the candidates."""
        import torch

        from diffpriv_core import guided
        from diffpriv_core.faces.detect import Face
        from diffpriv_core.recovery import conditioned_eps
        from diffpriv_core.schedule import ddim_grid
        from diffpriv_core.tasks import task as task_preset

        x1, y1, x2, y2 = BOX
        eyes, mouth = y1 + 0.4 * (y2 - y1), y1 + 0.75 * (y2 - y1)
        landmarks = ((x1 + 0.3 * (x2 - x1), eyes), (x1 + 0.7 * (x2 - x1), eyes), ((x1 + x2) / 2, (eyes + mouth) / 2),
                     (x1 + 0.35 * (x2 - x1), mouth), (x1 + 0.65 * (x2 - x1), mouth))
        target = guided.face_target(self.embedder, self.photo[0], Face(BOX, landmarks, 1.0))
        task = task_preset(task_name)
        guidance = guided.IdentityGuidance(self.embedder, task_name, task.lambdas, (target,),
                                           crop_margin=CROP_MARGIN if crop else None)
        protected = guided.protect(conditioned_eps(self.eps, [key_e], task.tau), self.z0, ddim_grid(task.steps),
                                   task.strength, task.samples, seed=0, guidance=guidance, decoder=self.decode)
        guided.achieved_similarity(guidance, self.decode, protected)  # the sampler node's report
        with torch.no_grad():
            return self.decode(protected)

    def key_i(self, task_name: str, inversion: tuple[str, int], key_e):
        from diffpriv_core.recovery import make_key_i
        from diffpriv_core.tasks import task

        mode, refine = inversion  # on the task's key-I grid (the workflows')
        return make_key_i(self.eps, self.z0, [key_e], task(task_name).key_i.steps, mode=mode, refine=refine)

    def recover(self, keys_i, key_e):
        import torch

        from diffpriv_core.recovery import recover

        with torch.no_grad():
            return self.decode(recover(self.eps, keys_i, [key_e]))


def add(*counts: dict) -> dict:
    return {name: sum(c[name] for c in counts) for name in counts[0]}


def count_all(msi_steps: int | None) -> list[tuple[Setting, dict, dict, list[str]]]:
    """Per setting: (protection counts, recovery counts, sizes decoded at guided steps). Each
    stage runs once per distinct configuration (MSI once per preset)."""
    chain = Chain()
    encode = dict(chain.counter.as_dict(), vae_encode=1)  # the workflow's VAE Encode of the photo
    msi = {}
    for name, every_step in dict.fromkeys((s.msi, s.encode_every_step) for s in SETTINGS):
        print(f"MSI {name} ...", file=sys.stderr, flush=True)
        msi[name, every_step] = chain.counted(lambda: chain.msi(name, every_step, msi_steps))
    rows = []
    for setting in SETTINGS:
        print(f"{setting.name} ...", file=sys.stderr, flush=True)
        msi_counts, key_e = msi[setting.msi, setting.encode_every_step]
        stage_ii, _ = chain.counted(lambda: chain.protect(setting.task, setting.crop, key_e))
        sizes = chain.counter.decoded()
        key_i_counts, keys_i = chain.counted(lambda: chain.key_i(setting.task, setting.inversion, key_e))
        recovery, _ = chain.counted(lambda: chain.recover(keys_i, key_e))
        rows.append((setting, add(encode, msi_counts, stage_ii, key_i_counts), recovery, sizes))
    return rows


def main() -> None:
    from diffpriv_core.passes import TITLES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--msi-steps", type=int, default=None, help="cap MSI's steps (default: each preset's)")
    parser.add_argument("--dry", action="store_true", help="MSI capped at 2 steps: checks, measures nothing")
    args = parser.parse_args()
    if args.dry:
        args.msi_steps = 2
    rows = count_all(args.msi_steps)
    capped = f", MSI capped at {args.msi_steps} steps" if args.msi_steps else ""
    dry = "DRY RUN (nothing measured): " if args.dry else ""
    print(f"{dry}Network passes per protected face, for one face of a 512 px photo (a 128 px face), counted per "
          f"image where the core calls each network{capped}. Paper: MSI's reference preset encoding the photo at every "
          "step (as its code does), the whole frame decoded at every guided step, plain DDIM key-I. Ours: MSI's parallel "
          "preset, the face crop decoded, BDIA key-I. Both include the photo's VAE encode, the "
          "reference embedding and the candidates' decode.\n")
    print("| setting | " + " | ".join(TITLES.values()) + " | decoded at guided steps |")
    print("|---|" + "---|" * (len(TITLES) + 1))
    for setting, protection, _, sizes in rows:
        guided_sizes = [s for s in sizes if s != f"{LATENT * 8}x{LATENT * 8}"] or [f"{LATENT * 8}x{LATENT * 8}"]
        print(f"| {setting.name} | " + " | ".join(str(protection[key]) for key in TITLES)
              + f" | {', '.join(guided_sizes)} ({'face crop' if setting.crop else 'whole frame'}) |")
    print("\nRecovering one face (key-I + key-E, then its VAE decode):\n")
    print("| setting | UNet fwd | VAE dec fwd |\n|---|---|---|")
    for setting, _, recovery, _ in rows:
        print(f"| {setting.name} | {recovery['unet_forward']} | {recovery['vae_decode_forward']} |")
    ours, paper = rows[1][1], rows[0][1]
    print(f"\nAnonymize, ours against the paper: {paper['unet_forward'] + paper['unet_backward']} UNet passes "
          f"(forward + backward) against {ours['unet_forward'] + ours['unet_backward']}: "
          f"{(paper['unet_forward'] + paper['unet_backward']) / (ours['unet_forward'] + ours['unet_backward']):.1f}x "
          "fewer.")


if __name__ == "__main__":
    main()
