"""Command line: evaluate protected/recovered sets, or a blur/mosaic baseline.

    diffpriv eval --originals DIR_OR_FILES... --protected DIR [--recovered DIR] --out REPORT_DIR
    diffpriv eval --originals DIR --baseline blur --strength 8 --out REPORT_DIR

Files pair by name stem: originals/<stem>.png with protected/<stem>.png or
protected/<stem>_00001.png, <stem>_00002.png, ... and recovered/<stem>.png. The --out
folders of `diffpriv protect` and `diffpriv recover` pair as they are, by their summary.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffpriv_eval.baselines import BASELINES
from diffpriv_eval.detectors import DlibDetector, MtcnnDetector
from diffpriv_eval.dlib_models import DlibUnavailableError
from diffpriv_eval.evaluate import evaluate
from diffpriv_eval.images import Case, load_cases, save_rgb
from diffpriv_eval.recognizers import DlibRecognizer, load_paper_recognizer
from diffpriv_eval.report import write_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffpriv eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--originals", type=Path, nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--protected", type=Path, help="folder of protected candidates (or a diffpriv protect --out folder)")
    parser.add_argument("--recovered", type=Path, help="folder of recovered images (or a diffpriv recover --out folder)")
    parser.add_argument("--out", type=Path, required=True, help="report folder (created)")
    parser.add_argument("--arcface", type=Path, metavar="FILE",
                        help="also measure with this ArcFace / IR-SE50 file (threshold 0.8)")
    parser.add_argument("--facenet", type=Path, metavar="FILE",
                        help="also measure with this FaceNet InceptionResnetV1 file (threshold 1.1)")
    parser.add_argument("--baseline", choices=sorted(BASELINES),
                        help="make the protected set from the originals with this obfuscation")
    parser.add_argument("--strength", type=float, default=8.0,
                        help="baseline strength in pixels: blur sigma or mosaic block size (default 8)")
    return parser


def protect_with_baseline(cases: list[Case], name: str, strength: float, folder: Path) -> None:
    """Fills each case's protected set with the baseline applied to its largest face
    (the whole image when MTCNN finds none), and saves the images in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    detector = MtcnnDetector()
    for case in cases:
        faces = detector.detect(case.original)
        protected = BASELINES[name](case.original, strength, faces[0].box if faces else None)
        save_rgb(protected, folder / f"{case.stem}.png")
        case.protected = [protected]


def _recognizers(args: argparse.Namespace) -> list:
    extra = [(kind, path) for kind, path in (("ArcFace", args.arcface), ("FaceNet", args.facenet)) if path]
    return [DlibRecognizer()] + [load_paper_recognizer(path, kind) for kind, path in extra]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.baseline) == bool(args.protected):
        parser.error("give exactly one of --protected DIR and --baseline blur|mosaic")
    try:
        recognizers = _recognizers(args)
        cases = load_cases(args.originals, args.protected, args.recovered)
    except (FileNotFoundError, ValueError) as exc:  # missing or unreadable inputs
        print(exc, file=sys.stderr)
        return 2
    if not cases:
        print("no original images found", file=sys.stderr)
        return 2
    title = "Diff-Privacy evaluation"
    if args.baseline:
        protect_with_baseline(cases, args.baseline, args.strength, args.out / "protected")
        title = f"Baseline evaluation: {args.baseline}, strength {args.strength:g} px"
    try:
        evaluation = evaluate(cases, recognizers, [MtcnnDetector(), DlibDetector()])
    except DlibUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(write_report(evaluation, cases, args.out, title))
    return 0
