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
from diffpriv_eval.verifiers import DlibRecognizer, installed_recognizers, load_pack_recognizer
from diffpriv_eval.report import write_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffpriv eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--originals", type=Path, nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--protected", type=Path, help="folder of protected candidates (or a diffpriv protect --out folder)")
    parser.add_argument("--recovered", type=Path, help="folder of recovered images (or a diffpriv recover --out folder)")
    parser.add_argument("--out", type=Path, required=True, help="report folder (created)")
    parser.add_argument("--models", type=Path, metavar="DIR",
                        help="ComfyUI models folder holding the SFace and FaceNet-CASIA files the setup installs "
                             "(default: the embedded ComfyUI's)")
    parser.add_argument("--guided-by", metavar="NAME",
                        help="the recogniser that guided the protection (white-box); the others measure transfer. "
                             "Default: SFace, the shipped workflows' recogniser (none for --baseline)")
    parser.add_argument("--arcface", type=Path, metavar="FILE",
                        help="also measure with this ArcFace / IR-SE50 file (the paper's L2 threshold 0.8)")
    parser.add_argument("--facenet", type=Path, metavar="FILE",
                        help="also measure with this FaceNet InceptionResnetV1 file (the paper's L2 threshold 1.1)")
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
    """dlib, SFace and FaceNet-CASIA (three independent real recognisers), plus any file given."""
    models = args.models
    if models is None:
        from diffpriv_client.embedded import find_comfyui

        models = find_comfyui() / "models"
    given = [(name, path) for name, path in (("ArcFace", args.arcface), ("FaceNet", args.facenet)) if path]
    extra = [load_pack_recognizer(path, name) for name, path in given]  # a wrong path fails before the rest
    return [DlibRecognizer(), *installed_recognizers(models), *extra]


def guided_by(args: argparse.Namespace, recognizers: list) -> str | None:
    if args.guided_by is None:
        return None if args.baseline else "SFace"
    names = [r.name for r in recognizers]
    if args.guided_by not in names + ["none"]:
        raise ValueError(f"--guided-by {args.guided_by}: not one of the recognisers measured ({', '.join(names)})")
    return None if args.guided_by == "none" else args.guided_by


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.baseline) == bool(args.protected):
        parser.error("give exactly one of --protected DIR and --baseline blur|mosaic")
    try:
        cases = load_cases(args.originals, args.protected, args.recovered)
        if not cases:
            raise FileNotFoundError("no original images found")
        recognizers = _recognizers(args)  # after the cheap checks: loading them takes seconds
        white_box = guided_by(args, recognizers)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # missing or unreadable inputs
        print(exc, file=sys.stderr)
        return 2
    title = "Diff-Privacy evaluation"
    if args.baseline:
        protect_with_baseline(cases, args.baseline, args.strength, args.out / "protected")
        title = f"Baseline evaluation: {args.baseline}, strength {args.strength:g} px"
    try:
        evaluation = evaluate(cases, recognizers, [MtcnnDetector(), DlibDetector()], white_box)
    except DlibUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(write_report(evaluation, cases, args.out, title))
    return 0
