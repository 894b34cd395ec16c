"""DIR/summary.json and the contact sheet: what a batch produced, kept across reruns.

The summary is rewritten (atomically) after every image, so a crash or a killed server
never loses what was already done, and a rerun knows what it may skip.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from diffpriv_core.files import replace_file
from diffpriv_core.key_format import face_crop_summary, read_public_metadata

from .pictures import PhotoError, read_photo

SUMMARY_NAME = "summary.json"
CONTACT_SHEET_NAME = "contact_sheet.png"
# "skipped": done by an earlier run, files kept; a later run skips it again.
DONE_STATUSES = ("ok", "skipped")
THUMB_PX = 256  # high enough to read the face labels on the source photo
PROTECTED_COLOUR, UNPROTECTED_COLOUR = "#00e040", "#ff2020"


class Summary:
    def __init__(self, out_dir: Path, command: str):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / SUMMARY_NAME
        self.command = command
        self.results: dict[str, dict] = {}
        if self.path.exists():
            self.results = json.loads(self.path.read_text()).get("results", {})

    def is_done(self, name: str) -> bool:
        """Done in an earlier run, and every file it listed is still there."""
        entry = self.results.get(name)
        return (entry is not None and entry["status"] in DONE_STATUSES
                and all((self.out_dir / rel).is_file() for rel in entry["outputs"] + entry["keys"]))

    def mark_skipped(self, name: str) -> None:
        self.results[name]["status"] = "skipped"
        self.save()

    def record(self, name: str, source: Path, status: str, outputs: list[Path] = (), keys: list[Path] = (),
               seconds: float | None = None, server: str | None = None, error: str | None = None,
               node: str | None = None, identity: list[dict] = (), passes: list[dict] = (),
               ablations: list[str] = (), photo: dict | None = None, detection: dict | None = None) -> None:
        """``server``: the ComfyUI that ran it; ``node``: the Ray node that server ran on (--ray);
        ``identity``: per guided image, the guiding recogniser's cosine of each sample to the
        original, its threshold and verdict (the Guided DDIM Sampler's or Identity Similarity's
        report); ``passes``: per face, the network passes of each stage and their total
        (batch.passes_of); ``ablations``: the paper's ablations its graph ran (graphs.ablations),
        empty for the method itself; ``photo``: the size and conversions of the picture the
        command sent; ``detection``: what Face Detect found, possible faces not protected
        included (verify.detection_report)."""
        self.results[name] = {
            "source": str(source),
            "status": status,
            "outputs": [self._relative(p) for p in outputs],
            "keys": [self._relative(p) for p in keys],
            "faces": [dict(face, key=self._relative(p)) for p in keys if (face := key_face(p)) is not None],
            "identity": list(identity),
            "passes": list(passes),
            "ablations": list(ablations),
            "seconds": None if seconds is None else round(seconds, 3),
            "server": server,
            "node": node,
            "error": error,
        }
        # Protect's fields, present once known (a photo refused before queueing has neither).
        self.results[name].update({k: v for k, v in (("photo", photo), ("detection", detection)) if v is not None})
        self.save()

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"command": self.command, "results": self.results}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=".summary-", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(payload)
        os.replace(tmp, self.path)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.results.values():
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        return counts

    def _relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.out_dir))


def finished_outputs(out_dir: Path) -> dict[Path, str] | None:
    """The pictures of a `diffpriv protect` / `recover` --out folder that finished, each
    with the name of the summary entry that made it (the photo's stem, or the key's
    `<stem>_00001`); None for a folder without a summary."""
    out_dir = Path(out_dir)
    path = out_dir / SUMMARY_NAME
    if not path.is_file():
        return None
    results = json.loads(path.read_text()).get("results", {})
    return {out_dir / rel: name for name, entry in sorted(results.items()) if entry.get("status") in DONE_STATUSES
            for rel in entry.get("outputs", [])}


def finished_ablations(out_dir: Path) -> dict[str, list[str]]:
    """The paper's ablations each finished entry of a `diffpriv protect` --out folder ran
    (empty lists for the method itself; entries written before they were recorded have none)."""
    path = Path(out_dir) / SUMMARY_NAME
    if not path.is_file():
        return {}
    results = json.loads(path.read_text()).get("results", {})
    return {name: list(entry.get("ablations") or []) for name, entry in sorted(results.items())
            if entry.get("status") in DONE_STATUSES}


def key_face(path: Path) -> dict | None:
    """The face a per-face key belongs to ({"face": index, "box": [x1, y1, x2, y2]}), read
    from the key file's public metadata (no tensors loaded); None for a whole-image key."""
    return face_crop_summary(read_public_metadata(path))


