"""Face detection recall and false positives on crowded pictures made from real photos.

The pictures (diffpriv_eval/crowd.py): crowds of faces of 12 to 200 px pasted onto real
photos and textures (the astronaut, the cameraman, the six people of insightface's t1.jpg,
Tom Hanks, the 100 LFW faces of scikit-image; some mirrored, some rotated by 10-30 degrees;
with LFW's non-face patches as distractors), and t1.jpg itself shrunk so its faces are 12
to 145 px. Each detector runs once per picture, down to its lowest score and 12 px
faces; every setting of the table is read from those candidates:

- recall by face size (the longer side of the true box), and overall for faces of 16 px
  and more (the size the workflows promise); min_size is compared with the longer side
  of the detected box (a detector draws a 16 px face's box a little smaller or larger);
- false positives per picture (detections that are no face), and the candidates each
  setting leaves out as "possible faces";
- the detector's time per megapixel (one run, this machine: compare the two, not absolutes).

    .venv/bin/python benchmarks/face_recall.py [--pictures 8] [--centerface PATH] [--dry]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffpriv_core.faces.detect import CENTERFACE, MTCNN, candidates  # noqa: E402
from diffpriv_core.faces.wheel_models import CENTERFACE as CENTERFACE_FILE  # noqa: E402
from diffpriv_eval.crowd import crowd, group_at_scale, match  # noqa: E402

SIZES = [12, 13, 14, 15, 16, 17, 18, 20, 22, 24, 28, 32, 36, 40, 48, 56, 64, 80, 96, 128, 160, 200]
GROUP_SCALES = (1.0, 0.5, 1 / 3, 0.25, 0.2, 1 / 6, 1 / 8, 1 / 10)
BINS = ((12, 16), (16, 20), (20, 24), (24, 32), (32, 48), (48, 96), (96, 1000))
SCORES = {MTCNN: (0.5, 0.6, 0.7, 0.8, 0.9, 0.95), CENTERFACE: (0.2, 0.3, 0.4, 0.5, 0.6)}
MIN_SIZES = (12, 16)
BEFORE = (MTCNN, 0.9, 40)  # the shipped workflows' Face Detect before this benchmark


def pictures(count: int):
    """The crowds (one face per size in SIZES each, plus a few of the smallest again) and the shrunk group."""
    made = [crowd(SIZES + [12, 14, 16, 20], seed=seed) for seed in range(count)]
    return made + [group_at_scale(s) for s in GROUP_SCALES]


def installed_centerface() -> Path:
    from diffpriv_client.embedded import find_comfyui

    return find_comfyui() / "models" / CENTERFACE_FILE.folder / CENTERFACE_FILE.file


def run(detector, photos) -> tuple[list, float]:
    """Each picture's candidates, and the seconds per megapixel."""
    found, seconds, pixels = [], 0.0, 0
    for picture in photos:
        image = torch.from_numpy(picture.picture.copy()).float() / 255
        start = time.perf_counter()
        found.append(candidates(image, detector))
        seconds += time.perf_counter() - start
        pixels += picture.picture.shape[0] * picture.picture.shape[1]
    return found, seconds / (pixels / 1e6)


def evaluate(photos, found, min_score: float, min_size: float) -> dict:
    """Recall per size bin and overall, false positives and possible faces, at one setting."""
    hits = {b: [0, 0] for b in BINS}
    false_positives = possible = 0
    for picture, faces in zip(photos, found):
        kept = [f for f in faces if f.score >= min_score and f.size >= min_size]
        possible += len(faces) - len(kept)
        recalled, true = match([f.box for f in kept], [f.score for f in kept], picture.faces)
        false_positives += true.count(False)
        for face, hit in zip(picture.faces, recalled):
            for low, high in BINS:
                if low <= face.size < high:
                    hits[(low, high)][0] += hit
                    hits[(low, high)][1] += 1
    total = [sum(hits[b][k] for b in BINS if b[0] >= 16) for k in (0, 1)]
    return {"bins": hits, "recall16": total[0] / max(total[1], 1), "fp": false_positives / len(photos),
            "possible": possible / len(photos)}


def table(photos, results: dict) -> list[str]:
    header = ["detector", "min_score", "min_size", *(f"{lo}-{hi - 1} px" if hi < 1000 else f"{lo}+ px"
                                                    for lo, hi in BINS),
              "recall >= 16 px", "false positives / picture", "possible / picture"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    settings = [(name, score, size) for name in results for score in SCORES[name] for size in MIN_SIZES]
    for name, score, size in settings + [BEFORE]:
        r = evaluate(photos, results[name][0], score, size)
        cells = [f"{h / n:.2f}" if n else "-" for h, n in r["bins"].values()]
        label = f"{name} (before)" if (name, score, size) == BEFORE else name
        lines.append(f"| {label} | {score} | {size} | " + " | ".join(cells) +
                     f" | {r['recall16']:.3f} | {r['fp']:.2f} | {r['possible']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pictures", type=int, default=12, help="crowd pictures (each holds 26 faces)")
    parser.add_argument("--centerface", type=Path, default=None, help="centerface.onnx (default: the installed one)")
    parser.add_argument("--dry", action="store_true", help="two crowds: checks the script")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    photos = pictures(2 if args.dry else args.pictures)
    centerface = args.centerface or installed_centerface()
    results = {MTCNN: run(MTCNN, photos), CENTERFACE: run(centerface, photos)}
    faces = sum(len(p.faces) for p in photos)
    counts = {f"{lo}-{hi - 1}" if hi < 1000 else f"{lo}+": sum(lo <= f.size < hi for p in photos for f in p.faces)
              for lo, hi in BINS}
    print(f"{len(photos)} pictures ({len(photos) - len(GROUP_SCALES)} crowds, t1.jpg at {len(GROUP_SCALES)} scales), "
          f"{faces} faces; per size (px): " + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ".")
    print("Recall per face size; a detection is a face when its centre lies within half the face's size of the "
          "true centre and its size within a factor 2.")
    print()
    print("\n".join(table(photos, results)))
    print()
    print(f"The last row is the shipped workflows' setting before (min_size {BEFORE[2]}, min_score {BEFORE[1]}), "
          "read from the same candidates.")
    print("Detector time per megapixel (candidates down to 12 px, one run): " + ", ".join(
        f"{name} {speed:.2f} s" for name, (_found, speed) in results.items()) + ".")


if __name__ == "__main__":
    main()
