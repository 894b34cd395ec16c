"""The paper's two tasks and every setting that differs between them, in one table.

Where each value comes from: S_ns, tau, the DDIM steps, the anonymization's 4 samples and
lambda_t (1; hide 1.5 above t = 600, 2.5 below) are the reference code's (its notebooks
Anonymization.ipynb and "Visual identity information hiding.ipynb"); the paper gives no
lambda. key-I inverts on the task's grid, as the reference code does, but by BDIA, which is
ours: the paper (and its code) use plain DDIM inversion, which recovery retraces only
approximately; BDIA's recovery retraces the inversion exactly, one UNet call per step
(BENCHMARKS.md, inversion_modes). Protection re-runs the last S_ns x steps of the grid, so the noise starts at that part's first timestep: t = 581 for
anonymization (30 of 50 steps) and t = 791 for hiding (80 of 100), not at S_ns * T = 600 and
800 (schedule.Grid.tail).

Anonymization makes each face a different person (and the batch's faces different from
each other); identity hiding makes it look like someone else to people while recognisers
still match it. The Embedding Scheduler (tau), the Identity Energy Guidance (energy and
lambda_t), the Guided DDIM Sampler (S_ns, steps, samples), DDIM Inversion Key (key-I grid)
and the diffpriv command all read their settings here. A new task is one more entry in
TASKS (and, for a new energy, one more case in energy.energy).

Imports no torch: the HTTP client reads this table too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

log = logging.getLogger("diffprivacy")


@dataclass(frozen=True)
class LambdaSchedule:
    """lambda_t, the guidance scale of Algorithm 1: ``early`` for t > ``switch_t``, ``late``
    at and below it. All zero = no guidance. A schedule is anything with this call,
    ``is_off`` and ``scaled``; the correction asks it for each step's scale."""

    early: float
    late: float
    switch_t: int = 600

    def __call__(self, t: int) -> float:
        return self.early if t > self.switch_t else self.late

    @property
    def is_off(self) -> bool:
        return self.early == 0 and self.late == 0

    def scaled(self, factor: float) -> "LambdaSchedule":
        """The same schedule with every lambda multiplied by ``factor``."""
        return replace(self, early=self.early * factor, late=self.late * factor)


@dataclass(frozen=True)
class KeyIGrid:
    """How key-I inverts the original: DDIM steps, inversion mode and (fixed_point mode
    only) refinements per step.

    ``bdia`` is ours, not the paper's: the paper inverts by plain DDIM (``ddim``), which
    recovery retraces only approximately. BDIA costs one UNet call per step (fixed_point
    costs 1 + refine) and its recovery retraces the inversion to float rounding, in
    steps - 1 calls (recovery.py)."""

    steps: int = 50
    mode: str = "bdia"  # or "fixed_point", "ddim" (recovery.MODES)
    refine: int = 4  # fixed_point mode's refinements per step


@dataclass(frozen=True)
class Task:
    name: str  # also the energy Algorithm 1 descends (energy.energy)
    strength: float  # S_ns: the fraction of the DDIM grid that is re-run
    tau: float  # key-E conditions t > tau * T, the unconditional embedding below (Eq. 16)
    steps: int  # DDIM grid steps
    samples: int  # independent noises of one image, guided together
    lambdas: LambdaSchedule
    key_i: KeyIGrid = KeyIGrid()


TASKS = {
    "anonymize": Task("anonymize", strength=0.6, tau=0.4, steps=50, samples=4, lambdas=LambdaSchedule(1.0, 1.0)),
    # Hiding samples on a 100-step grid; its key-I inverts on the same grid.
    "hide": Task("hide", strength=0.8, tau=0.6, steps=100, samples=1, lambdas=LambdaSchedule(1.5, 2.5),
                 key_i=KeyIGrid(steps=100)),
}


def task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def preset_value(node: str, preset: str, name: str, value, unset, setting: str | None = None):
    """Input ``name`` of a node with a task preset ("anonymize", "hide" or "custom"): a value
    the user set is used as set (and said so when it differs from the preset's); ``unset``,
    the input's "the preset's" value, takes the task's ``setting`` (default: ``name``)."""
    if preset == "custom":
        if value == unset:
            raise ValueError(f"{node}: preset custom takes '{name}' from its input, which is left at {unset} "
                             "(= the preset's): set it, or choose a task preset")
        return value
    preset_setting = getattr(task(preset), setting or name)
    if value == unset:
        return preset_setting
    if value != preset_setting:
        log.warning("Diff-Privacy %s: %s is set to %s, the %s preset's is %s: using %s", node, name, value, preset,
                    preset_setting, value)
    return value
