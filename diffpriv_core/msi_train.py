"""Training MSI for one image (Eq. 7) with every host network frozen, and the presets.

loss = MSE(eps, eps_theta(z_t, t, C^{t // 100})), z = a VAE posterior sample (scaled), a
random horizontal flip of the image per step. Only the MSI module has trainable parameters;
the host networks are called, never updated.
"""
from __future__ import annotations

import dataclasses
import json
import math
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
# torch's own autocast, not comfy.ops (comfy-test's rule): mixed-precision training with a gradient
# scaler; comfy.ops casts weights for inference.
from torch import autocast

from .adapters.protocols import EpsModel, ImageFeatures, LatentCodec, TextEncoder
from .frame import SIZE_META, msi_size_problem, pad_to_factor, size_meta
from .key_format import PROTECTIONS
from .key_types import KeyE
from .msi import MSI, MSIShape, evaluating, make_key_e
from .schedule import STAGE_SPAN, STAGES, T, alphas_cumprod

StepCallback = Callable[[int, int, float], None]
"""Called after every step with (step, total, loss), step counting from 1; raise to stop."""
Probe = Callable[[int, MSI], None]
"""Called after every step with (step, module in training): held-out evaluation in benchmarks."""


@dataclass(frozen=True)
class MSITrainConfig:
    # The defaults are the reference code's configuration (the paper's text gives lr 1e-3 and
    # no step count; we follow the code, whose numbers the paper reports).
    steps: int = 6100
    lr: float = 1e-4
    weight_decay: float = 1e-2  # AdamW's default, as in the reference
    timesteps_per_step: int = 1  # UNet passes (forward + backward) per step
    # False: t ~ U{0..999}. True: the stages in turn, each step taking the next ones of a
    # cycle that visits all ten in a shuffled order (t uniform inside each stage), so every
    # ten timesteps cover the whole schedule once: far less noise than ten uniform draws.
    stratified: bool = False
    reuse_encodings: bool = False  # encode latent moments and CLIP features once per flip
    warmup_steps: int = 0
    cosine: bool = False  # cosine decay after the warmup, down to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    # Exponential moving average of the weights with this decay (0: the last weights): the
    # key comes from the average, which smooths out the step-to-step jitter that batch-1
    # gradients give, at no extra network pass.
    average: float = 0.0
    mixed_precision: bool = False  # bf16 (fp16 where bf16 is missing) autocast; CUDA only
    # Latents per UNet call, the images of a batch together (0: all of a step's at once).
    # Gradients are accumulated, so the update is the same; peak memory is that of one call.
    micro_batch: int = 0
    flip: bool = True
    seed: int = 0
    # Early stopping: every ``plateau_every`` steps (0: never) Eq. 7 is measured on a fixed
    # probe sample (one stratified timestep per stage, forward passes only); training stops
    # when ``plateau_patience`` checks in a row improved the best by less than
    # ``plateau_delta`` (relative), and the module that scored best is kept.
    plateau_every: int = 0
    plateau_patience: int = 3
    plateau_delta: float = 0.01
    shape: MSIShape = field(default_factory=MSIShape)


