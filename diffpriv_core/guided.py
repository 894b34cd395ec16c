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
from .energy import SimilarityTarget, cosines_to, energy, normalize_gradient
from .faces.align import face_matrix, shift_source, warp_faces
from .faces.detect import Face
from .frame import VAE_FACTOR, latent_offset
from .schedule import Grid, ddim_grid
from .tasks import LambdaSchedule

Decoder = Callable[[torch.Tensor], torch.Tensor]  # scaled latents -> [B, H, W, 3], unclamped


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
    mode: str  # the task whose energy is descended: "anonymize" or "hide" (tasks.TASKS)
    lambdas: LambdaSchedule
    targets: tuple[FaceTarget | None, ...]  # per reference image; None: no face, runs unguided
    normalize: bool = False  # FreeDoM-style: lambda relative to the DDIM step's size
    diversity: bool = True  # anonymize: include L_div between the batch's samples
    crop_margin: float | None = None  # decode only the face box grown by this x its size
    checkpoint_decoder: bool = False  # recompute decoder activations in backward: less memory, more time
    target: SimilarityTarget | None = None  # adapt lambda to reach a cosine (None: the fixed lambda_t)

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
    """Algorithm 1's energy step for one face, as a ``ddim.Correction`` on one grid. With a
    ``SimilarityTarget`` each sample's lambda adapts step by step instead (``gains``)."""

    def __init__(self, guidance: IdentityGuidance, target: FaceTarget, decoder: Decoder, grid: Grid):
        self.guidance = guidance
        self.target = target
        self.decoder = decoder
        self.grid = grid
        self.gains: torch.Tensor | None = None  # per-sample gain of the target mode's step

    def __call__(self, step: int, t: int, z_next: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        scale = self.guidance.lambdas(t)
        if scale == 0:
            return z_next
        grad, cosines = self.gradient_and_cosines(x0)
        if self.guidance.target is not None:  # lambda_t only switches it on; normalising is moot
            gains = torch.ones_like(cosines) if self.gains is None else self.gains
            scales, self.gains = self.guidance.target.step(self.guidance.mode, cosines, grad, gains)
            return z_next - scales.to(grad).reshape(-1, *(1,) * (grad.ndim - 1)) * grad
        if self.guidance.normalize:
            z_t = ddim.ddim_step(x0, eps, self.grid.alphas[step])
            grad = normalize_gradient(grad, z_next - z_t)
        return z_next - scale * grad

    def window(self, latent_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        if self.guidance.crop_margin is None:
            return 0, 0, *latent_hw
        return latent_window(self.target.box, latent_hw, self.guidance.crop_margin, VAE_FACTOR)

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """The guiding recogniser's embeddings [B, D] of the face in each decoded latent."""
        latent_hw = tuple(z.shape[-2:])
        top, left, bottom, right = self.window(latent_hw)
        image = self.decoder(z[..., top:bottom, left:right])
        factor = round(image.shape[1] / (bottom - top))  # the decoder's own pixels per latent cell
        dx, dy = latent_offset(self.target.image_hw, latent_hw, factor)
        return face_embeddings(self.guidance.embedder, self.target, image, left * factor + dx, top * factor + dy)

    def gradient_and_cosines(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dE/dz0hat' with z0hat' a detached leaf (no gradient flows back into the UNet), and
        each sample's cosine to the original."""
        with torch.enable_grad():
            leaf = x0.detach().requires_grad_(True)
            samples = self.embed(leaf)
            original = self.target.embedding.to(samples)
            total = energy(self.guidance.mode, original, samples, self.guidance.diversity)
            (grad,) = torch.autograd.grad(total, leaf)
        return grad, cosines_to(original, samples).detach()

    def energy_gradient(self, x0: torch.Tensor) -> torch.Tensor:
        return self.gradient_and_cosines(x0)[0]

    def similarity(self, z: torch.Tensor) -> torch.Tensor:
        """What the guiding recogniser says of a result: each sample's cosine to the original."""
        with torch.no_grad():
            samples = self.embed(z)
            return cosines_to(self.target.embedding.to(samples), samples)


def face_embeddings(embedder: FaceEmbedder, target: FaceTarget, images: torch.Tensor,
                    left: float = 0.0, top: float = 0.0) -> torch.Tensor:
    """The recogniser's embeddings [B, D] of ``target``'s face in ``images`` [B, H, W, 3],
    aligned like the original's; ``left``, ``top``: where the images' first pixel lies in
    the original (a window of it, or a padded or cropped frame)."""
    matrix = shift_source(target.matrix, left, top)
    return embedder(warp_faces(images, matrix, embedder.input_size))


def picture_similarity(embedder: FaceEmbedder, target: FaceTarget, pictures: torch.Tensor) -> torch.Tensor:
    """Each picture's cosine to the original face under ``embedder``: [B] for pictures
    [B, H, W, 3] of the original's size, the face read where the original's is (protection
    keeps the layout; the sampler's own report reads it there too)."""
    if tuple(pictures.shape[1:3]) != target.image_hw:
        height, width = target.image_hw
        raise ValueError(f"the pictures are {pictures.shape[2]} x {pictures.shape[1]} px, their original "
                         f"{width} x {height}: compare pictures of the original's size")
    with torch.no_grad():
        samples = face_embeddings(embedder, target, pictures.float())
        return cosines_to(target.embedding.to(samples), samples)


def achieved_similarity(guidance: IdentityGuidance, decoder: Decoder, z: torch.Tensor,
                        image_index: int = 0) -> torch.Tensor | None:
    """Each sample's cosine to its original under the guiding recogniser (None when the
    image had no face): what the protection achieved, for the report."""
    target = guidance.target_for(image_index)
    if target is None:
        return None
    return IdentityCorrection(guidance, target, decoder, grid=None).similarity(z)


def guide_without_diffusion(z0: torch.Tensor, guidance: IdentityGuidance, decoder: Decoder, steps: int,
                            image_index: int = 0, callback: ddim.StepCallback | None = None) -> torch.Tensor:
    """Identity guidance alone, a baseline beside blur and mosaic: the correction applied
    ``steps`` times to the latent itself (x0 = z: no UNet, no noise), with lambda_t on the
    grid's timesteps. With the image as its own latent (``decoder`` a mere layout change)
    it is a plain gradient attack on the recogniser."""
    target = guidance.target_for(image_index)
    if target is None or guidance.normalize or guidance.crop_margin is not None:
        raise ValueError("guidance without diffusion needs a face, and neither normalize_gradient nor a face crop")
    grid = ddim_grid(steps)
    correction = IdentityCorrection(guidance, target, decoder, grid)
    z = z0.detach().clone()
    for step, t in enumerate(grid.timesteps):
        z = correction(step, t, z, z, torch.zeros_like(z))
        if callback is not None:
            callback(step + 1, steps, z, z)
    return z


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


def start_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """The noise image ``index`` of a batch starts from: one independent noise per sample,
    seeded ``seed + index``, so an image gets the same pictures whatever batch it is in."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + index))


@dataclass(frozen=True)
class Protection:
    """What Algorithm 1 does besides DDIM, for each image of a batch: the identity energy
    step of ``guidance`` (None: the w/o-guidance ablation), then, with ``masks`` ([1 or B,
    H, W] pixel masks, 1 = protect), the original kept outside the mask."""

    guidance: IdentityGuidance | None = None
    masks: torch.Tensor | None = None

    def check_frame(self, index: int, latent_hw: tuple[int, int]) -> None:
        """Before any compute: the latent of image ``index`` must be the encoding of its
        reference image (padded to a multiple of 8 by Pad to VAE Size, or cropped to one,
        centred, by VAE Encode; the guidance follows either)."""
        target = self.guidance.target_for(index) if self.guidance is not None else None
        if target is not None:
            try:
                latent_offset(target.image_hw, latent_hw, VAE_FACTOR)
            except ValueError as exc:
                raise ValueError(f"image {index} of 'latent' does not match 'guidance': {exc}") from None

    def correction(self, index: int, grid: Grid, z0: torch.Tensor, noise: torch.Tensor,
                   decoder: Callable[[bool], Decoder] | None) -> ddim.Correction | None:
        """The correction of image ``index`` on ``grid``, whose run starts from the scaled
        latents ``z0`` noised with ``noise``; ``decoder(checkpointed)`` gives the
        differentiable VAE decoder, asked for only when the identity step runs."""
        self.check_frame(index, tuple(z0.shape[-2:]))
        target = self.guidance.target_for(index) if self.guidance is not None else None
        identity = None
        if target is not None and not self.guidance.lambdas.is_off:
            if decoder is None:
                raise ValueError("identity guidance needs the VAE decoder")
            self.guidance.embedder.to(z0.device)
            identity = IdentityCorrection(self.guidance, target, decoder(self.guidance.checkpoint_decoder), grid)
        background = None
        if self.masks is not None:
            masks = self.masks.reshape(-1, *self.masks.shape[-2:])
            background = KeepOutsideMask(masks[min(index, masks.shape[0] - 1)], z0, noise, grid)
        return chain(identity, background)


def by_rows(parts: list[tuple[slice, ddim.Correction | None]]) -> ddim.Correction | None:
    """One correction for a batch whose rows belong to several images: each image's own
    correction on its rows (None: its rows pass unchanged). Nones only: None."""
    if all(correction is None for _rows, correction in parts):
        return None

    def apply(step, t, z_next, x0, eps):
        return torch.cat([z_next[rows] if correction is None else correction(step, t, z_next[rows], x0[rows], eps[rows])
                          for rows, correction in parts])

    return apply


def image_groups(images: int, samples: int, batch_size: int) -> list[list[int]]:
    """The images of a batch in groups sampled together: as many whole images (each with
    its ``samples``) as fit in ``batch_size`` latents, at least one (0: all together)."""
    per_group = images if batch_size <= 0 else max(1, batch_size // samples)
    return [list(range(first, min(images, first + per_group))) for first in range(0, images, per_group)]


def sample_rows(group: list[int], samples: int) -> list[slice]:
    """Where each image of a group lies in its latents: ``samples`` rows each, in order."""
    return [slice(k * samples, (k + 1) * samples) for k in range(len(group))]


GroupSampler = Callable[[list[int], torch.Tensor, torch.Tensor], torch.Tensor]


def protect_batch(sample_group: GroupSampler, originals: torch.Tensor, samples: int, seed: int,
                  groups: list[list[int]] | None = None, noise_index: list[int] | None = None) -> torch.Tensor:
    """Stage II over a batch of original latents [B, 4, h, w]: image i is copied ``samples``
    times, and ``sample_group(images, z0, noise)`` runs one DDIM (the core's own in
    ``protect``, or a host's sampler) for each of ``groups`` together (``image_groups``;
    None: all images in one group, one UNet call a step), image i from ``start_noise(seed, i)`` whatever
    its group (``noise_index[i]`` instead of ``i`` when given: faces of several photos in
    one batch are seeded by their index within their own photo, faces.photo_batch). Returns
    [B * samples, 4, h, w], image 0's samples first."""
    noise_index = list(range(originals.shape[0])) if noise_index is None else noise_index
    if len(noise_index) != originals.shape[0]:
        raise ValueError(f"{len(noise_index)} noise indices for {originals.shape[0]} images")
    outputs = []
    for group in groups or [list(range(originals.shape[0]))]:
        z0 = torch.cat([originals[i][None].expand(samples, *originals.shape[1:]) for i in group]).clone()
        noise = torch.cat([start_noise((samples, *originals.shape[1:]), seed, noise_index[i]) for i in group])
        outputs.append(sample_group(group, z0, noise))
    return torch.cat(outputs)


def protect(
    eps_fn: ddim.EpsFn,
    originals: torch.Tensor,
    grid: Grid,
    strength: float,
    samples: int,
    seed: int,
    guidance: IdentityGuidance | None = None,
    decoder: Decoder | None = None,
    masks: torch.Tensor | None = None,
    callback: ddim.StepCallback | None = None,
    batch_size: int = 0,
) -> torch.Tensor:
    """Algorithm 1 with the core's own DDIM: noise each scaled latent of ``originals``
    [B, 4, h, w] to the start of ``grid.tail(strength)``, then run DDIM over ``eps_fn`` with
    the ``Protection`` of ``guidance`` (through ``decoder``) and ``masks``, the images in
    groups of at most ``batch_size`` latents (0: all together). ``eps_fn`` gets each
    group's latents in one call, so it must condition row by row (recovery.conditioned_eps
    with one key-E per row). Returns [B * samples, 4, h, w]."""
    tail = grid.tail(strength)
    protection = Protection(guidance, masks)
    decode = None if decoder is None else lambda _: decoder

    def sample_group(group: list[int], z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        z0, noise = z0.to(torch.float32), noise.to(z0.device)
        correction = by_rows([(rows, protection.correction(i, tail, z0[rows], noise[rows], decode))
                              for i, rows in zip(group, sample_rows(group, samples))])
        return ddim.sample(eps_fn, ddim.add_noise(z0, noise, tail.alphas[0]), tail, correction, callback)

    return protect_batch(sample_group, originals, samples, seed, image_groups(originals.shape[0], samples, batch_size))
