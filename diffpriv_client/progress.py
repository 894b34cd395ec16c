"""The progress line of a batch, readable by a person: per running photo, the stage (the
node now running), its step k/N, the photo's elapsed time and the stage's remaining time.

Fed by the websocket's events (which node runs, its step), read on a timer: the elapsed
time moves between events too, so a long first step does not look like a hang. Pure
bookkeeping over a clock, so it is tested without a server.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

PREFIX = "DiffPrivacy"


def stage_title(graph: dict, node_id: str) -> str:
    """A node's name for people: its title in the workflow, else its class in words
    (``DiffPrivacyMSIInversion`` -> ``MSI Inversion``)."""
    node = graph.get(str(node_id)) or {}
    title = (node.get("_meta") or {}).get("title")
    if isinstance(title, str) and title.strip():
        return title.strip()
    name = str(node.get("class_type") or f"node {node_id}").removeprefix(PREFIX)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)


def clock_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


@dataclass
class _Running:
    started: float  # when the server started on this photo
    stage: str = "starting"
    stage_started: float = 0.0
    step: int = 0
    steps: int = 0
    step_at: float = 0.0  # when the last step was reported


class ProgressBoard:
    """What each running photo is doing, as one line."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.running: dict[str, _Running] = {}
        self.durations: list[float] = []  # of the photos done so far: the estimate for the others

    def stage(self, name: str, title: str) -> None:
        """``name``'s server started running the node ``title`` (its first node starts the clock)."""
        now = self.clock()
        job = self.running.setdefault(name, _Running(started=now))
        job.stage, job.stage_started, job.step, job.steps = title, now, 0, 0

    def step(self, name: str, step: int, steps: int) -> None:
        now = self.clock()
        job = self.running.setdefault(name, _Running(started=now, stage_started=now))
        if step < job.step:  # a new loop in the same node (one per image of its batch)
            job.stage_started = now
        job.step, job.steps, job.step_at = step, steps, now

    def finished(self, name: str) -> None:
        job = self.running.pop(name, None)
        if job is not None:
            self.durations.append(self.clock() - job.started)

    def forget(self, name: str) -> None:
        """The photo goes back to the queue: it did not finish, so it says nothing of the time
        a photo takes."""
        self.running.pop(name, None)

    def line(self) -> str:
        now = self.clock()
        return "; ".join(self._describe(name, job, now) for name, job in self.running.items())

    def _describe(self, name: str, job: _Running, now: float) -> str:
        elapsed = now - job.started
        text = f"{name}: {job.stage}"
        if job.steps:
            text += f" {job.step}/{job.steps}"
        text += f", {clock_text(elapsed)} elapsed"
        stage_left = None
        if 0 < job.step < job.steps:
            per_step = (job.step_at - job.stage_started) / job.step
            stage_left = max(per_step * (job.steps - job.step) - (now - job.step_at), 0.0)
        if self.durations:  # a photo like this one took that long: the rest of this one
            photo_left = max(sum(self.durations) / len(self.durations) - elapsed, stage_left or 0.0)
            text += f", photo ~{clock_text(photo_left)} left"
        elif stage_left is not None:
            text += f", stage ~{clock_text(stage_left)} left"
        return text
