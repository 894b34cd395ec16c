"""What a batch produced, kept across runs: the run record (SQLite), summary.json and the
contact sheets written from it.

The record, ``DIR/record.sqlite``, is append-only: one row per run, per photo name (which
bytes and settings the name stands for), per attempt at a photo and per face of an
attempt. Writing a photo's result is one small transaction whatever the batch's size, in
WAL mode, so several runs may write into one --out at once, and a crash or a killed
server never loses what was already recorded. summary.json is written from the record at
the end of a run (and on demand: `diffpriv report`): the run's own photos under
``results``, and what earlier runs made that this one was not given under ``earlier``.

A photo is done when an earlier attempt made from the same bytes (sha256) with the same
settings (settings_fingerprint) is ``ok`` and its files are still there; a photo whose
name is taken by other bytes or other settings is done again under a new name (``name-2``
...), so nothing is replaced.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from diffpriv_core.files import replace_file
from diffpriv_core.key_format import face_crop_summary, read_public_metadata

from .pictures import PhotoError, read_photo

SUMMARY_NAME = "summary.json"
RECORD_NAME = "record.sqlite"
CONTACT_SHEET_PREFIX = "contact_sheet_"
# "skipped": done by an earlier run (same bytes, same settings, files still there).
DONE_STATUSES = ("ok", "skipped")
THUMB_PX = 256  # high enough to read the face labels on the source photo
PROTECTED_COLOUR, UNPROTECTED_COLOUR = "#00e040", "#ff2020"
PAGE_PHOTOS = 50  # photos (rows) per contact sheet page: at most 50 x 256 px high
# The entry fields with columns of their own; everything else of an entry is kept as JSON.
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, command TEXT NOT NULL, started REAL NOT NULL, finished REAL,
    host TEXT, pid INTEGER, settings TEXT);
CREATE TABLE IF NOT EXISTS settings (fingerprint TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY, sha256 TEXT, settings TEXT, stem TEXT NOT NULL, run TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS names_by_content ON names (sha256, settings);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL,
    source TEXT, sha256 TEXT, settings TEXT, at REAL NOT NULL, entry TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS attempts_by_name ON attempts (name, id);
CREATE INDEX IF NOT EXISTS attempts_by_run ON attempts (run, id);
CREATE TABLE IF NOT EXISTS faces (
    attempt INTEGER NOT NULL, face INTEGER NOT NULL, key TEXT, fields TEXT NOT NULL, PRIMARY KEY (attempt, face));
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL);
"""
BUSY_TIMEOUT_S = 60.0  # another run's transaction is short: wait for it rather than fail


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(canonical(settings).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Plan:
    """What a run does with one input: ``name`` (its output folder and entry), and the
    earlier entry that makes it done (None: to do)."""
    name: str
    done: dict | None = None


def open_record(out_dir: Path) -> sqlite3.Connection:
    db = sqlite3.connect(Path(out_dir) / RECORD_NAME, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # durable across a crash of the command; one fsync per checkpoint
    db.executescript(SCHEMA)
    return db


class Summary:
    """One run's view of the record of ``out_dir``: what it plans, what it records, and
    summary.json. The folder must exist and be writable (the command checks it first)."""

    def __init__(self, out_dir: Path, command: str, settings: dict | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / SUMMARY_NAME
        self.command = command
        self.run_id = uuid.uuid4().hex[:12]
        self.db = open_record(self.out_dir)
        self.settings = settings or {}
        self.fingerprint = settings_fingerprint(self.settings)
        self._content: dict[str, tuple[str | None, str]] = {}  # name -> (sha256, settings) planned this run
        with self._transaction():
            self.db.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)", (self.fingerprint, canonical(self.settings)))
            self.db.execute("INSERT INTO runs VALUES (?, ?, ?, NULL, ?, ?, ?)",
                            (self.run_id, command, time.time(), socket.gethostname(), os.getpid(), self.fingerprint))

    # --- planning ----------------------------------------------------------------------
    def sha256(self, path: Path) -> str:
        """The file's sha256, remembered by path, size and change times (a rerun of a large
        dataset hashes only what changed)."""
        st = Path(path).stat()
        key = str(Path(path).resolve())
        row = self.db.execute("SELECT size, mtime_ns, ctime_ns, sha256 FROM file_hashes WHERE path = ?",
                              (key,)).fetchone()
        if row is not None and tuple(row[:3]) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            return row[3]
        digest = file_sha256(path)
        self.db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?)",
                        (key, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest))
        return digest

    def plan(self, stem: str, sha256: str) -> Plan:
        """The name this run gives a photo of these bytes (with the run's settings), and the
        earlier entry when it is already done. A name taken by other bytes or settings, or
        by another photo of this run, is never reused: ``stem-2``, ``stem-3``, ... instead."""
        owned = self.db.execute("SELECT name FROM names WHERE sha256 = ? AND settings = ? ORDER BY stem != ?, rowid",
                                (sha256, self.fingerprint, stem)).fetchall()
        free_owned = [name for (name,) in owned if name not in self._content]
        for name in free_owned:
            entry = self.latest(name, statuses=DONE_STATUSES)
            if entry is not None and self._files_there(entry):
                self._content[name] = (sha256, self.fingerprint)
                return Plan(name, entry)
        if free_owned:  # failed, or its files are gone: done again under its own name
            name = free_owned[0]
        else:
            name = self._claim(stem, sha256)
        self._content[name] = (sha256, self.fingerprint)
        return Plan(name)

    def _claim(self, stem: str, sha256: str) -> str:
        """A new name for these bytes and settings, taken atomically (concurrent runs never
        share one) and free in --out (no file or folder of that name)."""
        number = 1
        while True:
            name = stem if number == 1 else f"{stem}-{number}"
            number += 1
            if name in self._content or (self.out_dir / name).exists() or is_reserved(name):
                continue
            with self._transaction():
                taken = self.db.execute("INSERT OR IGNORE INTO names VALUES (?, ?, ?, ?, ?)",
                                        (name, sha256, self.fingerprint, stem, self.run_id)).rowcount == 0
            if not taken:
                return name

    def refused_name(self, stem: str) -> str:
        """A name for an input refused before queueing (no file is ever made under it):
        unique within this run, not claimed in the record."""
        name, number = stem, 1
        while name in self._content:
            number += 1
            name = f"{stem}-{number}"
        self._content[name] = (None, self.fingerprint)
        return name

    def _files_there(self, entry: dict) -> bool:
        return all((self.out_dir / rel).is_file() for rel in entry["outputs"] + entry["keys"])

    # --- recording ---------------------------------------------------------------------
    def record(self, name: str, source: Path, status: str, outputs: list[Path] = (), keys: list[Path] = (),
               seconds: float | None = None, server: str | None = None, error: str | None = None,
               node: str | None = None, identity: list[dict] = (), passes: list[dict] = (),
               faces: list[dict] | None = None, **fields) -> None:
        """One attempt at a photo (or key). ``server``: the ComfyUI that ran it; ``node``: the
        Ray node that server ran on (--ray); ``identity``: per guided image, the guiding
        recogniser's cosine of each sample to the original, its threshold and verdict (the
        Guided DDIM Sampler's or Identity Similarity's report); ``passes``: per face, the
        network passes of each stage and their total (batch.passes_of), and, kept with the other
        fields, ``calls``: the network calls the photo made in sequence (batch.calls_of); ``faces``: per face,
        what is known of it (default: each per-face key's face and box); any other field is
        kept with the entry as it is, once known (None: not kept), e.g. ``ablations``: the
        paper's ablations its graph ran (graphs.ablations), ``photo``: the size and
        conversions of the picture the command sent, ``detection``: what Face Detect found,
        possible faces not protected included (verify.detection_report)."""
        keys = [self._relative(p) for p in keys]
        if faces is None:
            faces = [dict(face, key=key) for key in keys if (face := key_face(self.out_dir / key)) is not None]
        entry = {"source": str(source), "status": status, "outputs": [self._relative(p) for p in outputs],
                 "keys": keys, "identity": list(identity), "passes": list(passes),
                 "seconds": None if seconds is None else round(seconds, 3), "server": server, "node": node,
                 "error": error, **{k: v for k, v in fields.items() if v is not None}}
        self._append(name, str(source), status, entry, faces)

    def mark_skipped(self, name: str, earlier: dict, source: Path) -> None:
        """The photo was given to this run, and an earlier run already made it."""
        entry = {k: v for k, v in earlier.items() if k not in ("status", "faces", "attempt", "run")}
        entry.update(status="skipped", done_in_run=earlier.get("run"), source=str(source))
        self._append(name, str(source), "skipped", entry, earlier.get("faces", []))

    def _append(self, name: str, source: str, status: str, entry: dict, faces: list[dict]) -> None:
        sha256, settings = self._content.get(name, (None, self.fingerprint))
        with self._transaction():
            attempt = self.db.execute(
                "INSERT INTO attempts (run, name, status, source, sha256, settings, at, entry) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (self.run_id, name, status, source, sha256, settings, time.time(), canonical(entry))).lastrowid
            self.db.executemany("INSERT INTO faces VALUES (?, ?, ?, ?)",
                                [(attempt, face.get("face", i), face.get("key"),
                                  canonical({k: v for k, v in face.items() if k not in ("face", "key")}))
                                 for i, face in enumerate(faces)])

    # --- reading -----------------------------------------------------------------------
    def latest(self, name: str, statuses: tuple[str, ...] | None = None) -> dict | None:
        """The latest attempt at ``name`` (of these statuses), as its summary entry."""
        where, params = ("AND status IN (%s)" % ",".join("?" * len(statuses)), statuses) if statuses else ("", ())
        row = self.db.execute(f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE name = ? {where} ORDER BY id DESC "
                              "LIMIT 1", (name, *params)).fetchone()
        return None if row is None else self._entries([row])[name]

    @property
    def results(self) -> dict[str, dict]:
        """This run's photos: the latest attempt at each, by name."""
        return self._entries(self.db.execute(f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE run = ? ORDER BY id",
                                             (self.run_id,)).fetchall())

    def earlier(self) -> dict[str, dict]:
        """What earlier runs (or runs at the same time) made of photos this run was not
        given: the latest attempt at each name, skips left out."""
        rows = self.db.execute(
            f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE id IN (SELECT MAX(id) FROM attempts "
            "WHERE status != 'skipped' GROUP BY name) AND name NOT IN (SELECT name FROM attempts WHERE run = ?) "
            "ORDER BY id", (self.run_id,)).fetchall()
        return self._entries(rows)

    def counts(self) -> dict[str, int]:
        """This run's photos by status."""
        counts: dict[str, int] = {}
        for entry in self.results.values():
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        return counts

    def is_done(self, name: str) -> bool:
        """Made by an attempt that is ok (or skipped as done), every file still there."""
        entry = self.latest(name, statuses=DONE_STATUSES)
        return entry is not None and self._files_there(entry)

    def _entries(self, rows) -> dict[str, dict]:
        faces: dict[int, list[dict]] = {}
        ids = [row[0] for row in rows]
        for chunk in range(0, len(ids), 900):  # SQLite's limit on bound values
            part = ids[chunk:chunk + 900]
            for attempt, face, key, fields in self.db.execute(
                    f"SELECT attempt, face, key, fields FROM faces WHERE attempt IN ({','.join('?' * len(part))}) "
                    "ORDER BY attempt, face", part):
                faces.setdefault(attempt, []).append(dict(json.loads(fields), face=face,
                                                          **({"key": key} if key is not None else {})))
        entries = {}
        for attempt, run, name, status, sha256, settings, entry in rows:
            entries.pop(name, None)  # the latest attempt wins, and takes its place in the order
            entries[name] = dict(json.loads(entry), status=status, faces=faces.get(attempt, []), sha256=sha256,
                                 settings=settings, run=run, attempt=attempt)
        return entries

    # --- summary.json ------------------------------------------------------------------
    def write_json(self) -> Path:
        """summary.json from the record, written whole (atomically)."""
        results, earlier = self.results, self.earlier()
        fingerprints = {e["settings"] for e in (*results.values(), *earlier.values()) if e["settings"]}
        settings = dict(self.db.execute(f"SELECT fingerprint, value FROM settings WHERE fingerprint IN "
                                        f"({','.join('?' * len(fingerprints))})", sorted(fingerprints)).fetchall())
        started, finished = self.db.execute("SELECT started, finished FROM runs WHERE id = ?",
                                            (self.run_id,)).fetchone()
        payload = {"command": self.command,
                   "run": {"id": self.run_id, "started": started, "finished": finished, "counts": self.counts(),
                           "settings": self.fingerprint},
                   "results": results, "earlier": earlier,
                   "settings": {fp: json.loads(value) for fp, value in settings.items()}}
        replace_file(self.path, json.dumps(payload, indent=1).encode())
        return self.path

    def finish(self) -> None:
        with self._transaction():
            self.db.execute("UPDATE runs SET finished = ? WHERE id = ?", (time.time(), self.run_id))

    def close(self) -> None:
        self.db.close()

    def _transaction(self):
        return _Transaction(self.db)

    def _relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.out_dir))


