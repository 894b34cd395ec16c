"""Stage I node: MSI inversion of each image of a batch into its key-E."""
from __future__ import annotations

import dataclasses
import hashlib
import logging

import comfy.model_management
import numpy as np
import torch
from comfy_api.v0_0_2 import io, ui
from PIL import Image, ImageDraw

from diffpriv_core import msi_train
from diffpriv_core.msi_train import UNCONDITIONAL, MSIHost, check_images, train_msi_batch, unconditional_key_e
from diffpriv_core.passes import PassCounter

from .adapters import ComfyEpsModel
from .host import Progress, gradients, grad_input, previews_on
from .inputs import rgb_images, sd1_model
from .msi_adapters import ComfyCodec, ComfyImageFeatures, ComfyText, alphas_of, check_clip_vision, load_all
from .types import FaceCrops, KeyE, batch_size_input

log = logging.getLogger("diffprivacy")

CURVE_SIZE = (512, 256)
CURVE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))
PREVIEWS = 20  # live loss-curve previews per run (only where the server sends previews)
NAME = "MSI Inversion"
# Latents per UNet call while training: 512 px face crops (64 x 64 latents), forward and
# backward. A bf16 call keeps 0.55 GiB per latent for its backward (counted on SD1.5's UNet,
# BENCHMARKS.md, msi_memory): on a 24 GB card next to ComfyUI's fp16 models there is room for
# about 37; half of that leaves the backward its temporaries. Not yet run on such a card.
DEFAULT_BATCH = 16


class MSIInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyMSIInversion",
            display_name="MSI Inversion (Diff-Privacy)",
            category="Diff-Privacy/protect",
            description="Stage I: learns, per image, the ten stage conditionings C^0..C^9 (key-E) that let the "
                        "diffusion model reproduce that image. Needs an SD 1.x checkpoint and the OpenAI CLIP "
                        "ViT-L/14 image encoder.",
            inputs=[
                io.Model.Input("model", tooltip="an SD 1.x checkpoint (eps-prediction), only read"),
                io.Clip.Input("clip", tooltip="its text encoder, which turns each learned pseudo-word into a conditioning"),
                io.Vae.Input("vae", tooltip="its VAE: the image is encoded once to train against"),
                io.ClipVision.Input("clip_vision", tooltip="OpenAI CLIP ViT-L/14 (clip_vit_large_patch14)"),
                io.Image.Input("image", tooltip="one key-E is trained per image of the batch"),
                io.Combo.Input("preset", options=list(msi_train.PRESETS), default=msi_train.DEFAULT_PRESET,
                               tooltip="parallel: four timesteps a step in one UNet call, 300 steps at most (about a "
                                       "quarter of fast's calls in sequence, for as low a loss; best on a GPU); "
                                       "fast: one timestep a step, 1100 steps at most (about the same UNet passes); "
                                       "both stop early on a loss plateau, mixed precision on GPU. faithful: "
                                       "the reference code's 6100 steps at lr 1e-4 (the paper gives lr 1e-3 "
                                       "and no step count)"),
                io.Int.Input("steps", default=0, min=0, max=100000, tooltip="0 = the preset's"),
                io.Float.Input("lr", default=0.0, min=0.0, max=1.0, step=0.00001, round=0.0000001,
                               tooltip="0 = the preset's"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="the same inputs and seed give the same key-E"),
                io.Boolean.Input("one_embedding", default=False, optional=True,
                                 tooltip="the paper's Ours-OE ablation: the last CLIP layer only, no time "
                                         "modulation, one conditioning for every stage"),
                batch_size_input(DEFAULT_BATCH, 256, "the images train together, one call a step for up to this many",
                                 "The keys do"),
                FaceCrops.Input("crop_info", optional=True,
                                tooltip="from the Face Crop that made these images: faces it marked for the light "
                                        "protection (smaller than its msi_min_size) get key-E = the "
                                        "unconditional embedding, without training"),
            ],
            outputs=[KeyE.Output(display_name="key_e", tooltip="one key-E per image: its ten stage conditionings and the "
                                                                 "unconditional one"),
                     io.Image.Output(display_name="loss_curve",
                                     tooltip="the smoothed training loss of each image (also shown on the node)")],
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, image, preset, steps, lr, seed,
                one_embedding=False, batch_size=DEFAULT_BATCH, crop_info=None) -> io.NodeOutput:
        image = rgb_images(image, NAME)
        check_images(image)
        sd1_model(model, NAME)
        check_clip_vision(clip_vision)
        config = _config(preset, steps, lr, seed, one_embedding, batch_size)
        light = light_faces(crop_info, image.shape[0])
        trained = [i for i in range(image.shape[0]) if i not in light]
        host = eps = None
        try:
            with gradients():
                eps = ComfyEpsModel(model, differentiable=True)
                load_all(model, clip.patcher, vae.patcher, clip_vision.patcher)
                host = MSIHost(eps=eps, codec=ComfyCodec(vae, model), text=ComfyText(clip),
                               features=ComfyImageFeatures(clip_vision), alphas=alphas_of(model))
                keys, curves, passes = _train_batch(grad_input(image[trained]), host, config) if trained \
                    else ([], [], [])
                keys, curves, passes = _with_light_faces(keys, curves, passes, trained, light, host.text,
                                                         tuple(image.shape[1:3]))
                for key in keys:  # key-I and recovery refuse this key-E with another checkpoint
                    key.meta["checkpoint"] = eps.fingerprint
        finally:
            del host, eps
            comfy.model_management.soft_empty_cache()
        summary = [_summary(i, key) for i, key in enumerate(keys)]
        curve = _curve_tensor(curves)
        # The final curve shows on the node in the editor: a temporary picture (no prompt in it).
        shown = ui.PreviewImage(curve, cls=None).as_dict()
        return io.NodeOutput(keys, curve, ui={**shown, "key_e": summary, "passes": passes})


