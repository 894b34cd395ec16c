"""The run record without a server: two runs writing into one --out at once, and a 2,000-photo
dry run whose cost per photo stays flat (benchmarks/record_scaling.py)."""
from __future__ import annotations

import json
import multiprocessing
import re
import subprocess
import sys

from PIL import Image

from diffpriv_client.summary import PAGE_PHOTOS, RECORD_NAME, THUMB_PX, Summary, latest_run

from conftest import ROOT

PER_RUN = 150


def _one_run(out, run: int, shared_stems: int, started) -> None:
    """A run that plans and records PER_RUN photos, the first ``shared_stems`` of them under
    stems the other run uses too (with other bytes)."""
    summary = Summary(out, "protect", {"task": "anonymize"})
    started.wait()
    for i in range(PER_RUN):
        stem = f"shared{i}" if i < shared_stems else f"run{run}-{i}"
        plan = summary.plan(stem, f"bytes of run {run} photo {i}")
        summary.record(plan.name, f"/photos/{run}/{stem}.png", "ok" if i % 7 else "failed", seconds=0.1,
                       face_report=[{"face": 0, "found": True}])
    summary.finish()
    summary.write_json()
    summary.close()


def test_two_concurrent_runs_into_one_out_lose_nothing_and_never_share_a_name(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    context = multiprocessing.get_context("fork")
    started = context.Event()
    runs = [context.Process(target=_one_run, args=(out, run, 50, started)) for run in (1, 2)]
    for process in runs:
        process.start()
    started.set()
    for process in runs:
        process.join(120)
        assert process.exitcode == 0

    summary = latest_run(out)
    names = [row[0] for row in summary.db.execute("SELECT name FROM attempts")]
    sources = dict(summary.db.execute("SELECT name, source FROM attempts"))
    runs_recorded = summary.db.execute("SELECT COUNT(*) FROM runs WHERE finished IS NOT NULL").fetchone()[0]
    summary.close()
    assert len(names) == 2 * PER_RUN == len(set(names)), "every attempt kept, no name given twice"
    shared = [n for n in names if n.startswith("shared")]
    assert len(shared) == 100 and {sources[n].split("/")[2] for n in shared} == {"1", "2"}
    assert len({re.sub(r"-2$", "", n) for n in shared}) == 50, "one run got shared<i>, the other shared<i>-2"
    assert runs_recorded == 2
    saved = json.loads((out / "summary.json").read_text())
    assert len(saved["results"]) == PER_RUN and len(saved["earlier"]) == PER_RUN, "the other run's photos listed apart"
    entry = next(iter(saved["results"].values()))
    assert entry["face_report"] == [{"face": 0, "found": True}], "fields the record has no column for are kept"
    assert not list(out.glob(f"{RECORD_NAME}-*")), "the last run closed the record: no WAL left"


def test_a_2000_photo_dry_run_costs_the_same_per_photo_first_and_last(tmp_path):
    """The record's SQL statements per photo are the same for the first and last hundred
    photos (a count that holds on any machine; the benchmark also prints the time ratio),
    summary.json lists them all and the contact sheet pages hold at most PAGE_PHOTOS each."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "record_scaling.py"), "--photos", "2000",
                           "--out", str(tmp_path)], capture_output=True, text=True, check=True, timeout=600)
    rows = re.findall(r"\| (first run|rerun) .*?\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) -> ([\d.]+) \|",
                      done.stdout)
    assert len(rows) == 2, done.stdout
    for _label, *_times, first, last in rows:
        assert first == last, done.stdout
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(saved["results"]) == 2000 and {e["status"] for e in saved["results"].values()} == {"skipped"}
    pages = sorted((tmp_path / "out").glob("contact_sheet_*.png"))
    assert len(pages) == 2000 // PAGE_PHOTOS
    assert all(Image.open(page).height <= PAGE_PHOTOS * THUMB_PX for page in pages)
