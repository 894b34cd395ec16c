"""A small client for ComfyUI's HTTP API and websocket.

Used by the `diffpriv` command and by the end-to-end tests, so both speak to the
server exactly the same way: queue an API-format graph on ``/prompt``, follow it
on ``/ws``, read the result from ``/history`` and download files from ``/view``.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests
import websocket

from diffpriv_core.job_protocol import JOB_EXTRA, JOB_HEADER, TOKEN_ENV


class PackRouteMissing(RuntimeError):
    """The server's Diff-Privacy pack predates the routes the command needs."""


class PromptRejected(RuntimeError):
    """The server refused a graph at validation time (``node_errors``)."""


class PromptFailed(RuntimeError):
    """The graph ran and one of its nodes raised; ``message`` is the node's error text."""

    def __init__(self, message: str, node_type: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.node_type = node_type
        self.details = details or {}


@dataclass(frozen=True)
class ServerJob:
    """A job on a server (the pack's routes): ``token`` is its capability, never shown;
    ``folder`` where its uploads and outputs live (``diffpriv-jobs/<name>``)."""

    token: str = field(repr=False)
    folder: str


@dataclass
class PromptResult:
    prompt_id: str
    outputs: dict[str, Any]
    status: dict[str, Any] = field(default_factory=dict)

    def files(self, node_id: str, kind: str = "images") -> list[dict]:
        """The file records (filename, subfolder, type) a node wrote under ``kind``."""
        return list(self.outputs.get(str(node_id), {}).get(kind, []))


class ComfyClient:
    def __init__(self, base_url: str, timeout: float = 30.0, token: str | None = None):
        """``token``: the server's own token (DIFFPRIV_SERVER_TOKEN; default: that variable
        of this process, if set), sent with every request."""
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self.http = requests.Session()
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.auth_headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http.headers.update(self.auth_headers)
        self.live_jobs: list[ServerJob] = []  # started, not yet cleaned: the websocket shows one

    # --- plain endpoints -------------------------------------------------------------
    def get(self, path: str, **params) -> Any:
        r = self.http.get(f"{self.base_url}{path}", params=params, timeout=self.timeout)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, payload: dict | None = None) -> requests.Response:
        r = self.http.post(f"{self.base_url}{path}", json=payload or {}, timeout=self.timeout)
        r.raise_for_status()
        return r

    def is_up(self) -> bool:
        try:
            self.get("/system_stats")
            return True
        except (requests.RequestException, ValueError):
            return False

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue_remaining(self) -> int:
        return int(self.get("/prompt")["exec_info"]["queue_remaining"])

    def interrupt(self) -> None:
        self.post("/interrupt")

    def cancel(self, prompt_ids: list[str]) -> None:
        """Drop these prompts from the queue and stop the one running, if it is one of them
        (a targeted interrupt leaves other clients' prompts alone)."""
        self.post("/queue", {"delete": list(prompt_ids)})
        for prompt_id in prompt_ids:
            self.post("/interrupt", {"prompt_id": prompt_id})

    def queued_prompt_ids(self) -> set[str]:
        """The ids of the prompts running or waiting in the server's queue (entries that are
        not ComfyUI's ``[number, prompt_id, ...]`` are ignored)."""
        queue = self.get("/queue")
        if not isinstance(queue, dict):
            return set()
        return {item[1] for key in ("queue_running", "queue_pending") for item in queue.get(key) or []
                if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str)}

    def free(self, unload_models: bool = True) -> None:
        self.post("/free", {"unload_models": unload_models, "free_memory": True})

    def upload_image(self, path: str | Path, subfolder: str = "", overwrite: bool = True,
                     name: str | None = None) -> str:
        """Upload a picture to the server's input folder (as ``name``, default its own);
        returns the name nodes refer to."""
        path = Path(path)
        with path.open("rb") as fh:
            r = self.http.post(
                f"{self.base_url}/upload/image",
                files={"image": (name or path.name, fh)},
                data={"subfolder": subfolder, "overwrite": "true" if overwrite else "false"},
                timeout=self.timeout,
            )
        r.raise_for_status()
        info = r.json()
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def start_job(self) -> ServerJob:
        """A new job on the server (the pack's route): its uploads, prompts and cleanup."""
        r = self.http.post(f"{self.base_url}/diffprivacy/jobs", json={"client_id": self.client_id},
                           timeout=self.timeout)
        if r.status_code == 404:
            raise PackRouteMissing(f"{self.base_url} has no /diffprivacy/jobs route: update the Diff-Privacy pack "
                                   "on that server")
        r.raise_for_status()
        body = r.json()
        self.live_jobs.append(ServerJob(body["job"], body["folder"]))
        return self.live_jobs[-1]

    def upload_to_job(self, job: ServerJob, kind: str, data: bytes, suffix: str = "") -> str:
        """Store a picture (``kind`` "image") or a key file ("key") in the job's folder on the
        server, under a new name it chooses; returns the name Load Image or Load Privacy Key
        knows it by."""
        r = self.http.post(f"{self.base_url}/diffprivacy/jobs/upload", files={kind: (f"upload{suffix}", data)},
                           headers={JOB_HEADER: job.token}, timeout=self.timeout)
        if r.status_code in (400, 403, 413, 507):
            raise ValueError(f"the server refused the upload: {_error_of(r)}")
        r.raise_for_status()
        return r.json()["name"]

    def cleanup_job(self, job: ServerJob) -> dict:
        """Remove what the job made from the server: its uploads and outputs, its prompts'
        previews and history (the pack's route). Returns {"removed": [...], "failed": [...]}."""
        r = self.http.post(f"{self.base_url}/diffprivacy/cleanup", headers={JOB_HEADER: job.token},
                           timeout=self.timeout + 60)
        if job in self.live_jobs:
            self.live_jobs.remove(job)
        if r.status_code == 403:
            return {"removed": [], "failed": [_error_of(r)]}
        r.raise_for_status()
        return r.json()

    def view(self, file_record: dict, job: ServerJob | None = None) -> bytes:
        r = self.http.get(
            f"{self.base_url}/view",
            params={k: file_record.get(k, "") for k in ("filename", "subfolder", "type")},
            headers={JOB_HEADER: job.token} if job is not None else None,
            timeout=self.timeout,
        )
        r.raise_for_status()
        return r.content

    # --- prompts ---------------------------------------------------------------------
    def queue(self, graph: dict, prompt_id: str | None = None, job: ServerJob | None = None) -> str:
        """Queue ``graph`` under ``prompt_id`` (default: a new random one, so that the id is
        ours before the server sees it); ``job``: the job whose files it uses."""
        prompt_id = prompt_id or uuid.uuid4().hex
        payload = {"prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id}
        if job is not None:
            payload["extra_data"] = {JOB_EXTRA: job.token}
        r = self.http.post(f"{self.base_url}/prompt", json=payload, timeout=self.timeout)
        if r.status_code == 400:
            raise PromptRejected(json.dumps(r.json(), indent=1))
        if r.status_code == 403:
            raise PromptRejected(_error_of(r))
        r.raise_for_status()
        body = r.json()
        if body.get("node_errors"):
            raise PromptRejected(json.dumps(body["node_errors"], indent=1))
        if body.get("prompt_id") != prompt_id:
            raise PromptRejected(f"the server queued the prompt under another id ({body.get('prompt_id')!r})")
        return prompt_id

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def delete_history(self, prompt_ids: list[str]) -> None:
        self.post("/history", {"delete": list(prompt_ids)})

    def websocket_url(self) -> str:
        return f"{self.base_url.replace('http', 'ws', 1)}/ws?clientId={self.client_id}"

    def connect_websocket(self, timeout: float) -> websocket.WebSocket:
        """Our client id's websocket; while we have jobs on the server, it shows one's token
        (the pack gives a job's client id's session only to its holder)."""
        headers = dict(self.auth_headers, **({JOB_HEADER: self.live_jobs[-1].token} if self.live_jobs else {}))
        return websocket.create_connection(self.websocket_url(), timeout=timeout,
                                           header=[f"{k}: {v}" for k, v in headers.items()])

    def wait(
        self,
        prompt_id: str,
        timeout: float = 600.0,
        on_progress: Callable[[dict], None] | None = None,
    ) -> PromptResult:
        """Block until the prompt finishes; raise PromptFailed with the node's error text.

        Progress comes from the websocket; completion is confirmed through /history, which
        also covers prompts that finished before we connected.
        """
        deadline = time.monotonic() + timeout
        ws = None
        try:
            ws = self.connect_websocket(timeout=2.0)
        except (OSError, websocket.WebSocketException):
            ws = None  # fall back to polling /history only
        try:
            while time.monotonic() < deadline:
                entry = self.history(prompt_id)
                if entry is not None and entry.get("status", {}).get("completed") is not None:
                    return self.result_of(prompt_id, entry)
                if ws is None:
                    time.sleep(0.25)
                    continue
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                except (OSError, websocket.WebSocketException):
                    ws = None
                    continue
                if isinstance(raw, str):
                    msg = json.loads(raw)
                    data = msg.get("data", {})
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    if on_progress is not None and msg.get("type") == "progress":
                        on_progress(data)
            raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
        finally:
            if ws is not None:
                ws.close()

    def run(self, graph: dict, timeout: float = 600.0, **kw) -> PromptResult:
        return self.wait(self.queue(graph), timeout=timeout, **kw)

    @staticmethod
    def result_of(prompt_id: str, entry: dict) -> PromptResult:
        """The outputs of a finished /history entry; PromptFailed with the node's error text."""
        status = entry.get("status", {})
        if status.get("status_str") == "error":
            for kind, data in status.get("messages", []):
                if kind == "execution_error":
                    raise PromptFailed(data.get("exception_message", "").strip(), data.get("node_type"), data)
                if kind == "execution_interrupted":
                    raise PromptFailed("interrupted", data.get("node_type"), data)
            raise PromptFailed("the prompt failed without an error message", None, status)
        return PromptResult(prompt_id, entry.get("outputs", {}), status)


def _error_of(response: requests.Response) -> str:
    """The pack's error message of a refused request, or its status."""
    try:
        return str(response.json().get("error") or response.status_code)
    except ValueError:
        return f"HTTP {response.status_code}"
