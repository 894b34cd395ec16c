"""The `diffpriv` command's jobs on this server: what each one uploaded and queued, and what
its cleanup may remove (diffpriv_core/job_protocol.py says what the command and the
routes agree on).

A job is known by the SHA-256 of its token only; the token is never stored, logged or
shown. Everything here lives in the server's memory: after a restart the jobs are gone
and their folders stay until removed by hand.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import folder_paths

from diffpriv_core.files import remove_file_no_follow, remove_tree_no_follow
from diffpriv_core.job_protocol import JOBS_FOLDER, MAX_UPLOADS_PER_JOB, prompt_digest

from .keyfiles import keys_dir

MAX_JOBS = 1024  # jobs alive at once: the oldest is forgotten beyond (its folders stay)
MAX_UPLOAD_BYTES = 2 * 2**30  # held by all live jobs' uploads together
QUEUE_WAIT_S = 30.0  # how long cleanup waits for a withdrawn prompt to leave the queue


@dataclass
class Job:
    folder: str  # public: the job's folder name under diffpriv-jobs/
    client_id: str | None
    created: float = field(default_factory=time.time)
    uploads: list[Path] = field(default_factory=list)
    upload_bytes: int = 0
    prompts: dict[str, str] = field(default_factory=dict)  # prompt id -> digest of the graph queued


class Jobs:
    def __init__(self):
        self._by_token: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._claimed: set[str] = set()  # prompt ids between their check and the queue

    # --- the registry --------------------------------------------------------------
    def create(self, client_id: str | None) -> tuple[str, Job]:
        token = secrets.token_urlsafe(32)
        job = Job(secrets.token_hex(8), client_id)
        with self._lock:
            while len(self._by_token) >= MAX_JOBS:
                self._by_token.pop(next(iter(self._by_token)))
            self._by_token[_hash(token)] = job
        for root in roots().values():
            make_private_folder(Path(root) / JOBS_FOLDER / job.folder)
        return token, job

    def get(self, token) -> Job | None:
        if not isinstance(token, str) or not token:
            return None
        with self._lock:
            return self._by_token.get(_hash(token))

    def forget(self, token: str) -> None:
        with self._lock:
            self._by_token.pop(_hash(token), None)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(job.upload_bytes for job in self._by_token.values())

    def owner_of(self, prompt_id: str) -> Job | None:
        """The job that queued this prompt id, if any."""
        with self._lock:
            return next((job for job in self._by_token.values() if prompt_id in job.prompts), None)

    def client_is_a_jobs(self, client_id: str) -> bool:
        """Whether a live job belongs to this websocket client id."""
        with self._lock:
            return any(job.client_id == client_id for job in self._by_token.values())

    def folder_of(self, token) -> str | None:
        job = self.get(token)
        return job.folder if job is not None else None

    # --- prompt ids ---------------------------------------------------------------
    def claim(self, queue, prompt_id: str) -> bool:
        """Reserve a prompt id that is in no queue, history or other claim (False if taken)."""
        running, pending = queue.get_current_queue_volatile()
        with self._lock:
            taken = (prompt_id in self._claimed or any(item[1] == prompt_id for item in (*running, *pending))
                     or queue.get_history(prompt_id=prompt_id))
            if not taken:
                self._claimed.add(prompt_id)
            return not taken

    def release(self, prompt_id: str) -> None:
        with self._lock:
            self._claimed.discard(prompt_id)


JOBS = Jobs()


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def roots() -> dict[str, str]:
    """The folders a job has a folder in: its uploaded pictures, its outputs, its keys."""
    return {"input": folder_paths.get_input_directory(), "output": folder_paths.get_output_directory(),
            "keys": keys_dir()}


def make_private_folder(path: Path) -> None:
    """``path`` and the jobs folder above it, owner-only (0700), links refused (the root they
    lie in, e.g. a new server's models/diffprivacy_keys, is made as ComfyUI makes folders)."""
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    for folder in (path.parent, path):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
        if folder.is_symlink() or not folder.is_dir():
            raise RuntimeError(f"{folder} is not a folder of this server's own (a link, or a file)")
        os.chmod(folder, 0o700)


def job_path(job: Job, kind: str, name: str) -> Path:
    """A new file's place in the job's folder of ``kind`` (input, keys)."""
    return Path(roots()[kind]) / JOBS_FOLDER / job.folder / name


# --- cleanup -------------------------------------------------------------------------
async def clean(server, job: Job) -> tuple[list[str], list[str]]:
    """Remove what the job made: its folders (uploads, outputs, keys), the previews its own
    prompts reported, and those prompts' history entries. A history entry under one of the
    job's prompt ids that does not hold the graph the job queued is left alone, with its
    files. Returns (removed, failed)."""
    queue = server.prompt_queue
    removed, failed = [], []
    for prompt_id, digest in job.prompts.items():
        await _wait_until_not_queued(queue, prompt_id)
        entry = queue.get_history(prompt_id=prompt_id).get(prompt_id)
        if entry is None:
            continue
        prompt = entry.get("prompt")
        if not (isinstance(prompt, (list, tuple)) and len(prompt) > 2 and prompt_digest(prompt[2]) == digest):
            failed.append(f"prompt {prompt_id}: its history entry is not the job's graph (left alone)")
            continue
        for path in _previews(entry):
            _remove(path, removed, failed)
        queue.delete_history_item(prompt_id)
    for root in roots().values():
        folder = Path(root) / JOBS_FOLDER / job.folder
        try:
            removed += remove_tree_no_follow(folder)
        except OSError as exc:
            failed.append(f"{folder.name}: {exc.strerror or exc}")
    return removed, failed


def _remove(path: Path, removed: list[str], failed: list[str]) -> None:
    try:
        if remove_file_no_follow(path):
            removed.append(path.name)
    except OSError as exc:
        failed.append(f"{path.name}: {exc.strerror or exc}")


async def _wait_until_not_queued(queue, prompt_id: str) -> None:
    deadline = asyncio.get_running_loop().time() + QUEUE_WAIT_S
    while asyncio.get_running_loop().time() < deadline:
        running, pending = queue.get_current_queue_volatile()
        if not any(item[1] == prompt_id for item in (*running, *pending)):
            return
        await asyncio.sleep(0.1)


def _previews(entry: dict) -> list[Path]:
    """The temp files (previews) the job's prompt reported writing, made after it started.
    The prompt's other files lie in the job's own folder."""
    started = next((data.get("timestamp") for kind, data in (entry.get("status") or {}).get("messages", [])
                    if kind == "execution_start" and isinstance(data, dict)), None)
    if not isinstance(started, (int, float)):
        return []
    temp = Path(folder_paths.get_temp_directory())
    paths = []
    for node_output in (entry.get("outputs") or {}).values():
        for records in node_output.values() if isinstance(node_output, dict) else []:
            for record in records if isinstance(records, list) else []:
                if isinstance(record, dict) and record.get("type") == "temp":
                    path = _plain_child(temp, record.get("subfolder", ""), record.get("filename"))
                    if path is not None and _made_since(path, started / 1000.0):
                        paths.append(path)
    return paths


def _plain_child(root: Path, sub, name) -> Path | None:
    if not (isinstance(sub, str) and isinstance(name, str)) or not name or sub:
        return None  # previews lie in temp/ itself
    if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        return None
    return root / name


def _made_since(path: Path, started: float) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_mtime >= started - 1.0
