"""Command line: evaluate protected/recovered sets, or a baseline (blur, mosaic, identity guidance).

    diffpriv eval --originals DIR_OR_FILES... --protected DIR [--recovered DIR] --out REPORT_DIR
    diffpriv eval --originals DIR --baseline blur --strength 8 --out REPORT_DIR
    diffpriv eval --originals DIR --baseline guidance [--guided-by SFace] --out REPORT_DIR
    diffpriv eval --originals DIR --protected DIR --gallery GALLERY_DIR --out REPORT_DIR
    diffpriv eval --originals DIR --wrong-keys PROTECT_OUT_DIR [--trust-server URL] --out REPORT_DIR

Files pair by name stem: originals/<stem>.png with protected/<stem>.png or
protected/<stem>_00001.png, <stem>_00002.png, ... and recovered/<stem>.png. The --out
folders of `diffpriv protect` and `diffpriv recover` pair as they are, by their summary.json.

--baseline makes the protected set itself: blur or mosaic of each photo's largest face, or
identity guidance without diffusion (the method's identity energy alone, applied to the
photo by the --guided-by recogniser until it reads another person).

Identification accuracy (AVIH's protocol, the paper's Table 3) needs --gallery, laid out as
LFW: one subfolder of several photos per person (gallery/alice/alice_0001.jpg, ...) and
gallery/distractors/ with photos of people outside it, and --protected holding the protected
versions of the gallery's photos:

    diffpriv protect gallery/*/*.jpg --task hide --whole-image --out protected/
    diffpriv eval --gallery gallery/ --protected protected/ --out report/

Each original photo is then a probe against the protected versions of its person's other
photos (Set_s) and everyone else's photos (Set_d); the reference row runs it with Set_s
unprotected. The report adds re-identification, the other direction: the protected photos as
probes against the gallery's originals. Without --originals the gallery's people's photos
are the originals; an original outside the gallery is its person's when named like their
folder (photos/alice.jpg). A copy of a probe's own photo is never its match.

--wrong-keys runs the paper's Fig. 7 on key files (or a diffpriv protect --out folder): each
photo recovered with its own key pair, another photo's key-I, another photo's key-E, the
unconditional embedding as key-E, and both wrong, through ComfyUI (the embedded one, or
--trust-server URL: the keys are opened here, as diffpriv recover opens them) with the
recover workflow's checkpoint; each picture measured as in Table 2.
No key file is written, and `diffpriv recover` still refuses keys that do not belong together.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from diffpriv_eval.baselines import BASELINES, GUIDANCE, identity_guidance
from diffpriv_eval.detectors import DlibDetector, MtcnnDetector
from diffpriv_eval.dlib_models import DlibUnavailableError
from diffpriv_eval import wrong_keys
from diffpriv_eval.evaluate import evaluate, evaluate_wrong_keys
from diffpriv_eval.gallery import load_gallery
from diffpriv_eval.images import Case, load_cases, save_rgb
from diffpriv_eval.verifiers import DlibRecognizer, installed_recognizers, load_pack_recognizer
from diffpriv_eval.report import write_report, write_wrong_key_report

if TYPE_CHECKING:
    from diffpriv_core.faces.detect import Face


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffpriv eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--originals", type=Path, nargs="+",
                        help="image files and/or folders (default with --gallery: the photos of its people)")
    parser.add_argument("--protected", type=Path, help="folder of protected candidates (or a diffpriv protect --out folder)")
    parser.add_argument("--recovered", type=Path, help="folder of recovered images (or a diffpriv recover --out folder)")
    parser.add_argument("--out", type=Path, required=True, help="report folder (created)")
    parser.add_argument("--models", type=Path, metavar="DIR",
                        help="ComfyUI models folder holding the SFace and FaceNet-CASIA files the setup installs "
                             "(default: the embedded ComfyUI's)")
    parser.add_argument("--guided-by", metavar="NAME",
                        help="the recogniser that guided the protection (white-box); the others measure transfer. "
                             "Default: SFace, the shipped workflows' recogniser (none for --baseline blur|mosaic)")
    parser.add_argument("--arcface", type=Path, metavar="FILE",
                        help="also measure with this ArcFace / IR-SE50 file (the paper's L2 threshold 0.8)")
    parser.add_argument("--facenet", type=Path, metavar="FILE",
                        help="also measure with this FaceNet InceptionResnetV1 file (the paper's L2 threshold 1.1)")
    parser.add_argument("--gallery", type=Path, metavar="DIR",
                        help="identification gallery, laid out as LFW: DIR/<person>/ with several photos each "
                             "(names unique across the gallery, e.g. alice_0001.jpg), DIR/distractors/ with other "
                             "people; with --protected holding protected versions of its photos, adds AVIH's "
                             "identification accuracy (Table 3) and re-identification of the protected photos")
    parser.add_argument("--baseline", choices=[*sorted(BASELINES), GUIDANCE],
                        help="make the protected set from the originals: blur, mosaic, or identity guidance "
                             "without diffusion")
    parser.add_argument("--strength", type=float,
                        help="baseline strength: blur sigma or mosaic block size in pixels (default 8); for "
                             "guidance, how far below the guiding recogniser's threshold its cosine is pushed "
                             "(default 0.05)")
    experiment = parser.add_argument_group(
        "the wrong-key experiment (Fig. 7)", "recovers each photo with its own keys and with keys that do not belong "
        "together, through ComfyUI; the pictures and their summary.json go to OUT/wrong_keys/")
    experiment.add_argument("--wrong-keys", type=Path, nargs="+", metavar="KEY_OR_DIR",
                            help="key files, or folders holding them (a diffpriv protect --out folder); at least two "
                                 "photos' keys, three for 'both wrong'")
    experiment.add_argument("--trust-server", action="append", default=[], metavar="URL",
                            help="a running ComfyUI with the pack that you trust with opened keys, as for diffpriv "
                                 "recover (repeatable); default: the embedded one")
    experiment.add_argument("--workflow", type=Path,
                            help="the recover workflow whose checkpoint and VAE recover (default: "
                                 "example_workflows/api/recover.json)")
    experiment.add_argument("--passphrase-env", metavar="VAR",
                            help="name of the environment variable holding the keys' passphrase (or the identity "
                                 "file's); the keys are opened here")
    experiment.add_argument("--identity", type=Path, metavar="FILE",
                            help="the identity file (diffpriv keygen) that opens keys sealed to its recipient")
    experiment.add_argument("--demo-weights", action="store_true",
                            help="run with the random-weight demo models (the keys of diffpriv protect --demo-weights)")
    return parser


DEFAULT_STRENGTH = {"blur": 8.0, "mosaic": 8.0, GUIDANCE: 0.05}
Baseline = Callable[[np.ndarray, "Face | None"], np.ndarray]


def baseline(name: str, strength: float, recognizers: list, white_box: str | None) -> tuple[Baseline, str]:
    """The baseline as (image, its largest face) -> protected image, and its title."""
    if name != GUIDANCE:
        def obfuscate(image: np.ndarray, face: "Face | None") -> np.ndarray:
            return BASELINES[name](image, strength, face.box if face else None)  # no face: the whole image

        return obfuscate, f"{name}, strength {strength:g} px"
    guide = next((r for r in recognizers if r.name == white_box), None)
    if guide is None:
        raise ValueError("--baseline guidance needs a recogniser to guide it (--guided-by NAME)")
    if not hasattr(guide, "model"):
        raise ValueError(f"--guided-by {white_box}: its descriptor is not differentiable, it cannot guide")

    def anonymize(image: np.ndarray, face: "Face | None") -> np.ndarray:
        return image if face is None else identity_guidance(image, face, guide.model, strength)  # nothing to guide

    return anonymize, f"identity guidance without diffusion by {white_box}, margin {strength:g} below its threshold"


def protect_with_baseline(cases: list[Case], protect: Baseline, folder: Path) -> None:
    """Fills each case's protected set with the baseline applied to its largest MTCNN face,
    and saves the images in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    detector = MtcnnDetector()
    for case in cases:
        faces = detector.detect(case.original)
        protected = protect(case.original, faces[0] if faces else None)
        save_rgb(protected, folder / f"{case.stem}.png")
        case.protected = [protected]


