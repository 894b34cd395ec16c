"""Embedding Scheduler: key-E as a standard CONDITIONING with per-stage timestep ranges."""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from diffpriv_core.schedule import T, embedding_schedule
from diffpriv_core.tasks import TASKS, preset_value

from .types import KeyE

NAME = "Embedding Scheduler"


def percent_of(timestep: float) -> float:
    """ComfyUI's start/end percent for a timestep: percent_to_sigma maps p to t = (1-p)*999."""
    return min(max(1.0 - timestep / (T - 1), 0.0), 1.0)


def scheduled_conditioning(keys_e: list, tau: float) -> list:
    """One CONDITIONING entry per range of Eq. 16. Range bounds sit half a step outside the
    integer timesteps, so every timestep falls in exactly one entry."""
    conditioning = []
    for stage, lo, hi in embedding_schedule(tau):
        cond = torch.cat([k.condition(stage) for k in keys_e]).float().clone()
        conditioning.append([cond, {"start_percent": percent_of(hi + 0.5), "end_percent": percent_of(lo - 0.5)}])
    return conditioning


class EmbeddingScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyEmbeddingScheduler",
            display_name="Embedding Scheduler (Diff-Privacy)",
            category="Diff-Privacy/protect",
            description="key-E as CONDITIONING: C^{t//100} above tau*T, the empty prompt below. "
                        "Works with any sampler (KSampler, SamplerCustom, the Guided DDIM Sampler).",
            inputs=[
                KeyE.Input("key_e", tooltip="from MSI Inversion or Load Privacy Key; several give one row per image"),
                io.Combo.Input("preset", options=[*TASKS, "custom"], default="anonymize",
                               tooltip="anonymize: tau 0.4; hide: tau 0.6; for a tau left at -1. custom: the tau below"),
                io.Float.Input("tau", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="key-E conditions t > tau * 1000, the empty prompt below; -1 = the preset's"),
            ],
            outputs=[io.Conditioning.Output(display_name="positive",
                                            tooltip="C^{t//100} above tau*T, the empty prompt below, as "
                                                    "timestep ranges any sampler honours")],
        )

    @classmethod
    def execute(cls, key_e, preset, tau) -> io.NodeOutput:
        if not key_e:
            raise ValueError(f"{NAME} got an empty key-E list")
        return io.NodeOutput(scheduled_conditioning(key_e, preset_value(NAME, preset, "tau", tau, -1.0)))
