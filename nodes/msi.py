"""Stage I node: MSI inversion of each image of a batch into its key-E."""
from __future__ import annotations

import dataclasses
import hashlib
import logging

import comfy.model_management
import numpy as np
import torch
from comfy_api.v0_0_2 import io
from PIL import Image, ImageDraw

from diffpriv_core import msi_train
from diffpriv_core.msi_train import MSIHost, check_images, train_msi
from diffpriv_core.passes import PassCounter

from .adapters import ComfyEpsModel
from .host import Progress, gradients, grad_input
from .inputs import rgb_images, sd1_model
from .msi_adapters import ComfyCodec, ComfyImageFeatures, ComfyText, alphas_of, check_clip_vision, load_all
from .types import KeyE

log = logging.getLogger("diffprivacy")

CURVE_SIZE = (512, 256)
CURVE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))
PREVIEWS = 20  # live loss-curve previews per run
NAME = "MSI Inversion"


class MSIInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyMSIInversion",
            display_name="MSI Inversion (Diff-Privacy)",
            category="Diff-Privacy",
            description="Stage I: learns, per image, the ten stage conditionings C^0..C^9 (key-E) that let the "
                        "diffusion model reproduce that image. Needs an SD 1.x checkpoint and the OpenAI CLIP "
                        "ViT-L/14 image encoder.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.ClipVision.Input("clip_vision", tooltip="OpenAI CLIP ViT-L/14 (clip_vit_large_patch14)"),
                io.Image.Input("image", tooltip="one key-E is trained per image of the batch"),
                io.Combo.Input("preset", options=list(msi_train.PRESETS), default="fast",
                               tooltip="fast: a fifth of the faithful UNet passes (1100 steps at most, stops "
                                       "early on a loss plateau), mixed precision on GPU; faithful: the "
                                       "reference code's 6100 steps at lr 1e-4 (the paper gives lr 1e-3 and "
                                       "no step count)"),
                io.Int.Input("steps", default=0, min=0, max=100000, tooltip="0 = the preset's"),
                io.Float.Input("lr", default=0.0, min=0.0, max=1.0, step=0.00001, round=0.0000001,
                               tooltip="0 = the preset's"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Boolean.Input("one_embedding", default=False, optional=True,
                                 tooltip="the paper's Ours-OE ablation: the last CLIP layer only, no time "
                                         "modulation, one conditioning for every stage"),
            ],
            outputs=[KeyE.Output(display_name="key_e"), io.Image.Output(display_name="loss_curve")],
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, image, preset, steps, lr, seed,
                one_embedding=False) -> io.NodeOutput:
        image = rgb_images(image, NAME)
        check_images(image)
        sd1_model(model, NAME)
        check_clip_vision(clip_vision)
        config = _config(preset, steps, lr, seed, one_embedding)
        host = eps = None
        try:
            with gradients():
                eps = ComfyEpsModel(model, differentiable=True)
                load_all(model, clip.patcher, vae.patcher, clip_vision.patcher)
                host = MSIHost(eps=eps, codec=ComfyCodec(vae, model), text=ComfyText(clip),
                               features=ComfyImageFeatures(clip_vision), alphas=alphas_of(model))
                keys, curves, passes = _train_batch(grad_input(image), host, config)
                for key in keys:  # key-I and recovery refuse this key-E with another checkpoint
                    key.meta["checkpoint"] = eps.fingerprint
        finally:
            del host, eps
            comfy.model_management.soft_empty_cache()
        summary = [_summary(i, key) for i, key in enumerate(keys)]
        return io.NodeOutput(keys, _curve_tensor(curves), ui={"key_e": summary, "passes": passes})


def _config(name: str, steps: int, lr: float, seed: int, one_embedding: bool):
    """The preset with the node's overrides (0 keeps the preset's value)."""
    config = msi_train.preset(name, steps=steps or None, lr=lr or None, seed=seed)
    return dataclasses.replace(config, shape=dataclasses.replace(config.shape, one_embedding=one_embedding))


def _train_batch(images: torch.Tensor, host: MSIHost, config) -> tuple[list, list[list[float]], list[dict]]:
    """One key-E per image, with its loss curve and the network passes it took; progress
    over the whole batch, a live loss-curve preview."""
    total = config.steps * images.shape[0]
    progress = Progress(total)
    every = max(1, total // PREVIEWS)
    keys, curves, passes = [], [], []
    for i in range(images.shape[0]):
        counter = PassCounter()
        curve: list[float] = []
        curves.append(curve)

        def on_step(step, steps, loss, i=i, curve=curve):
            curve.append(loss)
            done = i * steps + step
            preview = None
            if done % every == 0 or done == total:
                log.info("Diff-Privacy MSI: image %d/%d step %d/%d, loss %.4f (running mean %.4f)", i + 1,
                         images.shape[0], step, steps, loss, float(np.mean(curve[-every:])))
                preview = ("PNG", _curve_picture(curves), None)
            progress.step(preview=preview)

        keys.append(train_msi(images[i:i + 1], counter.msi_host(host), config, callback=on_step).key)
        progress.advance_to((i + 1) * config.steps)  # early stopping leaves steps out
        passes += counter.report(NAME, first=i)
    return keys, curves, passes


def _summary(index: int, key) -> dict:
    """What the history shows of a key-E: shapes, the final loss, a fingerprint."""
    digest = hashlib.sha256(key.stages.numpy().tobytes() + key.uc.numpy().tobytes()).hexdigest()
    return {"image": index, "stages": list(key.stages.shape), "uc": list(key.uc.shape),
            "variant": key.meta.get("msi_variant", ""), "final_loss": key.meta.get("msi_final_loss", ""),
            "sha256": digest}


def _smoothed(values: list[float]) -> np.ndarray:
    """Exponential moving average, so batch-1 noise does not hide the trend."""
    alpha = 2.0 / (max(1, len(values) // 20) + 1)
    out, acc = np.empty(len(values)), values[0]
    for k, v in enumerate(values):
        acc += alpha * (v - acc)
        out[k] = acc
    return out


def _curve_picture(curves: list[list[float]]) -> Image.Image:
    """Each image's smoothed loss over steps, one colour per image, on a shared scale."""
    w, h = CURVE_SIZE
    picture = Image.new("RGB", CURVE_SIZE, "white")
    draw = ImageDraw.Draw(picture)
    smoothed = [_smoothed(c) for c in curves if c]
    if not smoothed:
        return picture
    low, high = min(s.min() for s in smoothed), max(s.max() for s in smoothed)
    span = high - low if high > low else 1.0
    longest = max(len(s) for s in smoothed)
    for k, s in enumerate(smoothed):
        xs = np.arange(len(s)) * (w - 20) / max(1, longest - 1) + 10
        ys = h - 10 - (s - low) / span * (h - 30)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=CURVE_COLOURS[k % len(CURVE_COLOURS)], width=2)
    draw.text((10, 2), f"loss {low:.4g} .. {high:.4g}", fill="black")
    return picture


def _curve_tensor(curves: list[list[float]]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(_curve_picture(curves), dtype=np.float32) / 255.0)[None]
