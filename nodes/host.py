"""The few places where the pack touches ComfyUI internals, kept in one file.

ComfyUI runs every prompt under ``torch.inference_mode()``; weights a loader created there
are inference tensors, which autograd refuses to save. ``gradients()`` +
``autograd_copy()`` are the one way the pack trains or takes gradients inside a node.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import comfy.model_management
import comfy.utils
import torch


@contextmanager
def gradients():
    """Autograd on, inside a prompt (which runs under inference mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def autograd_copy(module: torch.nn.Module, private: bool = False) -> torch.nn.Module:
    """A frozen module autograd can differentiate through.

    Host modules loaded under inference mode hold inference tensors; those are copied
    (never modified in place: other nodes share them). Modules without any are returned
    as they are, frozen, to spare memory, unless ``private`` asks for a copy the caller
    may alter (e.g. to patch its forward).
    """
    with torch.inference_mode(False):
        tensors = list(module.parameters()) + list(module.buffers())
        if private or any(t.is_inference() for t in tensors):
            module = copy.deepcopy(module)
    return module.requires_grad_(False)


def grad_input(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) copy of a tensor that came from another node."""
    with torch.inference_mode(False):
        return tensor.detach().clone()


class Progress:
    """ComfyUI progress bar of one node's whole loop (0/total at once, so the total shows
    while a long first step runs) plus an interrupt check at every step."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(0)

    def step(self, *_args, preview=None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(self.bar.current + 1, preview=preview)

    def advance_to(self, value: int) -> None:
        """Skip ahead (a loop that stopped early: the rest of its steps will not run)."""
        if value > self.bar.current:
            self.bar.update_absolute(value)


def previews_on() -> bool:
    """Whether the server sends live previews over the websocket (``--preview-method`` is
    not ``none``): a node's own picture of its progress goes only where previews do."""
    from comfy.cli_args import LatentPreviewMethod, args

    return args.preview_method != LatentPreviewMethod.NoPreviews


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()
