"""What the `diffpriv` command and the pack's routes on a ComfyUI server agree on (torch-free).

A server is shared: any client can read ``/queue``, ``/history`` and ``/view``, and queue
prompts under any id. So the command works inside a *job* the pack's routes give it: an
unguessable capability (the job token, sent only in a request header or in a prompt's
``extra_data``, which the pack strips before the prompt is queued) and a public folder
name. The job's uploads and outputs live in ``diffpriv-jobs/<folder>/`` of the input,
output and key folders, which only requests and prompts carrying the job's token may
read or use, and only the job's own cleanup removes.
"""
from __future__ import annotations

import hashlib
import json
import posixpath

JOBS_FOLDER = "diffpriv-jobs"  # input/, output/ and models/diffprivacy_keys/: one folder per job
JOB_HEADER = "X-DiffPrivacy-Job"  # the job token, on requests about the job's files and prompts
JOB_EXTRA = "diffprivacy_job"  # the job token in a prompt's extra_data (removed by the pack)
TOKEN_ENV = "DIFFPRIV_SERVER_TOKEN"  # a server started with it answers only requests carrying it
TOKEN_COOKIE = "diffpriv_token"  # the same token, for a browser (set by /?diffpriv_token=...)
MAX_UPLOADS_PER_JOB = 16  # so a prompt of several photos holds at most this many


def prompt_digest(graph) -> str:
    """The SHA-256 of a prompt's graph in one canonical JSON form: the command compares the
    graph a history entry holds with the one it queued, and the pack the one it ran with
    the one the job queued."""
    text = json.dumps(graph, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def job_folders_named(value) -> set[str]:
    """The job folders a prompt input names (``diffpriv-jobs/<folder>/...`` anywhere in a
    path, after normalising it; an input that names the jobs folder without a folder
    after it names the empty one, which no job has)."""
    if isinstance(value, list):
        return set().union(*(job_folders_named(v) for v in value)) if value else set()
    if isinstance(value, dict):
        return set().union(*(job_folders_named(v) for v in value.values())) if value else set()
    if not isinstance(value, str) or JOBS_FOLDER not in value:
        return set()
    parts = posixpath.normpath(value.replace("\\", "/")).split("/")
    found = set()
    for n, part in enumerate(parts):
        if part.strip() == JOBS_FOLDER or part.startswith(JOBS_FOLDER + " "):
            found.add(parts[n + 1].split(" [")[0] if n + 1 < len(parts) else "")
    return found or {""}  # the name appears, but not as a folder: refused unless it is the job's
