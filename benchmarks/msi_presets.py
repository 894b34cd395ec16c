"""MSI presets compared: held-out loss against training wall-clock, on CPU, on the tiny
random diffusers models the unit tests use (diffpriv_testmodels/tiny_diffusers.py).

    python benchmarks/msi_presets.py [--faithful-steps 300] [--fast-steps 60]

Each preset trains in its own process (so its peak resident memory is its own); the
held-out loss (Eq. 7 on a fixed sample, see msi_train.held_out_loss) is measured every few
steps with the clock stopped. Printed, as a markdown section for benchmarks/run_all.py: the
curves, each preset's peak memory, and the time-to-equal-loss ratio: the faithful run's
training time divided by the time the fast run needs to reach the faithful run's final
held-out loss. Random weights: the loss moves little, but the evaluation is deterministic,
so the comparison is exact for these models.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = 12  # held-out evaluations per run


def run_preset(name: str, steps: int, seed: int) -> dict:
    """Train one preset here; return its curve [(train_seconds, held_out_loss)] and peak RSS."""
    sys.path.insert(0, str(ROOT))
    import torch

    from diffpriv_core.msi_train import held_out_loss, preset, train_msi
    from diffpriv_testmodels.tiny_diffusers import MSI_SHAPE, tiny_components, tiny_host

    torch.set_num_threads(1)  # the comparison, not the machine's other load, should decide
    host = tiny_host(tiny_components())
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(seed))
    every = max(1, steps // CHECKPOINTS)
    clock = {"train": 0.0, "since": time.perf_counter()}
    curve = []

    def probe(step, msi):
        if step % every and step != steps:
            return
        clock["train"] += time.perf_counter() - clock["since"]
        curve.append((clock["train"], held_out_loss(msi, image, host)))
        clock["since"] = time.perf_counter()

    config = preset(name, steps=steps, seed=seed, shape=MSI_SHAPE)
    untrained = train_msi(image, host, preset(name, steps=0, seed=seed, shape=MSI_SHAPE)).msi
    start = held_out_loss(untrained, image, host)
    clock["since"] = time.perf_counter()
    train_msi(image, host, config, probe=probe)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"preset": name, "steps": steps, "start_loss": start, "curve": curve, "peak_rss_mib": peak_mib}


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First time the curve is at or below ``target``, linearly interpolated."""
    prev_t, prev_l = 0.0, float("inf")
    for t, loss in curve:
        if loss <= target:
            if prev_l == float("inf"):
                return t
            return prev_t + (t - prev_t) * (prev_l - target) / (prev_l - loss)
        prev_t, prev_l = t, loss
    return None


def child(name: str, steps: int, seed: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps), "--seed", str(seed)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(faithful: dict, fast: dict) -> None:
    """A markdown section (benchmarks/run_all.py collects them into BENCHMARKS.md)."""
    print("MSI presets on the tiny random diffusers models (64 px image, CPU, one thread each); held-out "
          "Eq. 7 loss against training seconds (evaluation time excluded).\n")
    print("| preset | steps | untrained loss | final loss | training s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for run in (faithful, fast):
        t, loss = run["curve"][-1]
        print(f"| {run['preset']} | {run['steps']} | {run['start_loss']:.6f} | {loss:.6f} | {t:.1f} | "
              f"{run['peak_rss_mib']:.0f} |")
    for run in (faithful, fast):
        points = ", ".join(f"{t:.1f} s: {loss:.6f}" for t, loss in run["curve"])
        print(f"\n{run['preset']} curve: {points}")
    target, faithful_time = faithful["curve"][-1][1], faithful["curve"][-1][0]
    reached = time_to_reach(fast["curve"], target)
    if reached is None:
        print(f"\n**fast did not reach** the faithful final loss {target:.6f} in {fast['curve'][-1][0]:.1f} s.")
    else:
        print(f"\n**Time to equal loss**: fast reaches the faithful run's final loss {target:.6f} after "
              f"{reached:.1f} s, against {faithful_time:.1f} s: **{faithful_time / reached:.1f}x** sooner.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faithful-steps", type=int, default=300)
    parser.add_argument("--fast-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_preset(args.child, args.steps, args.seed)))
        return
    report(child("faithful", args.faithful_steps, args.seed), child("fast", args.fast_steps, args.seed))


if __name__ == "__main__":
    main()