PRESETS = {
    # The reference code's configuration (not the paper's text, which gives lr 1e-3 and no step
    # count): lr 1e-4, 6100 steps, batch 1, fp32: 6100 UNet passes
    # (forward and backward). The reference code encodes the image again at every step; the
    # encoders are deterministic, so encoding it once per flip gives the same key-E.
    "faithful": MSITrainConfig(reuse_encodings=True),
    # At most 1100 UNet passes plus 50 forward-only probe passes (5.3x fewer than the
    # faithful 6100), one timestep per step: the stages in a shuffled cycle, a 20x larger
    # warmed-up lr decayed to 1% of itself, the key from an average of the weights, the
    # image encoded once per flip, early stopping when the loss stops improving, bf16 on GPU.
    "fast": MSITrainConfig(steps=1100, lr=2e-3, stratified=True, reuse_encodings=True, warmup_steps=30,
                           cosine=True, min_lr_ratio=0.01, average=0.99, mixed_precision=True,
                           plateau_every=200, plateau_patience=2, plateau_delta=0.02),
    # The fast preset's schedule with four stratified timesteps per step as one batched UNet
    # call, in 300 steps at twice the lr, the weights averaged over a shorter horizon (decay
    # 0.97: about 33 steps, a tenth of the run, as fast's 0.99 is of its 1100). On a GPU a
    # UNet call on four latents takes about as long as on one, so what counts is the calls in
    # sequence: at most 306, 273 on average with early stopping, against the fast preset's
    # 1000 or so, for a lower held-out loss on the toy host over 20 seeds; it spends about
    # the fast preset's UNet passes (BENCHMARKS.md, msi_presets).
    "parallel": MSITrainConfig(steps=300, lr=4e-3, timesteps_per_step=4, stratified=True, reuse_encodings=True,
                               warmup_steps=10, cosine=True, min_lr_ratio=0.01, average=0.97, mixed_precision=True,
                               plateau_every=50, plateau_patience=2, plateau_delta=0.02),
}
DEFAULT_PRESET = "parallel"


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
    # rows(owners): a context in which row r of each network call belongs to image
    # owners[r] of a batch (the pass counter's, passes.PassCounter.rows); no-op by default.
    rows: Callable[[list[int]], AbstractContextManager] = lambda owners: nullcontext()


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


class TimestepSampler:
    """Each step's timesteps: uniform over 0..999, or (stratified) uniform inside the next
    stages of a cycle that visits every stage once per round, in a shuffled order."""

    def __init__(self, config: MSITrainConfig, generator: torch.Generator):
        self.config, self.generator = config, generator
        self.queue: list[int] = []

    def __call__(self) -> torch.Tensor:
        n = self.config.timesteps_per_step
        if not self.config.stratified:
            return torch.randint(0, T, (n,), generator=self.generator)
        while len(self.queue) < n:
            self.queue += torch.randperm(STAGES, generator=self.generator).tolist()
        stages, self.queue = torch.tensor(self.queue[:n]), self.queue[n:]
        return stages * STAGE_SPAN + torch.randint(0, STAGE_SPAN, (n,), generator=self.generator)


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
    return autocast("cuda", dtype=dtype), scaler


class Plateau:
    """Early stopping: tracks the probe loss and says when it stopped improving."""

    def __init__(self, patience: int, delta: float):
        self.patience, self.delta = patience, delta
        self.best, self.stale, self.best_state = float("inf"), 0, None

    def update(self, loss: float, msi: MSI) -> bool:
        """Record a check; True when training should stop."""
        if loss < self.best * (1.0 - self.delta):
            self.stale = 0
        else:
            self.stale += 1
        if loss < self.best:
            self.best = loss
            self.best_state = {k: v.detach().clone() for k, v in msi.state_dict().items()}
        return self.stale >= self.patience


