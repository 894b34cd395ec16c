"""The evaluation report: markdown tables, image grids, the diversity plot and a JSON
file with every number."""
from __future__ import annotations

import json
import math
from urllib.parse import quote
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from diffpriv_client.graphs import ABLATIONS
from diffpriv_eval.diversity import pca_2d, scatter_png
from diffpriv_eval.evaluate import EmbeddingSet, Evaluation
from diffpriv_eval.images import Case

THUMB_HEIGHT = 192


def json_safe(value):
    """JSON has no infinity (PSNR of identical images): write it as the string "inf"."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def grid_png(case: Case, path: Path) -> None:
    """original | protected candidates | recovered, side by side with captions."""
    tiles = [("original", case.original)] + [(f"protected {i + 1}", p) for i, p in enumerate(case.protected)]
    if case.recovered is not None:
        tiles.append(("recovered", case.recovered))
    tiles_png(tiles, path)


def tiles_png(tiles: Sequence[tuple[str, np.ndarray]], path: Path) -> None:
    """Pictures side by side, each scaled to THUMB_HEIGHT with its caption above."""
    thumbs = [(label, Image.fromarray(img).resize(
        (max(1, round(img.shape[1] * THUMB_HEIGHT / img.shape[0])), THUMB_HEIGHT), Image.Resampling.LANCZOS))
        for label, img in tiles]
    caption = 16
    sheet = Image.new("RGB", (sum(t.width for _, t in thumbs), THUMB_HEIGHT + caption), "white")
    draw, x = ImageDraw.Draw(sheet), 0
    for label, thumb in thumbs:
        sheet.paste(thumb, (x, caption))
        draw.text((x + 4, 2), label, fill="black")
        x += thumb.width
    sheet.save(path)


def diversity_png(embeddings: EmbeddingSet, stems: Sequence[str], path: Path, recognizer: str) -> None:
    points = pca_2d(np.concatenate([embeddings.originals, embeddings.candidates]))
    groups = list(range(len(stems))) + list(embeddings.candidate_case)
    is_original = [True] * len(stems) + [False] * len(embeddings.candidate_case)
    scatter_png(points, groups, is_original, list(stems), path,
                f"{recognizer} embeddings, PCA (squares: originals, dots: protected candidates)")


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        # Significant digits, not decimals: recovery MSE lives around 1e-3.
        return f"{value:.4g}" if math.isfinite(value) else "inf"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _protection_section(results: dict) -> list[str]:
    rows = [(name, r["role"], r["threshold"], r["candidates"], r.get("success_rate"),
             r.get("mean_distance_to_original")) for name, r in results["protection"].items()]
    guided = results.get("guided_by")
    roles = (f"{guided} guided the protection (white-box); the others never saw it (transfer)." if guided
             else "No recogniser guided this protection: every one measures transfer.")
    return ["## Protection success (Table 1)", "",
            "A protected face succeeds when its identity distance to the original exceeds the recogniser's "
            "threshold (its published operating point, as the Euclidean distance of its embeddings), measured "
            "at the original's face position. " + roles, ""] + _table(
        ["recogniser", "role", "threshold (distance)", "candidates", "success rate", "mean distance"], rows)


PIXEL_METRICS = {"mse": "MSE", "psnr": "PSNR dB", "ssim": "SSIM", "lpips": "LPIPS"}
# dlib's descriptors all point much the same way: measured on the six sample photos
# (diffpriv_eval.sample_photos, six people), their cosines are 0.81-0.90.
DLIB_COSINE_NOTE = ("dlib's descriptors are not centred: six different people of the sample photos have cosines "
                    "of 0.81-0.90 under it, so read dlib by its same-person verdict (distance at most 0.6), not its "
                    "Cos-IE.")


def _cosine_notes(identity: dict) -> list[str]:
    return [DLIB_COSINE_NOTE, ""] if "dlib" in identity else []


def recovery_rows(recovery: dict) -> list[tuple[str, float | None]]:
    """Table 2's metrics of a recovery: MSE, PSNR, SSIM, LPIPS (when computed) on pixels,
    then Cos-IE (the cosine of the original's and the recovered face's embeddings) per
    recogniser."""
    mean = recovery["mean"]
    rows = [(label, mean[key]) for key, label in PIXEL_METRICS.items() if key in mean]
    return rows + [(f"Cos-IE {name}", r["cos_ie"]) for name, r in recovery["identity"].items()]


def _recovery_section(recovery: dict) -> list[str]:
    lines = ["## Recovery quality (Table 2)", ""]
    if not recovery["images"]:
        return lines + ["No recovered images were given.", ""]
    lines += ["Pixels in [0, 1]; Cos-IE is the cosine between the identity embeddings of the original and the "
              "recovered face, per recogniser (1: the same embedding).", ""]
    lines += _table(["metric", "mean"], recovery_rows(recovery)) + _cosine_notes(recovery["identity"])
    lines += ["Identity of the recovered face against the original: the same person when the distance is at most "
              "the recogniser's threshold.", ""]
    lines += _table(["recogniser", "threshold (distance)", "Cos-IE", "mean distance", "recovered as the same person"],
                    [(name, r["threshold"], r["cos_ie"], r["mean_distance"], r["same_person_rate"])
                     for name, r in recovery["identity"].items()])
    if recovery["lpips_not_computed"]:
        lines += [f"LPIPS was not computed: {recovery['lpips_not_computed']}", ""]
    return lines


_ROW_NAMES = {"originals": "originals (reference)", "protected": "protected", "recovered": "recovered"}
_SET_S = {"originals": "unprotected (reference)", "protected": "protected"}


def _identification_section(identification: dict | None) -> list[str]:
    lines = ["## Identification accuracy (Table 3, AVIH's protocol)", ""]
    if identification is None:
        return lines + ["Not measured: give `--gallery DIR` (one folder of several photos per person, plus "
                        "`distractors/`) and the protected versions of the gallery's photos.", ""]
    gallery, avih = identification["gallery"], identification["avih"]
    photos = sum(gallery["identities"].values())
    lines += [f"Gallery {gallery['folder']}: {len(gallery['identities'])} people ({photos} photos) and "
              f"{gallery['distractors']} distractors; {sum(avih['protected_photos'].values())} photos have protected "
              "versions. Each original photo is a probe in turn. Its verification set is Set_s, the protected "
              "versions of its person's other photos, and Set_d, every photo of everyone else (the other people "
              "and the distractors, unprotected). A query is wrong when an image of Set_d is at least as close "
              "to the probe as every image of Set_s. The reference row runs the same queries with Set_s "
              "unprotected; identity hiding keeps the protected row close to it.", ""]
    lines += [f"- gallery photo left out {name}: {why}" for name, why in gallery["skipped"].items()]
    lines += [f"- not a probe {name}: {why}" for name, why in avih["not_probed"].items()]
    lines += [""] if avih["not_probed"] or gallery["skipped"] else []
    rows = [(name, r["role"], _SET_S[row], r[row]["queries"], r[row]["accuracy"])
            for name, r in avih["recognizers"].items() for row in _SET_S]
    lines += _table(["recogniser", "role", "Set_s", "queries", "accuracy"], rows) if rows else [
        "No photo has a protected version of another photo of the same person: nothing was queried.", ""]
    return lines + _reidentification_section(identification["reidentification"])


def _reidentification_section(result: dict) -> list[str]:
    lines = ["## Re-identification of protected photos (not AVIH's protocol)", "",
             "The other direction: each protected candidate (and the original, for reference, and the recovered "
             "picture) is a probe against the gallery's unprotected photos and the distractors, identified when "
             "a photo of its own person is closer than every photo of anyone else (a copy of the probe's own "
             "original never counts). What an attacker holding unprotected photos of the person learns from a "
             "protected one: anonymization brings the protected row down.", ""]
    lines += [f"- not probed {stem}: {why}" for stem, why in result["not_probed"].items()]
    lines += [""] if result["not_probed"] else []
    rows = [(name, r["role"], _ROW_NAMES[row], r[row]["probes"], r[row]["accuracy"])
            for name, r in result["recognizers"].items() for row in _ROW_NAMES if row in r]
    if not rows:
        return lines + ["No original is a person of the gallery: nothing was probed.", ""]
    return lines + _table(["recogniser", "role", "probes", "count", "identified"], rows)


def _utility_section(utility: dict) -> list[str]:
    rows = []
    for name, u in utility.items():
        p = u.get("protected", {})
        rows.append((name, u["original_detection_rate"], p.get("detection_rate"), p.get("box_distance"),
                     p.get("landmark_distance")))
    return ["## Utility (Table 4)", "",
            "Detection of the original's face again in each protected candidate (box IoU >= 0.3); distances "
            "in pixels, mean over detected faces (MTCNN: 5 landmarks, dlib: 68).", ""] + _table(
        ["detector", "originals detected", "protected detected", "box distance px", "landmark distance px"], rows)


def _diversity_section(results: dict, plots: dict[str, str]) -> list[str]:
    spreads = {name: r.get("diversity", {}) for name, r in results["protection"].items()}
    rows = [(name, d.get("pairs", 0), d.get("mean_pairwise_distance"), d.get("min_pairwise_distance"))
            for name, d in spreads.items()]
    lines = ["## Diversity", "", "Identity distances between candidates of the same original.", ""]
    lines += _table(["recogniser", "pairs", "mean distance", "min distance"], rows)
    return lines + [f"![{name} embeddings]({quote(file)})" for name, file in plots.items()] + [""]


def method_lines(results: dict) -> list[str]:
    """What the protection ran, when it was one of the paper's ablations (summary.json says)."""
    runs: dict[tuple[str, ...], list[str]] = {}
    for stem, names in results.get("ablations", {}).items():
        runs.setdefault(tuple(names), []).append(stem)
    evaluated = len(results["cases"])
    lines = []
    for names, stems in runs.items():
        which = "every photo" if len(stems) == evaluated else ", ".join(stems)
        lines.append(f"- **ablation** {' + '.join(ABLATIONS.get(n, n) for n in names)}: {which}")
    return lines + [""] if lines else []


