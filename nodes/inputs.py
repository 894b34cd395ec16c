"""Checks of what other nodes hand the pack's nodes: one clear error naming the node, the
input and what it expects, raised before any compute.

IMAGE inputs are also converted here, the same way for every node: grey (1 channel) is
repeated to RGB, RGBA drops its alpha channel (as VAE Encode does).
"""
from __future__ import annotations

import torch

LATENT_CHANNELS = 4  # SD 1.x's VAE
TEXT_WIDTH = 768  # SD 1.x's text conditioning (CLIP ViT-L/14)
PREDICTIONS = ("EPS", "V_PREDICTION")  # the variance-preserving models the DDIM loops are written for


def rgb_images(image, node: str, name: str = "image") -> torch.Tensor:
    """An IMAGE batch [B, H, W, 3] with finite values, from grey, RGB or RGBA."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{node}: '{name}' must be an IMAGE batch [batch, height, width, channels], got {shape}")
    batch, height, width, channels = image.shape
    if batch == 0:
        raise ValueError(f"{node}: '{name}' is an empty batch (0 images)")
    if height == 0 or width == 0:
        raise ValueError(f"{node}: '{name}' is {width} x {height} pixels")
    if channels not in (1, 3, 4):
        raise ValueError(f"{node}: '{name}' has {channels} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    check_finite(image, node, name)
    if channels == 1:
        return image.expand(-1, -1, -1, 3)
    return image[..., :3]


def check_finite(tensor: torch.Tensor, node: str, name: str) -> None:
    """Refuse NaN or infinite values, naming the first batch entry that holds one."""
    bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise ValueError(f"{node}: '{name}' holds NaN or infinite values (batch entry {first}); "
                         "check the node that made it")


def image_side_at_least(image: torch.Tensor, side: int, node: str, name: str = "image") -> None:
    height, width = image.shape[1:3]
    if min(height, width) < side:
        raise ValueError(f"{node}: '{name}' is {width} x {height} pixels; it needs at least {side} x {side}")


def sd_latents(latent, node: str, name: str = "latent") -> torch.Tensor:
    """The samples [B, 4, h, w] of an SD 1.x LATENT, finite and non-empty."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"{node}: '{name}' must be a LATENT [batch, 4, height, width], got {shape}")
    if samples.shape[0] == 0:
        raise ValueError(f"{node}: '{name}' is an empty batch (0 latents)")
    if samples.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"{node}: '{name}' has {samples.shape[1]} channels; an SD 1.x VAE makes "
                         f"{LATENT_CHANNELS} (encode the image with the checkpoint's own VAE)")
    check_finite(samples, node, name)
    return samples


def model_facts(model) -> dict:
    """What the checks need to know of a MODEL (a ComfyUI ModelPatcher)."""
    base = model.model
    config = getattr(base, "model_config", None)
    unet = getattr(config, "unet_config", {}) or {}
    latent_format = getattr(base, "latent_format", None)
    model_type = getattr(base, "model_type", None)
    return {"family": type(config).__name__ if config is not None else type(base).__name__,
            "context": unet.get("context_dim"), "in_channels": unet.get("in_channels"),
            "latent_channels": getattr(latent_format, "latent_channels", None),
            "adm": unet.get("adm_in_channels"),
            "prediction": getattr(model_type, "name", str(model_type))}


def sd1_model(model, node: str, name: str = "model") -> None:
    """Refuse MODELs the method cannot run on: it needs an SD 1.x UNet (768-wide text
    conditioning, 4 latent channels, no extra conditioning inputs, eps or v prediction)."""
    f = model_facts(model)
    if (f["context"] == TEXT_WIDTH and f["in_channels"] == LATENT_CHANNELS and f["latent_channels"] == LATENT_CHANNELS
            and not f["adm"] and f["prediction"] in PREDICTIONS):
        return
    raise ValueError(
        f"{node}: '{name}' must be a Stable Diffusion 1.x checkpoint (4 latent channels, {TEXT_WIDTH}-wide text "
        f"conditioning, eps or v prediction); the MODEL given is {f['family']} with {f['in_channels']} input "
        f"channels, {f['context']}-wide conditioning, {f['prediction']} prediction")


def per_image(items: list, batch: int, node: str, name: str, what: str, batch_name: str) -> list:
    """One item per image of a batch: ``items`` holds one for all or exactly one per image."""
    if not items:
        raise ValueError(f"{node}: '{name}' is empty (no {what})")
    one_or_batch(len(items), batch, node, name, what, batch_name)
    return list(items) * batch if len(items) == 1 else list(items)


def one_or_batch(count: int, batch: int, node: str, name: str, what: str, batch_name: str) -> None:
    """A batched input (conditioning rows, masks, reference images) that must hold one
    entry for all images or one per image."""
    if count not in (1, batch):
        raise ValueError(f"{node}: '{name}' holds {count} {what}s but '{batch_name}' has {batch}; "
                         f"give one {what} per image, or a single one for all")
