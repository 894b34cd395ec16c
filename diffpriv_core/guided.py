"""Stage II (Algorithm 1): DDIM with an identity-energy correction after every step.

The correction needs no UNet backward: the energy's gradient is taken w.r.t. a detached
copy of the step's x0 estimate, through the VAE decoder and the face recogniser only:

    g = dE(F(align(Decode(z0hat')))) / dz0hat',   z_prev <- z_prev - lambda_t * g

Everything here works on SD's scaled latents and an abstract ``eps_fn``, ``decoder``
(a differentiable ``LatentCodec.decode``) and ``FaceEmbedder``; the host supplies them.
Callers inside ComfyUI must leave inference mode first (nodes/host.py ``gradients()``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import ddim
from .adapters.protocols import FaceEmbedder
from .energy import PAPER_LAMBDAS, LambdaSchedule, energy, normalize_gradient
from .faces.align import face_matrix, shift_source, warp_faces
from .faces.detect import Face
from .frame import VAE_FACTOR, latent_offset
from .schedule import Grid

Decoder = Callable[[torch.Tensor], torch.Tensor]  # scaled latents -> [B, H, W, 3], unclamped


@dataclass(frozen=True)
class Preset:
    strength: float  # S_ns: the fraction of the DDIM grid that is re-run
    tau: float  # key-E conditions t > tau * T, the unconditional embedding below
    steps: int
    batch: int  # independent noises of the same image guided together
    lambdas: LambdaSchedule


PRESETS = {
    "anonymize": Preset(strength=0.6, tau=0.4, steps=50, batch=4, lambdas=PAPER_LAMBDAS["anonymize"]),
    "hide": Preset(strength=0.8, tau=0.6, steps=100, batch=1, lambdas=PAPER_LAMBDAS["hide"]),
}


@dataclass(frozen=True)
class FaceTarget:
    """The face being protected in one image: where it is and whom it shows."""

    matrix: torch.Tensor  # [2, 3]: the ORIGINAL image's pixels -> the recogniser's aligned crop
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the original image's pixels
    embedding: torch.Tensor  # [D]: F(x), the original face's identity
    image_hw: tuple[int, int]  # the original image's height and width


def face_target(embedder: FaceEmbedder, image: torch.Tensor, face: Face) -> FaceTarget:
    """Alignment (the recogniser's own) and reference embedding of ``face`` in one [H, W, 3] image."""
    matrix = face_matrix(face, embedder.input_size, embedder.alignment)
    with torch.no_grad():
        embedding = embedder(warp_faces(image[None].float(), matrix, embedder.input_size))[0]
    return FaceTarget(matrix, face.box, embedding.detach(), (image.shape[0], image.shape[1]))


@dataclass(frozen=True)
class IdentityGuidance:
    """The identity guidance of a batch of images (the DP_GUIDANCE the nodes pass on).

    The embedder stays where its loader put it; a sampler on another device moves it there
    (``guidance.embedder.to(device)``: the recognisers are torch modules). Matrices and
    embeddings follow the decoded images by themselves.
    """

    embedder: FaceEmbedder
    mode: str  # "anonymize" or "hide" (energy.MODES)
    lambdas: LambdaSchedule
    targets: tuple[FaceTarget | None, ...]  # per reference image; None: no face, runs unguided
    normalize: bool = False  # FreeDoM-style: lambda relative to the DDIM step's size
    diversity: bool = True  # anonymize: include L_div between the batch's samples
    crop_margin: float | None = None  # decode only the face box grown by this x its size
    checkpoint_decoder: bool = False  # recompute decoder activations in backward: less memory, more time

    def target_for(self, index: int) -> FaceTarget | None:
        """The target of image ``index``; one reference image serves a whole batch."""
        if len(self.targets) == 1:
            return self.targets[0]
        if index >= len(self.targets):
            raise ValueError(f"identity guidance has {len(self.targets)} reference images, "
                             f"but image {index} of the batch needs one")
        return self.targets[index]


def latent_window(box, latent_hw: tuple[int, int], margin: float, factor: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) latent cells covering the face box grown by ``margin`` x
    its size on every side; ``factor`` pixels per latent cell."""
    x1, y1, x2, y2 = box
    grow = margin * max(x2 - x1, y2 - y1)
    h, w = latent_hw
    top, left = max(0, math.floor((y1 - grow) / factor)), max(0, math.floor((x1 - grow) / factor))
    bottom, right = min(h, math.ceil((y2 + grow) / factor)), min(w, math.ceil((x2 + grow) / factor))
    if bottom <= top or right <= left:
        raise ValueError(f"the face box {box} lies outside the {w * factor} x {h * factor} image")
    return top, left, bottom, right


class IdentityCorrection:
    """Algorithm 1's energy step for one face, as a ``ddim.Correction`` on one grid."""

    # SD's VAE: one latent cell is 8 x 8 pixels (used only to place the decode window).
    LATENT_FACTOR = VAE_FACTOR

    def __init__(self, guidance: IdentityGuidance, target: FaceTarget, decoder: Decoder, grid: Grid):
        self.guidance = guidance
        self.target = target
        self.decoder = decoder
        self.grid = grid

    def __call__(self, step: int, t: int, z_next: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        scale = self.guidance.lambdas(t)
        if scale == 0:
            return z_next
        grad = self.energy_gradient(x0)
        if self.guidance.normalize:
            z_t = ddim.ddim_step(x0, eps, self.grid.alphas[step])
            grad = normalize_gradient(grad, z_next - z_t)
        return z_next - scale * grad

    def window(self, latent_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        if self.guidance.crop_margin is None:
            return 0, 0, *latent_hw
        return latent_window(self.target.box, latent_hw, self.guidance.crop_margin, self.LATENT_FACTOR)

    def energy_gradient(self, x0: torch.Tensor) -> torch.Tensor:
        """dE/dz0hat' with z0hat' a detached leaf: no gradient flows back into the UNet."""
        embedder = self.guidance.embedder
        latent_hw = tuple(x0.shape[-2:])
        top, left, bottom, right = self.window(latent_hw)
        with torch.enable_grad():
            leaf = x0.detach().requires_grad_(True)
            image = self.decoder(leaf[..., top:bottom, left:right])
            factor = round(image.shape[1] / (bottom - top))  # the decoder's own pixels per latent cell
            dx, dy = latent_offset(self.target.image_hw, latent_hw, factor)
            matrix = shift_source(self.target.matrix, left * factor + dx, top * factor + dy)
            samples = embedder(warp_faces(image, matrix, embedder.input_size))
            total = energy(self.guidance.mode, self.target.embedding.to(samples), samples, self.guidance.diversity)
            (grad,) = torch.autograd.grad(total, leaf)
        return grad


class KeepOutsideMask:
    """Outside the protected region (mask 0), the latent is the original's, noised to the
    level the step reached with the noise the run started from, so the background comes
    back exactly at the end and stays consistent along the way."""

    def __init__(self, mask: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor, grid: Grid):
        self.mask = latent_mask(mask, tuple(z0.shape[-2:])).to(z0)
        self.z0 = z0
        self.noise = noise
        self.grid = grid

    def __call__(self, step: int, t: int, z_next: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        kept = ddim.add_noise(self.z0, self.noise, self.grid.alphas[step + 1])
        return self.mask * z_next + (1.0 - self.mask) * kept


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A [H, W] or [B, H, W] pixel mask as [1 or B, 1, h, w] at latent resolution (area
    average, so a cell partly inside the region is partly protected)."""
    mask = mask.float().reshape(-1, 1, *mask.shape[-2:])
    return F.interpolate(mask, size=latent_hw, mode="area").clamp(0, 1)


def chain(*corrections: ddim.Correction | None) -> ddim.Correction | None:
    """Corrections applied one after the other (Nones skipped)."""
    active = [c for c in corrections if c is not None]
    if not active:
        return None

    def apply(step, t, z_next, x0, eps):
        for correction in active:
            z_next = correction(step, t, z_next, x0, eps)
        return z_next

    return apply


def protect(
    eps_fn: ddim.EpsFn,
    z0: torch.Tensor,
    grid: Grid,
    strength: float,
    batch: int,
    seed: int,
    guidance: IdentityGuidance | None = None,
    decoder: Decoder | None = None,
    image_index: int = 0,
    protect_mask: torch.Tensor | None = None,
    callback: ddim.StepCallback | None = None,
) -> torch.Tensor:
    """One image's protection run: noise its latent z0 [1, 4, h, w] to the start of
    ``grid.tail(strength)`` with ``batch`` independent seeded noises, then run DDIM with the
    identity correction of ``guidance``'s target for ``image_index`` (through ``decoder``)
    and, with ``protect_mask``, the original kept outside the mask. Returns [batch, 4, h, w]."""
    tail = grid.tail(strength)
    z0 = z0.to(torch.float32).expand(batch, *z0.shape[1:])
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0.device)
    target = guidance.target_for(image_index) if guidance is not None else None
    identity = None
    if target is not None and not guidance.lambdas.is_off:
        if decoder is None:
            raise ValueError("identity guidance needs the VAE decoder")
        identity = IdentityCorrection(guidance, target, decoder, tail)
    background = KeepOutsideMask(protect_mask, z0, noise, tail) if protect_mask is not None else None
    return ddim.sample(eps_fn, ddim.add_noise(z0, noise, tail.alphas[0]), tail, chain(identity, background), callback)
