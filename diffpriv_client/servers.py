"""The ComfyUI servers a batch runs on: what each one runs for us, and which gets the next job.

One websocket per server, read in the caller's thread: ComfyUI keeps one socket per
client id, so every prompt we queue on a server reports to that one socket. /history is
the truth about whether a prompt finished (the websocket only says when to look), which
also covers prompts that finished while the socket was down.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import requests
import websocket

from .comfy_http import ComfyClient

# Messages after which /history holds the prompt's outcome.
DONE_MESSAGES = ("execution_success", "execution_error", "execution_interrupted")
# Look at /history for every prompt this often even without a message (socket down).
HISTORY_CHECK_S = 2.0
# A server that refuses connections this long is given up, and its jobs go elsewhere.
DEAD_AFTER_S = 10.0
# A prompt neither queued nor in the history this long is gone (deleted by another client,
# or the server restarted): the job fails instead of waiting for ever.
VANISHED_AFTER_S = 10.0
# The longest a prompt may take from being queued to its end, by default (--prompt-timeout).
PROMPT_TIMEOUT_S = 6 * 3600.0


@dataclass
class Progress:
    job: Any
    value: int
    max: int


@dataclass
class Executing:
    """The server started running this node of the job's graph."""
    job: Any
    node: str


@dataclass
class Finished:
    job: Any
    prompt_id: str
    entry: dict


@dataclass
class GaveUp:
    """The command stopped waiting for this prompt (gone from the server, or too long)."""
    job: Any
    prompt_id: str
    reason: str


@dataclass
class Lost:
    """The server stopped answering; these jobs never finished there."""
    jobs: list