ATTEMPT_COLUMNS = "id, run, name, status, sha256, settings, entry"
# Names of what the command itself writes into --out: never a photo's folder.
RESERVED_NAMES = {SUMMARY_NAME, RECORD_NAME, f"{RECORD_NAME}-wal", f"{RECORD_NAME}-shm", "recovery-check"}


def is_reserved(name: str) -> bool:
    return name in RESERVED_NAMES or name.startswith(".") or (name.startswith(CONTACT_SHEET_PREFIX)
                                                               and name.endswith(".png"))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT: a writer waits for another run's write, then holds the lock."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, *_):
        self.db.execute("ROLLBACK" if kind else "COMMIT")


def latest_run(out_dir: Path) -> Summary:
    """The run a `diffpriv report` speaks of: the latest started in ``out_dir``'s record."""
    if not (Path(out_dir) / RECORD_NAME).is_file():
        raise FileNotFoundError(f"{out_dir} has no run record ({RECORD_NAME}): not a `diffpriv` --out folder")
    db = open_record(out_dir)
    row = db.execute("SELECT id, command, settings FROM runs ORDER BY started DESC LIMIT 1").fetchone()
    if row is None:
        raise FileNotFoundError(f"{out_dir / RECORD_NAME} records no run")
    summary = Summary.__new__(Summary)
    summary.out_dir, summary.path, summary.db = Path(out_dir), Path(out_dir) / SUMMARY_NAME, db
    summary.run_id, summary.command, summary.fingerprint = row
    summary.settings, summary._content = {}, {}
    return summary


