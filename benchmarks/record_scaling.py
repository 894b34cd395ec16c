"""The run record's own cost per photo, with no model and no server: a dry run of a batch of
small photos through what `diffpriv protect` does around each one (hash the photo, plan
its name, record its result, then summary.json and the contact sheet pages at the end),
and a rerun that finds every photo done. A record that scales costs the same per photo
for the last hundred as for the first: the table gives both, and their ratio measured in
this run, in time and in SQL statements (which hold on any machine).

    .venv/bin/python benchmarks/record_scaling.py [--photos 2000] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffpriv_client.summary import PAGE_PHOTOS, Summary, write_contact_sheet  # noqa: E402

HUNDRED = 100
SETTINGS = {"command": "protect", "task": "anonymize", "workflow": "dry-run"}


class StatementCounter:
    """Counts the SQL statements a connection runs (sqlite3's trace callback)."""

    def __init__(self, summary: Summary):
        self.count = 0
        summary.db.set_trace_callback(self._seen)

    def _seen(self, _statement: str) -> None:
        self.count += 1


def make_photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"photo{i:05d}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def run(photos: list[Path], out: Path, record_results: bool) -> dict:
    """One run over ``photos``: per photo, seconds and SQL statements of the record's work."""
    summary = Summary(out, "protect", SETTINGS)
    counter = StatementCounter(summary)
    seconds, statements = [], []
    for path in photos:
        started, before = time.perf_counter(), counter.count
        plan = summary.plan(path.stem, summary.sha256(path))
        if plan.done is not None:
            summary.mark_skipped(plan.name, plan.done, path)
        elif record_results:
            folder = out / plan.name
            folder.mkdir(exist_ok=True)
            output = folder / f"{plan.name}_anonymize_faces_00001_.png"
            output.write_bytes(path.read_bytes())  # the download's place: not the record's cost
            summary.record(plan.name, path, "ok", outputs=[output], seconds=1.0, server="dry-run",
                           identity=[{"image": 0, "cosines": [0.1] * 4}], passes=[{"face": 0, "total": {"unet": 1}}])
        seconds.append(time.perf_counter() - started)
        statements.append(counter.count - before)
    started = time.perf_counter()
    summary.finish()
    summary.write_json()
    json_s = time.perf_counter() - started
    started = time.perf_counter()
    pages = write_contact_sheet(summary)
    sheets_s = time.perf_counter() - started
    summary.close()
    return {"seconds": seconds, "statements": statements, "json_s": json_s, "sheets_s": sheets_s, "pages": pages}


def first_last(values: list[float]) -> tuple[float, float]:
    return float(np.median(values[:HUNDRED])), float(np.median(values[-HUNDRED:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--out", type=Path, help="folder for the photos and --out (default: a temporary one)")
    parser.add_argument("--dry", action="store_true", help="200 photos: a quick check that the script works")
    args = parser.parse_args()
    count = 200 if args.dry else args.photos
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        photos = make_photos(root / "photos", count)
        first = run(photos, root / "out", record_results=True)
        again = run(photos, root / "out", record_results=False)
    print(f"{count} photos of 64 x 48 px, no model and no server: the record's work per photo "
          f"(hash, plan, record), then summary.json and contact sheets of {PAGE_PHOTOS} photos a page.\n")
    print("| run | first 100: median ms / photo | last 100: median ms / photo | last / first | SQL statements / photo, "
          "first 100 -> last 100 |")
    print("|---|---|---|---|---|")
    for label, result in (("first run (every photo done)", first), ("rerun (every photo skipped)", again)):
        a, b = first_last(result["seconds"])
        s, t = first_last(result["statements"])
        print(f"| {label} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f} | {s:.1f} -> {t:.1f} |")
    print(f"\nAt the end of the first run: summary.json {first['json_s']:.2f} s, {len(first['pages'])} contact sheet "
          f"pages {first['sheets_s']:.2f} s ({first['sheets_s'] / count * 1e3:.2f} ms / photo).")


if __name__ == "__main__":
    main()