def train_msi(image: torch.Tensor, host: MSIHost, config: MSITrainConfig,
              callback: StepCallback | None = None, probe: Probe | None = None) -> MSIResult:
    """Train MSI on one image [1, H, W, 3] in [0, 1] and return its key-E and loss curve."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"train_msi takes one image [1, H, W, 3], got {tuple(image.shape)}")
    on_step = None if callback is None else lambda _index, step, total, loss: callback(step, total, loss)
    on_probe = None if probe is None else lambda _index, step, msi: probe(step, msi)
    return train_msi_batch(image, host, config, on_step, on_probe)[0]


BatchCallback = Callable[[int, int, int, float], None]
"""Called after every step of every image with (image, step, total, loss); raise to stop."""
BatchProbe = Callable[[int, int, MSI], None]
"""Called after every step of every image with (image, step, module in training)."""


def train_msi_batch(images: torch.Tensor, host: MSIHost, config: MSITrainConfig,
                    callback: BatchCallback | None = None, probe: BatchProbe | None = None) -> list[MSIResult]:
    """Train one MSI per image of ``images`` [B, H, W, 3] in [0, 1], all images together:
    each step makes one text-encoder and one UNet call for every image still training (at
    most ``config.micro_batch`` latents a call), because on a GPU the calls made one after
    another decide the time. Each image keeps its own module, optimiser, random draws and
    early stopping, seeded as if it trained alone, so its key-E is the one it gets alone
    up to float rounding."""
    check_images(images)
    runs = [_Run(images[i:i + 1], host, config) for i in range(images.shape[0])]
    for step in range(config.steps):
        active = [k for k, run in enumerate(runs) if not run.stopped]
        if not active:
            break
        draws = {k: runs[k].draw() for k in active}
        for k in active:
            runs[k].optimizer.zero_grad(set_to_none=True)
        losses = dict.fromkeys(active, 0.0)
        for call in _calls(draws, config.micro_batch):
            for k, loss in _eq7_call(runs, draws, call, host).items():
                losses[k] += loss
        for k in active:
            runs[k].finish_step(step, losses[k], k, callback, probe)
        due = [k for k in active if runs[k].check_due(step)]
        for k, loss in zip(due, _stopping_probes([runs[k] for k in due], due, host)):
            runs[k].stopped = runs[k].plateau.update(loss, runs[k].trained)
    return [run.result() for run in runs]


class _Run:
    """One image's training: its encodings, generator, module, optimiser, schedule, weight
    average, early stopping, and its own stream of the global RNG (dropout), as it would
    have trained alone."""

    def __init__(self, image: torch.Tensor, host: MSIHost, config: MSITrainConfig):
        self.image, self.host, self.config = image, host, config
        self.encodings = _Encodings(image, host, config.reuse_encodings)
        self.generator = torch.Generator().manual_seed(config.seed)  # CPU: the same draws on every device
        self.timesteps = TimestepSampler(config, self.generator)
        unflipped = self.encodings(False)
        self.features = unflipped[2]
        self.device = self.features[0].device
        self.plateau = Plateau(config.plateau_patience, config.plateau_delta) if config.plateau_every else None
        self.stopping_probe = HeldOut(*unflipped, host, rounds=1, seed=config.seed + 1) if self.plateau else None
        with _seeded(config.seed, self.device):
            self.msi = MSI(config.shape).to(self.device).train()
            self.rng = _RngState.now(self.device)
        self.optimizer = torch.optim.AdamW(self.msi.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(config, s))
        self.autocast, self.scaler = _autocast(config, self.device)
        self.averaged = _averaged(self.msi, config.average)
        self.trained = self.averaged.module if self.averaged is not None else self.msi  # what probes see, the key's
        self.losses: list[float] = []
        self.stopped = False

    def draw(self) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's (CLIP features, timesteps, z_t, noise), drawn in the order training
        alone draws them."""
        flipped = self.config.flip and bool(torch.randint(0, 2, (1,), generator=self.generator))
        mean, std, feats = self.encodings(flipped)
        t = self.timesteps()
        z_t, noise = _noised(mean, std, t, self.host.alphas, self.generator)
        return feats, t.to(self.device), z_t, noise

    def tokens(self, feats: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        """The module's pseudo-tokens for timesteps ``t``, dropout drawn from this image's stream."""
        with self.rng.active(self.device), self.autocast:
            return self.msi(feats, t // STAGE_SPAN)

    def finish_step(self, step: int, loss: float, index: int, callback, probe) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.schedule.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.msi)
        self.losses.append(loss)
        if callback is not None:
            callback(index, step + 1, self.config.steps, loss)
        if probe is not None:
            probe(index, step + 1, self.trained)

    def check_due(self, step: int) -> bool:
        """Whether early stopping measures its probe after ``step``."""
        return self.plateau is not None and (step + 1) % self.config.plateau_every == 0

    def result(self) -> MSIResult:
        if self.plateau is not None and self.plateau.best_state is not None:
            self.trained.load_state_dict(self.plateau.best_state)
        meta = _key_meta(self.config, self.losses, self.image.shape[1:3])
        return MSIResult(make_key_e(self.trained, self.features, self.host.text, meta=meta), self.losses, self.trained)


@dataclass
class _RngState:
    """A saved state of the global RNGs dropout draws from (the CPU's, and the device's)."""

    cpu: torch.Tensor
    device: torch.Tensor | None

    @classmethod
    def now(cls, device: torch.device) -> "_RngState":
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    @contextmanager
    def active(self, device: torch.device):
        """Draw from this state inside the block, and keep where it got to; the caller's
        state is back afterwards."""
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.device, device)
            yield
            saved = _RngState.now(device)
        self.cpu, self.device = saved.cpu, saved.device


