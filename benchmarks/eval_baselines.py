"""Calibration of the evaluation metrics with blur and mosaic on real photos.

Applies each baseline at several strengths to the largest face of the sample photos that
ship in installed packages (diffpriv_eval.sample_photos), and prints, per setting,
the dlib protection success rate and identity distance, the detection rates of MTCNN and
dlib, their landmark shift, and the PSNR of the protected photo. A metric that does not
move with strength here would not mean anything on Diff-Privacy's output either.

A second table puts identity guidance without diffusion (guided by SFace) beside blur and
mosaic at the command's default strengths, per verifier (dlib, SFace, FaceNet-CASIA, as
`diffpriv eval --baseline` reports them), when the setup installed SFace and FaceNet-CASIA.

    .venv/bin/python benchmarks/eval_baselines.py [--blur 1 2 4 8 16] [--mosaic 2 4 8 16 32]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffpriv_eval import metrics  # noqa: E402
from diffpriv_eval.baselines import BASELINES, GUIDANCE  # noqa: E402
from diffpriv_eval.cli import DEFAULT_STRENGTH, baseline  # noqa: E402
from diffpriv_eval.detectors import DlibDetector, MtcnnDetector  # noqa: E402
from diffpriv_eval.evaluate import evaluate  # noqa: E402
from diffpriv_eval.images import Case  # noqa: E402
from diffpriv_eval.verifiers import DlibRecognizer, installed_recognizers  # noqa: E402
from diffpriv_eval.sample_photos import sample_photos  # noqa: E402


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def row(name: str, strength: float, photos: dict[str, np.ndarray], boxes: dict[str, tuple]) -> str:
    cases = [Case(stem, photo, [BASELINES[name](photo, strength, boxes[stem])]) for stem, photo in photos.items()]
    results = evaluate(cases, [DlibRecognizer()], [MtcnnDetector(), DlibDetector()]).results
    protection = results["protection"]["dlib"]
    utility = {d: results["utility"][d]["protected"] for d in ("MTCNN", "dlib")}
    psnr = np.mean([metrics.psnr(c.original, c.protected[0]) for c in cases])
    return (f"| {name} | {strength:g} | {_fmt(protection['success_rate'])} "
            f"| {_fmt(protection['mean_distance_to_original'])} | {_fmt(utility['MTCNN']['detection_rate'])} "
            f"| {_fmt(utility['dlib']['detection_rate'])} | {_fmt(utility['MTCNN']['landmark_distance'])} "
            f"| {_fmt(utility['dlib']['landmark_distance'])} | {psnr:.1f} |")


def verifier_rows(photos: dict[str, np.ndarray], faces: dict, recognizers: list) -> list[str]:
    """Blur, mosaic and identity guidance at their default strengths, per verifier."""
    rows = []
    for name in (*BASELINES, GUIDANCE):
        guided_by = "SFace" if name == GUIDANCE else None
        protect, title = baseline(name, DEFAULT_STRENGTH[name], recognizers, guided_by)
        cases = [Case(stem, photo, [protect(photo, faces[stem])]) for stem, photo in photos.items()]
        protection = evaluate(cases, recognizers, [], guided_by).results["protection"]
        psnr = np.mean([metrics.psnr(c.original, c.protected[0]) for c in cases])
        cells = [f"{_fmt(r['success_rate'])} / {_fmt(r['mean_distance_to_original'])} ({r['role']})"
                 for r in protection.values()]
        rows.append(f"| {title} | " + " | ".join(cells) + f" | {psnr:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blur", type=float, nargs="*", default=[1, 2, 4, 8, 16], help="Gaussian sigmas, px")
    parser.add_argument("--mosaic", type=float, nargs="*", default=[2, 4, 8, 16, 32], help="block sizes, px")
    args = parser.parse_args()
    photos = sample_photos()
    detector = MtcnnDetector()
    faces = {stem: detector.detect(photo)[0] for stem, photo in photos.items()}
    boxes = {stem: face.box for stem, face in faces.items()}
    print(f"Baselines on the largest face of {len(photos)} sample photos ({', '.join(photos)}); "
          "identity by dlib (threshold 0.6), distances in pixels.\n")
    print("| baseline | strength px | dlib protection success | dlib distance | MTCNN detected | dlib detected "
          "| MTCNN landmark shift | dlib landmark shift | PSNR dB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, strengths in (("blur", args.blur), ("mosaic", args.mosaic)):
        for strength in strengths:
            print(row(name, strength, photos, boxes), flush=True)
    try:
        from diffpriv_client.embedded import find_comfyui

        recognizers = [DlibRecognizer(), *installed_recognizers(find_comfyui() / "models")]
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"\nPer verifier: not measured ({exc})")
        return
    print("\nPer verifier: protection success / mean distance to the original (role), at the default "
          "strengths of `diffpriv eval --baseline`; thresholds dlib 0.6, SFace 1.129, FaceNet-CASIA 1.1.\n")
    print("| baseline | " + " | ".join(r.name for r in recognizers) + " | PSNR dB |")
    print("|---|" + "---|" * (len(recognizers) + 1))
    for line in verifier_rows(photos, faces, recognizers):
        print(line, flush=True)


if __name__ == "__main__":
    main()
