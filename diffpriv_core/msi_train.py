"""Training MSI for one image (Eq. 7) with every host network frozen, and the presets.

loss = MSE(eps, eps_theta(z_t, t, C^{t // 100})), z = a VAE posterior sample (scaled), a
random horizontal flip of the image per step. Only the MSI module has trainable parameters;
the host networks are called, never updated.
"""
from __future__ import annotations

import dataclasses
import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .adapters.protocols import EpsModel, ImageFeatures, LatentCodec, TextEncoder
from .frame import SIZE_META, msi_size_problem, pad_to_factor, size_meta
from .key_types import KeyE
from .msi import MSI, MSIShape, evaluating, make_key_e
from .schedule import STAGE_SPAN, STAGES, T, alphas_cumprod

StepCallback = Callable[[int, int, float], None]
"""Called after every step with (step, total, loss), step counting from 1; raise to stop."""
Probe = Callable[[int, MSI], None]
"""Called after every step with (step, module in training): held-out evaluation in benchmarks."""


@dataclass(frozen=True)
class MSITrainConfig:
    steps: int = 6100
    lr: float = 1e-4
    weight_decay: float = 1e-2  # AdamW's default, as in the reference
    timesteps_per_step: int = 1  # t ~ U{0..999}, this many per step (ignored when stratified)
    stratified: bool = False  # one timestep from each of the 10 stages per step
    reuse_encodings: bool = False  # encode latent moments and CLIP features once per flip
    warmup_steps: int = 0
    cosine: bool = False  # cosine decay after the warmup, down to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    mixed_precision: bool = False  # bf16 (fp16 where bf16 is missing) autocast; CUDA only
    # Timesteps per forward/backward pass (0: all of a step's at once). Gradients are
    # accumulated, so the update is the same; peak memory is that of one micro-batch.
    micro_batch: int = 0
    flip: bool = True
    seed: int = 0
    shape: MSIShape = field(default_factory=MSIShape)


PRESETS = {
    # The reference configuration: lr 1e-4, 6100 steps, batch 1, fp32.
    "faithful": MSITrainConfig(),
    # Same number of (image, t) samples in a tenth of the steps: each step covers all ten
    # stages, encodings are computed once per flip, a larger warmed-up cosine-decayed lr.
    # Two timesteps per pass: ten 512 px UNet passes with their backward at once need far
    # more memory than a consumer GPU (or 24 GB of RAM on a CPU) has.
    "fast": MSITrainConfig(steps=600, lr=1e-3, stratified=True, reuse_encodings=True,
                           warmup_steps=30, cosine=True, mixed_precision=True, micro_batch=2),
}