Piece = tuple[int, slice]  # (image, its rows of the step)


def _calls(draws: dict, limit: int) -> list[list[Piece]]:
    """The step's rows in UNet calls of at most ``limit`` latents (0: one call): each
    image's rows in pieces of at most ``limit``, packed in order."""
    pieces = []
    for k, (_feats, t, _z, _noise) in draws.items():
        size = limit or t.shape[0]
        pieces += [(k, slice(start, min(start + size, t.shape[0]))) for start in range(0, t.shape[0], size)]
    calls, rows = [[]], 0
    for k, part in pieces:
        n = part.stop - part.start
        if limit and rows + n > limit and calls[-1]:
            calls.append([])
            rows = 0
        calls[-1].append((k, part))
        rows += n
    return calls


def _eq7_together(host: MSIHost, tokens: list[torch.Tensor], z_t: list[torch.Tensor], t: list[torch.Tensor],
                  noise: list[torch.Tensor], owners: list[int]) -> list[torch.Tensor]:
    """Eq. 7 of several pieces (each its pseudo-tokens, z_t, timesteps and noise) in one
    text-encoder and one UNet call: each piece's MSE. ``owners``: the image of each row."""
    with host.rows(owners):
        cond = host.text.encode_with_token(torch.cat(tokens))
        eps = host.eps(torch.cat(z_t), torch.cat(t), cond).float()
    return [F.mse_loss(part, target) for part, target in zip(eps.split([n.shape[0] for n in noise]), noise)]