def finished_entries(out_dir: Path) -> dict[str, dict] | None:
    """The summary entries of a `diffpriv protect` / `recover` --out folder that finished,
    this run's and earlier runs', by name; None for a folder without a summary."""
    path = Path(out_dir) / SUMMARY_NAME
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    results = {**saved.get("earlier", {}), **saved.get("results", {})}
    return {name: entry for name, entry in sorted(results.items()) if entry.get("status") in DONE_STATUSES}


def finished_outputs(out_dir: Path) -> dict[Path, str] | None:
    """The pictures of an --out folder that finished, each with the name of the summary
    entry that made it (the photo's stem, or the key's `<stem>_00001`); None for a folder
    without a summary."""
    entries = finished_entries(out_dir)
    if entries is None:
        return None
    return {Path(out_dir) / rel: name for name, entry in entries.items() for rel in entry.get("outputs", [])}


def finished_ablations(out_dir: Path) -> dict[str, list[str]]:
    """The paper's ablations each finished entry of a `diffpriv protect` --out folder ran
    (empty lists for the method itself; entries written before they were recorded have none)."""
    return {name: list(entry.get("ablations") or []) for name, entry in (finished_entries(out_dir) or {}).items()}


def key_face(path: Path) -> dict | None:
    """The face a per-face key belongs to ({"face": index, "box": [x1, y1, x2, y2]}), read
    from the key file's public metadata (no tensors loaded); None for a whole-image key."""
    return face_crop_summary(read_public_metadata(path))


