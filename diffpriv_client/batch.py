"""Run one prompt per job over one or more ComfyUI servers and download what each produced.

All jobs are queued up front, at most ``max_in_flight`` per server at a time, each next
one to the server with the shortest queue. A failing prompt is recorded and the rest go
on; the jobs of a server that dies are queued again on the others.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import requests
from tqdm import tqdm

from .comfy_http import ComfyClient, PromptFailed, PromptRejected, PromptResult
from .progress import ProgressBoard, stage_title
from .servers import Executing, Finished, Lost, Progress, Server, choose_server
from .summary import Summary

POLL_S = 0.2
REDRAW_S = 1.0  # the progress line is redrawn this often even without news, so its clocks move


@dataclass(eq=False)
class Job:
    name: str  # the output folder DIR/<name>/ and the summary entry
    source: Path
    # Uploads what the job needs to this server and returns the filled-in graph.
    build: Callable[[ComfyClient], dict]


@dataclass
class Downloaded:
    outputs: list[Path]
    keys: list[Path]


def run_batch(jobs: list[Job], servers: list[Server], summary: Summary, forget_prompts: bool = False) -> None:
    """Run every job; each result lands in ``summary`` as soon as it is known.

    ``forget_prompts`` deletes each prompt from the server's /history once downloaded, for
    graphs that carry a passphrase.
    """
    _Batch(jobs, servers, summary, forget_prompts).run()


class _Batch:
    def __init__(self, jobs: list[Job], servers: list[Server], summary: Summary, forget_prompts: bool):
        self.pending = deque(jobs)
        self.servers = servers
        self.summary = summary
        self.forget_prompts = forget_prompts
        self.running: dict[Job, Server] = {}
        self.graphs: dict[Job, dict] = {}  # what each running job's server runs: names its stages
        self.board = ProgressBoard()
        self.bar = tqdm(total=len(jobs), unit="image", dynamic_ncols=True)
        self.drawn = 0.0

    def run(self) -> None:
        try:
            while self.pending or self.running:
                self._dispatch()
                live = [s for s in self.servers if not s.dead]
                if not live:
                    self._fail_pending("no server left: " + ", ".join(s.url for s in self.servers)
                                       + " stopped answering")
                    return
                for server in live:
                    for event in server.poll(POLL_S / len(live)):
                        self._handle(server, event)
                if time.monotonic() - self.drawn >= REDRAW_S:
                    self._draw()
        except KeyboardInterrupt:
            # Leave no orphans running on the servers; the summary already has what finished.
            for server in self.servers:
                server.cancel_all()
            raise
        finally:
            self.bar.set_postfix_str("", refresh=True)  # no finished photo's step left on screen
            self.bar.close()
            for server in self.servers:
                server.close()

    def _dispatch(self) -> None:
        while self.pending:
            server = choose_server(self.servers)
            if server is None:
                return
            job = self.pending.popleft()
            try:
                graph = job.build(server.client)
                server.submit(job, graph)
                self.running[job] = server
                self.graphs[job] = graph
            except PromptRejected as exc:
                self._fail(job, server, f"the server refused the workflow: {exc}")
            except requests.ConnectionError:
                self.pending.appendleft(job)
                self._requeue(server, server.give_up().jobs)
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                self._fail(job, server, f"{type(exc).__name__}: {exc}")

    def _handle(self, server: Server, event) -> None:
        if isinstance(event, Executing):
            self.board.stage(event.job.name, stage_title(self.graphs.get(event.job, {}), event.node))
            self._draw()
        elif isinstance(event, Progress):
            self.board.step(event.job.name, event.value, event.max)
            self._draw()
        elif isinstance(event, Finished):
            self.board.finished(event.job.name)
            del self.running[event.job]
            self.graphs.pop(event.job, None)
            self._finish(server, event)
            self._draw()
        elif isinstance(event, Lost):
            self._requeue(server, event.jobs)

    def _draw(self) -> None:
        self.bar.set_postfix_str(self.board.line(), refresh=True)
        self.drawn = time.monotonic()

    def _finish(self, server: Server, event: Finished) -> None:
        job = event.job
        try:
            result = ComfyClient.result_of(event.prompt_id, event.entry)
            files = download(server.client, result, self.summary.out_dir / job.name)
        except PromptFailed as exc:
            self._fail(job, server, exc.message or "the prompt failed")
            return
        except requests.ConnectionError:
            self.pending.appendleft(job)  # finished, but the server died before we had the files
            return
        finally:
            if self.forget_prompts:
                _forget(server, event.prompt_id)
        self.summary.record(job.name, job.source, "ok", files.outputs, files.keys,
                            seconds=prompt_seconds(event.entry), server=server.url)
        self.bar.update(1)

    def _requeue(self, server: Server, jobs: list[Job]) -> None:
        for job in jobs:
            self.running.pop(job, None)
            self.graphs.pop(job, None)
            self.board.forget(job.name)
            self.pending.appendleft(job)
        self.bar.write(f"{server.url} stopped answering; {len(jobs)} unfinished job(s) go to the other servers")

    def _fail_pending(self, message: str) -> None:
        while self.pending:
            self._fail(self.pending.popleft(), None, message)

    def _fail(self, job: Job, server: Server | None, message: str) -> None:
        self.summary.record(job.name, job.source, "failed", server=server.url if server else None, error=message)
        self.bar.write(f"{job.name}: failed: {message}")
        self.bar.update(1)


def _forget(server: Server, prompt_id: str) -> None:
    try:
        server.client.delete_history([prompt_id])
    except requests.RequestException:
        pass  # the server is gone, and its history with it


def download(client: ComfyClient, result: PromptResult, folder: Path) -> Downloaded:
    """Saved pictures ('images') and key files ('diffprivacy_keys') in the output folder.

    Previews (type 'temp') are skipped; key files are made readable by their owner only.
    """
    folder.mkdir(parents=True, exist_ok=True)
    got = Downloaded([], [])
    for node_id in result.outputs:
        for kind, into, mode in (("images", got.outputs, 0o644), ("diffprivacy_keys", got.keys, 0o600)):
            for record in result.files(node_id, kind):
                if record.get("type") == "output":
                    into.append(_write(folder / record["filename"], client.view(record), mode))
    return got


def _write(path: Path, data: bytes, mode: int) -> Path:
    tmp = path.with_name(f".{path.name}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path


def prompt_seconds(entry: dict) -> float | None:
    """Time the server spent on the prompt (execution_start to its end), not time in the queue."""
    stamps = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])}
    start = stamps.get("execution_start")
    end = next((stamps[k] for k in ("execution_success", "execution_error", "execution_interrupted")
                if stamps.get(k) is not None), None)
    return None if start is None or end is None else (end - start) / 1000.0