def _stopping_probes(runs: list[_Run], owners: list[int], host: MSIHost) -> list[float]:
    """Each run's early-stopping probe (Eq. 7 on its fixed sample, dropout off), all in one
    text-encoder and one UNet call: the faces of a batch check together."""
    if not runs:
        return []
    probes = [run.stopping_probe for run in runs]
    with torch.no_grad():
        tokens = []
        for run, probe in zip(runs, probes):
            with evaluating(run.trained):
                tokens.append(run.trained(probe.feats, probe.t // STAGE_SPAN))
        rows = [k for k, probe in zip(owners, probes) for _ in range(probe.t.shape[0])]
        losses = _eq7_together(host, tokens, [p.z_t for p in probes], [p.t for p in probes],
                               [p.noise for p in probes], rows)
    return [float(loss) for loss in losses]


def _eq7_call(runs: list[_Run], draws: dict, call: list[Piece], host: MSIHost) -> dict[int, float]:
    """Eq. 7 for the pieces of one call, in one text-encoder and one UNet call, each piece's
    gradient accumulated into its own image's module (weighted by its share of that
    image's rows, so the pieces of an image add up to its step's mean). Returns each
    image's part of its step loss."""
    tokens, z_t, t, noise, owners = [], [], [], [], []
    for k, part in call:
        feats, t_k, z_k, noise_k = draws[k]
        tokens.append(runs[k].tokens(feats, t_k[part]))
        z_t.append(z_k[part])
        t.append(t_k[part])
        noise.append(noise_k[part])
        owners += [k] * z_k[part].shape[0]
    with runs[call[0][0]].autocast:
        pieces = _eq7_together(host, tokens, z_t, t, noise, owners)
    losses, total = {}, 0.0
    for (k, _part), piece, noise_k in zip(call, pieces, noise):
        loss = piece * (noise_k.shape[0] / draws[k][1].shape[0])  # its share of the image's rows
        losses[k] = losses.get(k, 0.0) + float(loss.detach())
        total = total + (loss if runs[k].scaler is None else runs[k].scaler.scale(loss))
    total.backward()
    return losses


def _averaged(msi: MSI, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    if not decay:
        return None
    return torch.optim.swa_utils.AveragedModel(msi, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay))


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


class HeldOut:
    """Eq. 7 on a fixed sample (``rounds`` stratified timesteps per stage, fixed noise, no
    flip, dropout off) of the image's encodings (posterior mean, std, CLIP features): a
    deterministic measure to compare modules, unlike the per-step training loss, whose
    noise is large at batch 1. Costs ``10 * rounds`` UNet forward passes a call."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, feats: list[torch.Tensor], host: MSIHost,
                 rounds: int = 4, seed: int = 1234):
        generator = torch.Generator().manual_seed(seed)
        stratified = TimestepSampler(MSITrainConfig(stratified=True, timesteps_per_step=STAGES), generator)
        self.t = torch.cat([stratified() for _ in range(rounds)])
        self.z_t, self.noise = _noised(mean, std, self.t, host.alphas, generator)
        self.t = self.t.to(mean.device)
        self.feats, self.host = feats, host

    def __call__(self, msi: MSI) -> float:
        with evaluating(msi), torch.no_grad():
            return float(_eq7(msi, self.feats, self.host, self.z_t, self.t, self.noise))


def held_out(image: torch.Tensor, host: MSIHost, rounds: int = 4, seed: int = 1234) -> HeldOut:
    """The held-out measure of one image [1, H, W, 3] (encoded once, here)."""
    return HeldOut(*_Encodings(image, host, reuse=False)(False), host, rounds=rounds, seed=seed)


def held_out_loss(msi: MSI, image: torch.Tensor, host: MSIHost, rounds: int = 4, seed: int = 1234) -> float:
    """Eq. 7 of ``msi`` on the held-out sample of ``image`` (see ``HeldOut``)."""
    return held_out(image, host, rounds, seed)(msi)


UNCONDITIONAL = PROTECTIONS[1]  # key-E's msi_variant for the light protection of small faces


def unconditional_key_e(text: TextEncoder, image_hw: tuple[int, int]) -> KeyE:
    """key-E without MSI, the light protection of small faces: every stage's conditioning is
    the unconditional embedding (the empty prompt), so Stage II, key-I and recovery run as
    with MSI's key-E, without its training (one text-encoder pass instead of ~1000 UNet
    forward and backward passes). The face's key-I is still its own inversion under it."""
    with torch.no_grad():
        uc = text.encode_empty().detach().float().cpu().contiguous()
    return KeyE(uc.expand(STAGES, *uc.shape[1:]).clone(), uc.clone(),
                {"key": "key-E", SIZE_META: size_meta(*image_hw), "msi_variant": UNCONDITIONAL,
                 "msi_final_loss": "", "msi_steps_run": "0"})


def _key_meta(config: MSITrainConfig, losses: list[float], image_hw: tuple[int, int]) -> dict[str, str]:
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    return {
        "key": "key-E",
        SIZE_META: size_meta(*image_hw),  # what a recovery cuts out of the padded picture
        "msi_variant": "one_embedding" if config.shape.one_embedding else "multi_stage",
        "msi_config": json.dumps(dataclasses.asdict(config), sort_keys=True),
        "msi_final_loss": f"{sum(tail) / len(tail):.6g}" if tail else "",
        "msi_steps_run": str(len(losses)),  # fewer than the config's when early stopping ended it
    }