def _recognizers(args: argparse.Namespace) -> list:
    """dlib, SFace and FaceNet-CASIA (three independent real recognisers), plus any file given."""
    models = args.models
    if models is None:
        from diffpriv_client.embedded import find_comfyui

        models = find_comfyui() / "models"
    from diffpriv_core.faces.recognizers import ARCFACE_THRESHOLD, FACENET_THRESHOLD

    given = [(name, path, threshold) for name, path, threshold in (("ArcFace", args.arcface, ARCFACE_THRESHOLD),
                                                                   ("FaceNet", args.facenet, FACENET_THRESHOLD)) if path]
    # At the paper's thresholds, as the options say; a wrong path fails before the rest.
    extra = [load_pack_recognizer(path, name, threshold) for name, path, threshold in given]
    return [DlibRecognizer(), *installed_recognizers(models), *extra]


def guided_by(args: argparse.Namespace, recognizers: list) -> str | None:
    if args.guided_by is None:
        return None if args.baseline in BASELINES else "SFace"
    names = [r.name for r in recognizers]
    if args.guided_by not in names + ["none"]:
        raise ValueError(f"--guided-by {args.guided_by}: not one of the recognisers measured ({', '.join(names)})")
    return None if args.guided_by == "none" else args.guided_by


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if sum(map(bool, (args.protected, args.baseline, args.wrong_keys))) != 1:
        parser.error(f"give exactly one of --protected DIR, --baseline {'|'.join([*BASELINES, GUIDANCE])} and "
                     "--wrong-keys KEYS")
    if not args.originals and not args.gallery:
        parser.error("give --originals (or --gallery, whose people's photos are then the originals)")
    if args.wrong_keys:
        if args.recovered or args.gallery:
            parser.error("--wrong-keys measures its own recoveries: leave out --recovered and --gallery")
        return wrong_keys_main(args)
    try:
        gallery = load_gallery(args.gallery, MtcnnDetector()) if args.gallery else None
        cases = load_cases(args.originals or gallery.identity_folders(), args.protected, args.recovered)
        if not cases:
            raise FileNotFoundError("no original images found")
        recognizers = _recognizers(args)  # after the cheap checks: loading them takes seconds
        white_box = guided_by(args, recognizers)
        if args.baseline:
            strength = DEFAULT_STRENGTH[args.baseline] if args.strength is None else args.strength
            protect, title = baseline(args.baseline, strength, recognizers, white_box)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # missing or unreadable inputs
        print(exc, file=sys.stderr)
        return 2
    if args.baseline:
        protect_with_baseline(cases, protect, args.out / "protected")
        title = f"Baseline evaluation: {title}"
    else:
        title = "Diff-Privacy evaluation"
    try:
        evaluation = evaluate(cases, recognizers, [MtcnnDetector(), DlibDetector()], white_box, gallery)
    except DlibUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(write_report(evaluation, cases, args.out, title))
    return 0


