"""UNet calls made one after another per photo, against its number of faces.

    python benchmarks/calls_per_photo.py [--faces 1 6 24] [--dry]

On a GPU, SD1.5's UNet on a few 64 x 64 latents takes about as long as on one, so a photo's
time follows the UNet calls made in sequence, not its passes. This runs the core's stages
for photos of 1, 6 and 24 faces on the toy host (diffpriv_testmodels/toy_host.py), every
UNet call behind the pass counter (diffpriv_core/passes.py), and prints calls per photo
(a forward call and the backward through it count as one call; early stopping's probes
count):

- ours: every face of the photo in one batch: MSI's default preset for all faces together
  (``train_msi_batch``), Stage II's anonymize preset (4 candidates a face) for the faces
  together, key-I for all faces in one call a step (the default inversion). Measured with
  no batch limit and with the nodes' default batch sizes (MSI 16 latents a call, the Guided
  DDIM Sampler 16, DDIM Inversion Key 16).
- one face at a time (the pack before faces were batched: MSI's fast preset, fixed-point
  key-I with 4 refinements): one face measured, times the faces.
- paper: one face at a time, MSI's faithful preset (6100 steps, batch 1: 6100 calls, no
  early stopping), plain DDIM key-I; Stage II and key-I measured for one face, times the
  faces.

The counts do not depend on the networks, so they hold for SD1.5 on any hardware; early
stopping is the only data-dependent part, and it runs for real here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MSI_BATCH, SAMPLER_BATCH, KEY_I_BATCH = 16, 16, 16  # the nodes' defaults (nodes/msi.py, protect.py, recovery.py)


def faces(n: int):
    import torch

    return torch.rand(n, 64, 64, 3, generator=torch.Generator().manual_seed(n))


def unet_calls(run) -> int:
    """UNet forward calls ``run(counter)`` makes (each backward follows one of them)."""
    from diffpriv_core.passes import UNET_FORWARD, PassCounter

    counter = PassCounter()
    run(counter)
    return counter.calls[UNET_FORWARD]


def msi_calls(n: int, preset_name: str, batch: int, steps: int | None) -> tuple[int, list]:
    from diffpriv_core.msi_train import preset, train_msi_batch
    from diffpriv_testmodels.toy_host import SHAPE, toy_host

    host, _ = toy_host(positional=True)
    config = preset(preset_name, steps=steps, shape=SHAPE, micro_batch=batch)
    keys = []
    calls = unet_calls(lambda c: keys.extend(r.key for r in train_msi_batch(faces(n), c.msi_host(host), config)))
    return calls, keys


def stage_ii_calls(n: int, key_e, batch: int) -> int:
    import torch

    from diffpriv_core import guided
    from diffpriv_core.recovery import conditioned_eps
    from diffpriv_core.schedule import ddim_grid
    from diffpriv_core.tasks import task
    from diffpriv_testmodels.toy_host import toy_host

    _host, nets = toy_host(positional=True)
    preset = task("anonymize")
    z0 = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return unet_calls(lambda c: guided.protect(conditioned_eps(c.eps(nets.latent_eps), [key_e], preset.tau), z0,
                                               ddim_grid(preset.steps), preset.strength, preset.samples, seed=0,
                                               batch_size=batch))


def key_i_calls(n: int, keys_e: list, batch: int = 0, **mode) -> int:
    import torch

    from diffpriv_core.recovery import make_key_i
    from diffpriv_core.tasks import task
    from diffpriv_testmodels.toy_host import toy_host

    _host, nets = toy_host(positional=True)
    z0 = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return unet_calls(lambda c: make_key_i(c.eps(nets.latent_eps), z0, keys_e[:n], task("anonymize").key_i.steps,
                                           batch_size=batch, **mode))


def main() -> None:
    from diffpriv_core.msi_train import DEFAULT_PRESET, PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, nargs="+", default=[1, 6, 24])
    parser.add_argument("--dry", action="store_true", help="MSI capped at 2 steps: checks, measures nothing")
    args = parser.parse_args()
    steps = 2 if args.dry else None
    rows = []
    one_msi, one_keys = msi_calls(1, "fast", 0, steps)
    one_face = one_msi + stage_ii_calls(1, one_keys[0], 0) + key_i_calls(1, one_keys, mode="fixed_point", refine=4)
    paper_face = (PRESETS["faithful"].steps if steps is None else steps) + stage_ii_calls(1, one_keys[0], 0) \
        + key_i_calls(1, one_keys, mode="ddim")
    for n in args.faces:
        print(f"{n} faces ...", file=sys.stderr, flush=True)
        measured = {}
        for label, msi_batch, sampler_batch, key_i_batch in (("no limit", 0, 0, 0),
                                                             ("default batch sizes", MSI_BATCH, SAMPLER_BATCH, KEY_I_BATCH)):
            msi, keys = msi_calls(n, DEFAULT_PRESET, msi_batch, steps)
            measured[label] = (msi, stage_ii_calls(n, keys[0], sampler_batch), key_i_calls(n, keys, key_i_batch))
        rows.append((n, measured, n * one_face, n * paper_face))
    dry = "DRY RUN (nothing measured): " if args.dry else ""
    print(f"{dry}UNet calls made one after another per photo (a forward call and its backward count as one), "
          f"on the toy host: MSI, Stage II (anonymize: 4 candidates a face) and key-I. Ours: every face of the "
          f"photo in one batch, MSI's `{DEFAULT_PRESET}` preset and the default key-I. One face at a time: MSI's "
          f"`fast` preset and fixed-point key-I (4 refinements), as before faces were batched.\n")
    print("| faces | ours, no batch limit (MSI + Stage II + key-I) | ours, default batch sizes | one face at a time | "
          "paper | ours per face (no limit) |")
    print("|---|---|---|---|---|---|")
    for n, measured, one_at_a_time, paper in rows:
        cells = [f"{sum(m)} ({' + '.join(map(str, m))})" for m in measured.values()]
        print(f"| {n} | {cells[0]} | {cells[1]} | {one_at_a_time} | {paper} | {sum(measured['no limit']) / n:.0f} |")
    first = rows[0]
    for n, measured, _one, _paper in rows[1:]:
        print(f"\n{n} faces against {first[0]}: {sum(measured['no limit']) / sum(first[1]['no limit']):.2f}x the "
              f"calls with no batch limit, {sum(measured['default batch sizes']) / sum(first[1]['default batch sizes']):.2f}x "
              "with the default batch sizes.")


if __name__ == "__main__":
    main()
