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
    lines += _table(["metric", "mean"], recovery_rows(recovery))
    lines += ["Identity of the recovered face against the original: the same person when the distance is at most "
              "the recogniser's threshold.", ""]
    lines += _table(["recogniser", "threshold (distance)", "Cos-IE", "mean distance", "recovered as the same person"],
                    [(name, r["threshold"], r["cos_ie"], r["mean_distance"], r["same_person_rate"])
                     for name, r in recovery["identity"].items()])
    if recovery["lpips_not_computed"]:
        lines += [f"LPIPS was not computed: {recovery['lpips_not_computed']}", ""]
    return lines


_ROW_NAMES = {"originals": "originals (reference)", "protected": "protected", "recovered": "recovered"}


def _identification_section(identification: dict | None) -> list[str]:
    lines = ["## Identification accuracy (Table 3)", ""]
    if identification is None:
        return lines + ["Not measured: give `--gallery DIR` (one folder of several photos per person, plus "
                        "`distractors/`) for AVIH's identification protocol.", ""]
    gallery = identification["gallery"]
    photos = sum(gallery["identities"].values())
    lines += [f"AVIH's protocol against the gallery {gallery['folder']}: {len(gallery['identities'])} identities "
              f"({photos} photos) and {gallery['distractors']} distractors. A probe is identified when a gallery "
              "photo of its own person is closer than every photo of anyone else and every distractor (a copy of "
              "the probe's own original never counts). Identity hiding keeps the protected row close to the "
              "originals'; anonymization brings it down.", ""]
    lines += [f"- not probed {stem}: {why}" for stem, why in identification["not_probed"].items()]
    lines += [f"- gallery photo left out {name}: {why}" for name, why in gallery["skipped"].items()]
    lines += [""] if identification["not_probed"] or gallery["skipped"] else []
    rows = [(name, r["role"], _ROW_NAMES[row], r[row]["probes"], r[row]["accuracy"])
            for name, r in identification["recognizers"].items() for row in _ROW_NAMES if row in r]
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
    lines += [f"- skipped {stem}: {why}" for stem, why in results["skipped"].items()]
    lines += [f"- resized to the original's size: {', '.join(names)}" for names in results["resized"].values()]
    lines += [""] + _protection_section(results) + _recovery_section(results["recovery"])
    lines += _identification_section(results["identification"])
    lines += _utility_section(results["utility"]) + _diversity_section(results, plots)
    lines += ["## Images", "", "original | protected candidates | recovered", ""]
    lines += [f"![{c.stem}](grids/{quote(c.stem)}.png)" for c in kept] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
