"""MSI presets compared in UNet passes: held-out Eq. 7 loss against the passes spent.

    python benchmarks/msi_presets.py [--seeds 0 1 ... 19] [--faithful-steps 6100]

Random-weight UNets barely react to their conditioning, so their loss hardly moves and
says nothing about a preset. This runs on the toy host of the unit tests
(diffpriv_testmodels/toy_host.py) with position-aware image features: its noise prediction is
the exact denoiser of a clean latent decoded linearly from the conditioning, so the
conditioning decides everything, and a key-E that reproduces the image is known to exist
(the planted target). Each preset trains in its own process, one thread, on each seed;
every UNet call goes through the pass counter (diffpriv_core/passes.py), so the curves'
x axis is what ran, probe passes of early stopping included. The held-out loss (Eq. 7 on
a fixed sample, msi_train.HeldOut) is measured with its own passes uncounted.

Printed, as a markdown section for benchmarks/run_all.py: each preset's passes and
held-out losses averaged over the seeds, the curves, and the ratio the fast preset must
beat: the faithful preset's UNet passes divided by the passes the fast preset needs to
reach the faithful preset's final held-out loss (both averaged over the seeds); and the
UNet calls made in sequence, where the parallel preset (four timesteps a step in one call)
must reach the fast preset's final loss in fewer calls to be the default.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = 20  # held-out evaluations per run


def run_preset(name: str, steps: int | None, seed: int) -> dict:
    """Train one preset here; its curve [(unet forward passes, held-out loss)] and counts."""
    sys.path.insert(0, str(ROOT))
    import dataclasses

    import torch

    from diffpriv_core.msi_train import held_out, preset, train_msi
    from diffpriv_core.passes import UNET_FORWARD, PassCounter
    from diffpriv_testmodels.toy_host import SHAPE, toy_host

    torch.set_num_threads(1)
    host, _ = toy_host(positional=True)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(seed))
    measure = held_out(image, host)
    counter = PassCounter()
    config = preset(name, steps=steps, seed=seed, shape=SHAPE)
    every = max(1, config.steps // CHECKPOINTS)
    curve = []

    def probe(step, msi):
        if step % every == 0:
            curve.append((counter.counts[UNET_FORWARD], measure(msi)))

    result = train_msi(image, dataclasses.replace(host, eps=counter.eps(host.eps)), config, probe=probe)
    end = (counter.counts[UNET_FORWARD], measure(result.msi))  # the module kept (early stopping keeps the best)
    if curve[-1:] != [end]:
        curve.append(end)
    return {"preset": name, "seed": seed, "steps_run": len(result.losses), "steps": config.steps, "curve": curve,
            "passes": counter.as_dict(), "calls": counter.calls[UNET_FORWARD]}


def child(name: str, steps: int | None, seed: int) -> dict:
    command = [sys.executable, __file__, "--child", name, "--seed", str(seed)]
    if steps is not None:
        command += ["--steps", str(steps)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mean_curve(runs: list[dict]) -> list[tuple[float, float]]:
    """The seeds' curves averaged point by point (a run that stopped early keeps its final
    loss for the points it did not reach)."""
    length = max(len(run["curve"]) for run in runs)
    padded = [run["curve"] + [run["curve"][-1]] * (length - len(run["curve"])) for run in runs]
    return [(sum(p[i][0] for p in padded) / len(runs), sum(p[i][1] for p in padded) / len(runs))
            for i in range(length)]


def passes_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first pass count at which the curve is at or below ``target``, interpolated."""
    prev_x, prev_loss = 0.0, None
    for x, loss in curve:
        if loss <= target:
            if prev_loss is None:
                return x
            return prev_x + (x - prev_x) * (prev_loss - target) / (prev_loss - loss)
        prev_x, prev_loss = x, loss
    return None


def passes_to_stay(curve: list[tuple[float, float]], target: float) -> float | None:
    """The pass count from which the curve stays at or below ``target``, interpolated."""
    above = [i for i, (_, loss) in enumerate(curve) if loss > target]
    if not above:
        return curve[0][0]
    last = above[-1]
    if last == len(curve) - 1:
        return None
    return passes_to_reach(curve[last:], target)


def report(runs: dict[str, list[dict]]) -> None:
    """A markdown section (benchmarks/run_all.py collects them into BENCHMARKS.md)."""
    seeds = [run["seed"] for run in next(iter(runs.values()))]
    print(f"MSI presets on the toy host with a planted target (64 px image, CPU, one thread; seeds "
          f"{', '.join(map(str, seeds))}, averaged); held-out Eq. 7 loss against UNet passes, counted where "
          "the trainer calls the UNet.\n")
    print("| preset | steps run (of) | UNet calls in sequence | UNet forward | UNet backward | final held-out loss |")
    print("|---|---|---|---|---|---|")
    curves = {name: mean_curve(group) for name, group in runs.items()}
    for name, group in runs.items():
        mean = lambda key: sum(r["passes"][key] for r in group) / len(group)  # noqa: E731
        steps = sum(r["steps_run"] for r in group) / len(group)
        calls = sum(r["calls"] for r in group) / len(group)
        print(f"| {name} | {steps:.0f} ({group[0]['steps']}) | {calls:.0f} | {mean('unet_forward'):.0f} | "
              f"{mean('unet_backward'):.0f} | {curves[name][-1][1]:.6f} |")
    for name, curve in curves.items():
        points = ", ".join(f"{x:.0f}: {loss:.5f}" for x, loss in curve)
        print(f"\n{name} curve (UNet forward passes: loss): {points}")
    if "parallel" in runs:
        calls = {name: sum(r["calls"] for r in runs[name]) / len(runs[name]) for name in ("parallel", "fast")}
        verdict = "reaches" if curves["parallel"][-1][1] <= curves["fast"][-1][1] else "does not reach"
        print(f"\n**Calls to equal loss**: the parallel preset {verdict} the fast preset's final held-out loss "
              f"({curves['parallel'][-1][1]:.6f} against {curves['fast'][-1][1]:.6f}) in {calls['parallel']:.0f} "
              f"UNet calls in sequence against {calls['fast']:.0f}: **{calls['fast'] / calls['parallel']:.1f}x** "
              "fewer calls.")
    if "faithful" not in runs:
        return
    target, faithful_passes = curves["faithful"][-1][1], curves["faithful"][-1][0]
    reached, stays = passes_to_reach(curves["fast"], target), passes_to_stay(curves["fast"], target)
    if reached is None or stays is None:
        print(f"\n**fast did not reach** (or did not stay at) the faithful preset's final loss {target:.6f}.")
    else:
        print(f"\n**Passes to equal loss**: fast reaches the faithful preset's final loss {target:.6f} after "
              f"{reached:.0f} UNet passes and stays at or below it from {stays:.0f}, against {faithful_passes:.0f}: "
              f"**{faithful_passes / reached:.1f}x** fewer passes to reach it, **{faithful_passes / stays:.1f}x** "
              "to stay there.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(20)),
                        help="default 0-19: three seeds left presets 10%% apart undecided")
    parser.add_argument("--faithful-steps", type=int, default=None, help="default: the preset's 6100")
    parser.add_argument("--fast-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--without-faithful", action="store_true",
                        help="only the fast and parallel presets (the faithful one takes most of the time)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_preset(args.child, args.steps, args.seed)))
        return
    steps = {"faithful": args.faithful_steps, "fast": args.fast_steps, "parallel": None}
    if args.without_faithful:
        del steps["faithful"]
    report({name: [child(name, steps[name], seed) for seed in args.seeds] for name in steps})


if __name__ == "__main__":
    main()