class Server:
    def __init__(self, url: str, max_in_flight: int = 8, dead_after_s: float = DEAD_AFTER_S,
                 token: str | None = None, prompt_timeout_s: float = PROMPT_TIMEOUT_S):
        self.client = ComfyClient(url, token=token)
        self.prompt_timeout_s = prompt_timeout_s
        self._queued_at: dict[str, float] = {}  # prompt id -> when we queued it
        self._missing_since: dict[str, float] = {}  # prompt id -> first seen neither queued nor done
        self.url = self.client.base_url
        self.max_in_flight = max_in_flight
        self.dead_after_s = dead_after_s
        self.in_flight: dict[str, Any] = {}  # prompt id -> job
        self.dead = False
        self._ws: websocket.WebSocket | None = None
        self._unreachable_since: float | None = None
        self._last_history_check = 0.0

    def __repr__(self) -> str:
        return f"Server({self.url})"

    def has_room(self) -> bool:
        return not self.dead and len(self.in_flight) < self.max_in_flight

    def load(self) -> int:
        """The server's queue (all clients) plus the prompts we have in flight there."""
        return self.client.queue_remaining() + len(self.in_flight)

    def submit(self, job, graph: dict, server_job=None) -> str:
        """Queue ``graph`` under a new prompt id of ours (``server_job``: the job whose
        files it uses)."""
        self._connect()  # before queueing, so no progress message is missed
        prompt_id = self.client.queue(graph, job=server_job)
        self.in_flight[prompt_id] = job
        self._queued_at[prompt_id] = time.monotonic()
        return prompt_id

    def poll(self, timeout: float) -> list:
        """Executing, Progress, Finished and Lost events since the last call, waiting at most
        ``timeout``."""
        if self.dead:
            return []
        self._connect()
        if self._ws is None:
            time.sleep(timeout)  # no socket to wait on: pace the /history checks instead
        events, done = self._read_messages(timeout)
        due = time.monotonic() - self._last_history_check > HISTORY_CHECK_S
        to_check = list(self.in_flight) if due else list(done)
        if not to_check:
            return events
        try:
            events += self._collect(to_check)
            self._unreachable_since = None
        except (requests.ConnectionError, requests.Timeout):
            events += self._note_unreachable()
        return events

    def cancel_all(self, settle_s: float = 60.0) -> None:
        """Withdraw everything we queued here (the user stopped the command), then wait (up
        to ``settle_s``) until the server has let go of it: an interrupt only takes effect
        at the prompt's next check, and a prompt cleaned up while it still runs would write
        its outputs and history after the cleanup."""
        if self.in_flight and not self.dead:
            ours = set(self.in_flight)
            try:
                self.client.cancel(list(ours))
                deadline = time.monotonic() + settle_s
                while ours & self.client.queued_prompt_ids() and time.monotonic() < deadline:
                    time.sleep(0.2)
            except requests.RequestException:
                pass  # nothing left to cancel on a server that is gone
        self.in_flight = {}

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    # --- internals -------------------------------------------------------------------
    def _connect(self) -> None:
        if self._ws is None:
            try:
                self._ws = self.client.connect_websocket(timeout=5.0)
            except (OSError, websocket.WebSocketException):
                self._ws = None

    def _read_messages(self, timeout: float) -> tuple[list, set[str]]:
        events, done = [], set()
        deadline = time.monotonic() + timeout
        while self._ws is not None and time.monotonic() < deadline:
            self._ws.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                raw = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                break
            except (OSError, websocket.WebSocketException):
                self.close()
                break
            if not isinstance(raw, str):
                continue  # binary preview frames
            msg = json.loads(raw)
            data = msg.get("data") or {}
            job = self.in_flight.get(data.get("prompt_id"))
            if job is None:
                continue
            if msg.get("type") == "progress":
                events.append(Progress(job, int(data["value"]), int(data["max"])))
            elif msg.get("type") == "executing" and data.get("node") is not None:
                events.append(Executing(job, str(data["node"])))
            elif msg.get("type") in DONE_MESSAGES:
                done.add(data["prompt_id"])
        return events, done

    def _collect(self, prompt_ids: list[str]) -> list:
        self._last_history_check = time.monotonic()
        events, unfinished = [], []
        for prompt_id in prompt_ids:
            entry = self.client.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                events.append(Finished(self._drop(prompt_id), prompt_id, entry))
            else:
                unfinished.append(prompt_id)
        return events + self._given_up(unfinished)

    def _given_up(self, prompt_ids: list[str]) -> list:
        """GaveUp for the prompts that took too long (withdrawn) or are gone from the server."""
        now, events = time.monotonic(), []
        for prompt_id in [p for p in prompt_ids if now - self._queued_at.get(p, now) > self.prompt_timeout_s]:
            self.client.cancel([prompt_id])
            events.append(GaveUp(self._drop(prompt_id), prompt_id, f"the prompt did not finish within "
                                 f"{self.prompt_timeout_s:.0f} s (--prompt-timeout): withdrawn"))
        queued = self.client.queued_prompt_ids() if any(p in self.in_flight for p in prompt_ids) else set()
        for prompt_id in [p for p in prompt_ids if p in self.in_flight]:
            if prompt_id in queued:
                self._missing_since.pop(prompt_id, None)
            elif now - self._missing_since.setdefault(prompt_id, now) > VANISHED_AFTER_S:
                events.append(GaveUp(self._drop(prompt_id), prompt_id, "the prompt is gone from the server (neither "
                                     "queued nor in its history: another client deleted it, or the server restarted)"))
        return events

    def _drop(self, prompt_id: str):
        self._queued_at.pop(prompt_id, None)
        self._missing_since.pop(prompt_id, None)
        return self.in_flight.pop(prompt_id)

    def _note_unreachable(self) -> list:
        now = time.monotonic()
        self._unreachable_since = self._unreachable_since or now
        if now - self._unreachable_since < self.dead_after_s:
            return []
        return [self.give_up()]

    def give_up(self) -> Lost:
        """Stop using this server; its unfinished jobs are returned for the others."""
        self.dead = True
        self.close()
        jobs, self.in_flight = list(self.in_flight.values()), {}
        return Lost(jobs)


def choose_server(servers: list[Server]) -> Server | None:
    """The server with room for one more prompt and the shortest queue (first listed wins a tie).

    A server that does not answer is skipped here; poll() decides when it is dead.
    """
    best, best_load = None, None
    for server in servers:
        if not server.has_room():
            continue
        try:
            load = server.load()
        except requests.RequestException:
            continue
        if best_load is None or load < best_load:
            best, best_load = server, load
    return best