def wrong_keys_main(args: argparse.Namespace) -> int:
    """The wrong-key experiment: run every key's variants, measure them, write the report;
    exit status 1 when a key's run failed."""
    from diffpriv_client.cli import UsageError
    from diffpriv_client.preflight import PreflightError

    try:
        originals = load_cases(args.originals, None, None)
        cases, skipped = wrong_keys.key_cases(wrong_keys.key_files(args.wrong_keys), originals)
        recognizers = _recognizers(args)
        failed, not_removed = wrong_keys.run_experiment(args, cases, args.out / wrong_keys.OUTPUT_FOLDER)
    except (FileNotFoundError, ValueError, RuntimeError, UsageError, PreflightError) as exc:
        print(f"diffpriv eval: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffpriv eval: stopped; run the same command again to finish the rest", file=sys.stderr)
        return 130
    notes = [f"key left out {name}: {why}" for name, why in skipped.items()]
    notes += [f"failed {name}: {why.splitlines()[0]}" for name, why in failed.items()]
    if len(cases) < 3:
        notes.append("'both wrong' needs the keys of three photos: not run")
    try:
        evaluation = evaluate_wrong_keys([c.case for c in cases], recognizers, wrong_keys.VARIANTS)
    except DlibUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(write_wrong_key_report(evaluation, [c.case for c in cases], args.out, "Wrong-key experiment", notes))
    for problem in not_removed:
        print(f"diffpriv eval: could not remove from the server: {problem}", file=sys.stderr)
    return 1 if failed or not_removed else 0