# --- contact sheets ----------------------------------------------------------------------
def write_contact_sheet(summary: Summary, show_source: bool = True) -> list[Path]:
    """The run's finished photos on pages of PAGE_PHOTOS rows (contact_sheet_0001.png, ...):
    a row per photo, its source picture (when it is one, upright as the command sent it,
    every protected face's box marked with its index and protection, every possible face
    not protected in another colour) then its outputs, each scaled to THUMB_PX high. Pages
    of an earlier, longer run are removed. Empty when nothing finished."""
    rows = [entry for entry in summary.results.values() if entry["status"] in DONE_STATUSES]
    pages = []
    for number, start in enumerate(range(0, len(rows), PAGE_PHOTOS), 1):
        page = _page([_row(summary.out_dir, entry, show_source) for entry in rows[start:start + PAGE_PHOTOS]])
        if page is None:
            continue
        buffer = io.BytesIO()
        page.save(buffer, format="PNG")
        # owner-only, a link at the name replaced, not followed
        pages.append(replace_file(summary.out_dir / f"{CONTACT_SHEET_PREFIX}{len(pages) + 1:04d}.png",
                                  buffer.getvalue()))
    for stale in summary.out_dir.glob(f"{CONTACT_SHEET_PREFIX}[0-9][0-9][0-9][0-9].png"):
        if stale not in pages:
            stale.unlink(missing_ok=True)
    return pages


def _row(out_dir: Path, entry: dict, show_source: bool) -> list[Image.Image]:
    row = [_source_thumbnail(entry)] if show_source and Path(entry["source"]).is_file() else []
    return row + [_thumbnail(p) for p in (out_dir / rel for rel in entry["outputs"]) if p.is_file()]


def _page(rows: list[list[Image.Image]]) -> Image.Image | None:
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
    return sheet


def _thumbnail(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.draft("RGB", (THUMB_PX * 4, THUMB_PX))  # a JPEG decodes at a fraction of its size
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