def write_report(evaluation: Evaluation, cases: Sequence[Case], out: Path, title: str) -> Path:
    """Writes report.md, results.json, grids/<stem>.png and diversity_<recogniser>.png."""
    out.mkdir(parents=True, exist_ok=True)
    results = evaluation.results
    (out / "results.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False))
    (out / "grids").mkdir(exist_ok=True)
    kept = [c for c in cases if c.stem in set(results["cases"])]
    for case in kept:
        grid_png(case, out / "grids" / f"{case.stem}.png")
    plots = {}
    for name, embeddings in evaluation.embeddings.items():
        if len(embeddings.candidates):
            plots[name] = f"diversity_{name}.png"
            diversity_png(embeddings, [c.stem for c in kept], out / plots[name], name)
    lines = [f"# {title}", "", f"{len(kept)} original(s) evaluated; every number is in results.json.", ""]
    lines += method_lines(results)
    lines += [f"- skipped {stem}: {why}" for stem, why in results["skipped"].items()]
    lines += [f"- {stem}: resized to the original's size: {', '.join(names)}"
              for stem, names in results["resized"].items()]
    lines += [""] + _protection_section(results) + _recovery_section(results["recovery"])
    lines += _identification_section(results["identification"])
    lines += _utility_section(results["utility"]) + _diversity_section(results, plots)
    lines += ["## Images", "", "original | protected candidates | recovered", ""]
    lines += [f"![{c.stem}](grids/{quote(c.stem)}.png)" for c in kept] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _wrong_key_section(results: dict) -> list[str]:
    measured = {name: v for name, v in results["variants"].items() if v["images"]}
    lines = ["## Recovery with each pair of keys (Fig. 7)", ""]
    if not measured:
        return lines + ["No picture came back.", ""]
    lines += ["Each photo recovered with its own key pair and with pairs that do not belong together, measured "
              "against the original as in Table 2 (pixels in [0, 1]; Cos-IE: the cosine between the identity "
              "embeddings of the original and the picture, at the original's face). Only the right pair should "
              "bring the face back: high PSNR and SSIM, Cos-IE near 1, the same person for every recogniser.", ""]
    first = next(iter(measured.values()))
    metrics = [label for label, _ in recovery_rows(first)]
    header = ["variant", "keys", "pictures", *metrics, *(f"same person {n}" for n in first["identity"])]
    rows = [(v["title"], v["keys"], v["images"], *(value for _, value in recovery_rows(v)),
             *(r["same_person_rate"] for r in v["identity"].values())) for v in measured.values()]
    lines += _table(header, rows) + _cosine_notes(first["identity"])
    if first["lpips_not_computed"]:
        lines += [f"LPIPS was not computed: {first['lpips_not_computed']}", ""]
    return lines


def write_wrong_key_report(evaluation: Evaluation, cases: Sequence[Case], out: Path, title: str,
                           notes: Sequence[str] = ()) -> Path:
    """The wrong-key experiment's report.md, results.json and grids/<key>.png (the original,
    then each variant's picture)."""
    out.mkdir(parents=True, exist_ok=True)
    results = evaluation.results
    (out / "results.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False))
    (out / "grids").mkdir(exist_ok=True)
    kept = [c for c in cases if c.stem in set(results["cases"])]
    titles = {name: v["title"] for name, v in results["variants"].items()}
    for case in kept:
        tiles_png([("original", case.original)] + [(titles[name], case.variants[name]) for name in titles
                                                   if name in case.variants], out / "grids" / f"{case.stem}.png")
    lines = [f"# {title}", "", f"{len(kept)} key(s) evaluated; every number is in results.json.", ""]
    lines += [f"- {note}" for note in notes]
    lines += [f"- skipped {stem}: {why}" for stem, why in results["skipped"].items()]
    lines += [f"- {stem}: pictures resized to the original's size: {', '.join(names)}"
              for stem, names in results["resized"].items()]
    lines += [""] + _wrong_key_section(results)
    lines += ["## Pictures", "", "original | " + " | ".join(titles.values()), ""]
    lines += [f"![{c.stem}](grids/{quote(c.stem)}.png)" for c in kept] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