def write_contact_sheet(summary: Summary, show_source: bool = True) -> Path | None:
    """One PNG for the run: a row per finished item, its source picture (when it is one,
    upright as the command sent it, every protected face's box marked with its index and
    protection, every possible face not protected in another colour) then its outputs, each
    scaled to THUMB_PX high. None when nothing finished."""
    rows = []
    for entry in summary.results.values():
        if entry["status"] not in DONE_STATUSES:
            continue
        row = [_source_thumbnail(entry)] if show_source and Path(entry["source"]).is_file() else []
        row += [_thumbnail(p) for p in (summary.out_dir / rel for rel in entry["outputs"]) if p.is_file()]
        rows.append(row)
    rows = [row for row in rows if row]
    if not rows:
        return None
    width = max(sum(t.width for t in row) for row in rows)
    sheet = Image.new("RGB", (width, THUMB_PX * len(rows)), "white")
    for y, row in enumerate(rows):
        x = 0
        for thumb in row:
            sheet.paste(thumb, (x, y * THUMB_PX))
            x += thumb.width
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return replace_file(summary.out_dir / CONTACT_SHEET_NAME, buffer.getvalue())  # owner-only, links not followed


def _thumbnail(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return _framed(img.convert("RGB"))


def _framed(img: Image.Image) -> Image.Image:
    width = max(1, round(img.width * THUMB_PX / img.height))
    thumb = img.resize((width, THUMB_PX))
    ImageDraw.Draw(thumb).rectangle([0, 0, width - 1, THUMB_PX - 1], outline="white")
    return thumb


def _source_thumbnail(entry: dict) -> Image.Image:
    """The photo as the command sent it, with the boxes of its faces: protected ones in
    PROTECTED_COLOUR, labelled "<index> <protection>"; possible faces not protected, and
    faces found without a key, in UNPROTECTED_COLOUR."""
    try:
        pixels = read_photo(entry["source"]).pixels
    except PhotoError:
        return _thumbnail(Path(entry["source"]))  # a picture the command did not send: shown as it is
    thumb, scale = _framed(Image.fromarray(pixels)), THUMB_PX / pixels.shape[0]
    draw = ImageDraw.Draw(thumb)
    keyed = set()
    for face in entry.get("faces", []):
        keyed.add(face["face"])
        _mark(draw, face["box"], scale, PROTECTED_COLOUR, f"{face['face']} {face.get('protection') or 'protected'}")
    detection = entry.get("detection") or {}
    for face in detection.get("faces", []):
        if face["face"] not in keyed:
            _mark(draw, face["box"], scale, UNPROTECTED_COLOUR, f"{face['face']} NO KEY")
    for possible in detection.get("possible", []):
        _mark(draw, possible["box"], scale, UNPROTECTED_COLOUR, f"? {possible['score']:.2f}")
    return thumb


def _mark(draw: ImageDraw.ImageDraw, box, scale: float, colour: str, label: str) -> None:
    x1, y1, x2, y2 = (v * scale for v in box)
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
    draw.text((x1 + 2, max(0.0, y1 - 11)), label, fill=colour)