def light_faces(crop_info, batch: int) -> list[int]:
    """The images of the batch whose face crop asks for the light protection."""
    if crop_info is None:
        return []
    if len(crop_info) != batch:
        raise ValueError(f"{NAME}: {len(crop_info)} face crops for {batch} images: connect the Face Crop whose "
                         "crops these images are")
    return [i for i, crop in enumerate(crop_info) if crop.protection == UNCONDITIONAL]


def _with_light_faces(keys, curves, passes, trained: list[int], light: list[int], text, image_hw):
    """The trained images' results (in ``trained`` order, indexed 0..) merged in batch order
    with the unconditional key-E of each light-protection image."""
    by_image = {trained[k]: (key, curve) for k, (key, curve) in enumerate(zip(keys, curves))}
    passes = [dict(entry, image=trained[entry["image"]], batch=[trained[b] for b in entry["batch"]])
              for entry in passes]
    for i in light:
        counter = PassCounter()
        by_image[i] = (unconditional_key_e(counter.text(text), image_hw), [])
        passes += counter.report(NAME, first=i)
    order = sorted(by_image)
    return [by_image[i][0] for i in order], [by_image[i][1] for i in order], sorted(passes, key=lambda e: e["image"])


def _config(name: str, steps: int, lr: float, seed: int, one_embedding: bool, batch_size: int):
    """The preset with the node's overrides (0 keeps the preset's value)."""
    config = msi_train.preset(name, steps=steps or None, lr=lr or None, seed=seed, micro_batch=batch_size)
    return dataclasses.replace(config, shape=dataclasses.replace(config.shape, one_embedding=one_embedding))


def _train_batch(images: torch.Tensor, host: MSIHost, config) -> tuple[list, list[list[float]], list[dict]]:
    """One key-E per image, all images trained together (one UNet call a step for all, at
    most the config's micro_batch latents a call), with each image's loss curve and the
    network passes and calls the batch took; progress over the whole batch, a live
    loss-curve preview where the server sends previews."""
    total = config.steps * images.shape[0]
    progress = Progress(total)
    every = max(1, total // PREVIEWS)
    live = previews_on()
    curves: list[list[float]] = [[] for _ in range(images.shape[0])]
    done = 0

    def on_step(index, step, steps, loss):
        nonlocal done
        curves[index].append(loss)
        done += 1
        preview = None
        if done % every == 0 or done == total:
            log.info("Diff-Privacy MSI: image %d/%d step %d/%d, loss %.4f (running mean %.4f)", index + 1,
                     images.shape[0], step, steps, loss, float(np.mean(curves[index][-every:])))
            preview = ("PNG", _curve_picture(curves), None) if live else None
        progress.step(preview=preview)

    counter = PassCounter()
    results = train_msi_batch(images, counter.msi_host(host), config, callback=on_step)
    progress.advance_to(total)  # early stopping leaves steps out
    return [r.key for r in results], curves, counter.report(NAME, images.shape[0])


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