def preset(name: str, **overrides) -> MSITrainConfig:
    """A preset with some fields replaced; ``None`` values keep the preset's."""
    if name not in PRESETS:
        raise ValueError(f"unknown MSI preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class MSIHost:
    """The frozen host networks MSI trains against."""

    eps: EpsModel
    codec: LatentCodec
    text: TextEncoder
    features: ImageFeatures
    alphas: torch.Tensor = field(default_factory=alphas_cumprod)  # alpha_bar(t), t = 0..999


@dataclass
class MSIResult:
    key: KeyE
    losses: list[float]
    msi: MSI


class _Encodings:
    """Posterior moments and CLIP features of the image, flipped or not; cached when the
    config allows (both encoders are deterministic, so caching changes no value)."""

    def __init__(self, image: torch.Tensor, host: MSIHost, reuse: bool):
        self.image, self.host, self.reuse = image, host, reuse
        self.cache: dict[bool, tuple] = {}

    def __call__(self, flipped: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        if flipped in self.cache:
            return self.cache[flipped]
        image = self.image.flip(2) if flipped else self.image
        with torch.no_grad():
            mean, std = self.host.codec.encode_moments(pad_to_factor(image))
            encoded = (mean.float(), std.float(), [f.float() for f in self.host.features(image)])
        if self.reuse:
            self.cache[flipped] = encoded
        return encoded


def check_images(images: torch.Tensor) -> None:
    """Refuse batches MSI cannot train on, with a message that says what to do. Any side
    works within the limits: the VAE sees the image padded to its factor (frame.py)."""
    if images.shape[0] == 0:
        raise ValueError("MSI Inversion got an empty image batch")
    problem = msi_size_problem(*images.shape[1:3])
    if problem:
        raise ValueError(problem)


def sample_timesteps(config: MSITrainConfig, generator: torch.Generator) -> torch.Tensor:
    """This step's timesteps: uniform over 0..999, or one uniform draw inside each stage."""
    if config.stratified:
        return torch.arange(STAGES) * STAGE_SPAN + torch.randint(0, STAGE_SPAN, (STAGES,), generator=generator)
    return torch.randint(0, T, (config.timesteps_per_step,), generator=generator)


def lr_factor(config: MSITrainConfig, step: int) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warmup, then constant or cosine."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if not config.cosine:
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's global RNGs (module init, dropout) without disturbing the caller's."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _autocast(config: MSITrainConfig, device: torch.device):
    """(autocast context, gradient scaler) for the config on this device."""
    if not (config.mixed_precision and device.type == "cuda"):
        return nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def train_msi(image: torch.Tensor, host: MSIHost, config: MSITrainConfig,
              callback: StepCallback | None = None, probe: Probe | None = None) -> MSIResult:
    """Train MSI on one image [1, H, W, 3] in [0, 1] and return its key-E and loss curve."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"train_msi takes one image [1, H, W, 3], got {tuple(image.shape)}")
    check_images(image)
    encodings = _Encodings(image, host, config.reuse_encodings)
    generator = torch.Generator().manual_seed(config.seed)  # CPU: the same draws on every device
    _, _, features = encodings(False)
    device = features[0].device
    with _seeded(config.seed, device):
        msi = MSI(config.shape).to(device).train()
        optimizer = torch.optim.AdamW(msi.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s))
        autocast, scaler = _autocast(config, device)
        losses = []
        for step in range(config.steps):
            flipped = config.flip and bool(torch.randint(0, 2, (1,), generator=generator))
            mean, std, feats = encodings(flipped)
            t = sample_timesteps(config, generator)
            z_t, noise = _noised(mean, std, t, host.alphas, generator)
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            size = config.micro_batch or t.shape[0]
            for part in range(0, t.shape[0], size):
                chunk = slice(part, part + size)
                with autocast:  # each part's mean, weighted: the sum is the whole batch's mean
                    part_loss = _eq7(msi, feats, host, z_t[chunk], t[chunk].to(device), noise[chunk])
                    part_loss = part_loss * (z_t[chunk].shape[0] / t.shape[0])
                (part_loss if scaler is None else scaler.scale(part_loss)).backward()
                loss += float(part_loss.detach())
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            schedule.step()
            losses.append(loss)
            if callback is not None:
                callback(step + 1, config.steps, losses[-1])
            if probe is not None:
                probe(step + 1, msi)
        key = make_key_e(msi, features, host.text, meta=_key_meta(config, losses, image.shape[1:3]))
    return MSIResult(key, losses, msi)


def _noised(mean: torch.Tensor, std: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, eps) for timesteps ``t``: a fresh posterior sample z = mean + std * n per
    timestep, noised to level alpha_bar(t). Draws on the CPU generator (device-independent)."""
    posterior_draw, noise = torch.randn((2, t.shape[0], *mean.shape[1:]), generator=generator).to(mean.device)
    a = alphas.to(device=mean.device, dtype=torch.float32)[t.to(mean.device)].view(-1, 1, 1, 1)
    return a.sqrt() * (mean + std * posterior_draw) + (1.0 - a).sqrt() * noise, noise


def _eq7(msi: MSI, feats: list[torch.Tensor], host: MSIHost, z_t: torch.Tensor, t: torch.Tensor,
         noise: torch.Tensor) -> torch.Tensor:
    """Eq. 7: MSE(eps, eps_theta(z_t, t, C^{t // 100}))."""
    cond = host.text.encode_with_token(msi(feats, t // STAGE_SPAN))
    return F.mse_loss(host.eps(z_t, t, cond).float(), noise)


def held_out_loss(msi: MSI, image: torch.Tensor, host: MSIHost, rounds: int = 4, seed: int = 1234) -> float:
    """Eq. 7 on a fixed sample (``rounds`` stratified timesteps per stage, fixed noise, no
    flip, dropout off): a deterministic measure to compare modules, unlike the per-step
    training loss, whose noise is large at batch 1."""
    generator = torch.Generator().manual_seed(seed)
    mean, std, feats = _Encodings(image, host, reuse=False)(False)
    t = torch.cat([sample_timesteps(MSITrainConfig(stratified=True), generator) for _ in range(rounds)])
    z_t, noise = _noised(mean, std, t, host.alphas, generator)
    with evaluating(msi), torch.no_grad():
        return float(_eq7(msi, feats, host, z_t, t.to(mean.device), noise))


def _key_meta(config: MSITrainConfig, losses: list[float], image_hw: tuple[int, int]) -> dict[str, str]:
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    return {
        "key": "key-E",
        SIZE_META: size_meta(*image_hw),  # what a recovery cuts out of the padded picture
        "msi_variant": "one_embedding" if config.shape.one_embedding else "multi_stage",
        "msi_config": json.dumps(dataclasses.asdict(config), sort_keys=True),
        "msi_final_loss": f"{sum(tail) / len(tail):.6g}" if tail else "",
    }
