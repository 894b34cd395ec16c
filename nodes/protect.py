"""Stage II: the Guided DDIM Sampler (Algorithm 1) as a node and as a SAMPLER."""
from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext

import comfy.model_management
import comfy.samplers
import latent_preview
import torch
from comfy_api.v0_0_2 import io

from diffpriv_core import ddim
from diffpriv_core.ddim import eps_from_denoised, k_diffusion_scale
from diffpriv_core.faces.photo_batch import noise_indices
from diffpriv_core.guided import (Protection, achieved_similarity, by_rows, image_groups, protect_batch,
                                  sample_rows)
from diffpriv_core.passes import PassCounter
from diffpriv_core.schedule import ddim_grid, grid_from_sigmas
from diffpriv_core.tasks import TASKS, preset_value

from .adapters import ComfyDecoder
from .host import Progress
from .inputs import TEXT_WIDTH, check_finite, one_or_batch, sd1_model, sd_latents
from .similarity import report_text, similarity_entry
from .types import FaceCrops, Guidance, batch_size_input

log = logging.getLogger("diffprivacy")
NAME = "Guided DDIM Sampler"
# Latents per UNet call: four faces with their 4 candidates each. Sampling takes no UNet
# gradient; the guidance decodes and backpropagates one face's candidates at a time. Chosen
# for a 24 GB card with 512 px crops (not yet measured on one).
DEFAULT_BATCH = 16


def sample_guided_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, make_correction=None,
                       counter: PassCounter | None = None):
    """A k-diffusion-style sampler function: deterministic DDIM over the guider's model (so
    CFG, ControlNet, LoRA and ComfyUI's own noise masks apply), with Algorithm 1's correction
    after every step. k-diffusion's x is z / sqrt(alpha_bar); the core works on z.
    ``counter`` counts the model's passes (the correction counts its own)."""
    extra_args = extra_args or {}
    grid = grid_from_sigmas(sigmas)  # refuses schedules that repeat a timestep
    sigma_at = dict(zip(grid.timesteps, sigmas.tolist()))  # position by position: one sigma per timestep
    s_in = x.new_ones([x.shape[0]])

    def eps_fn(z, t):
        sigma = sigma_at[t]
        x_t = z * k_diffusion_scale(sigma)
        with torch.no_grad():  # Algorithm 1 never backpropagates through the UNet
            return eps_from_denoised(x_t, model(x_t, sigma * s_in, **extra_args), sigma)

    if counter is not None:
        eps_fn = counter.eps_fn(eps_fn)
    def step_callback(k, _total, z, x0):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback({"x": z, "i": k, "sigma": sigmas[k], "sigma_hat": sigmas[k], "denoised": x0})

    z = x / k_diffusion_scale(float(sigmas[0]))
    # Out of inference mode so the correction can take gradients w.r.t. the x0 estimates.
    with torch.inference_mode(False):
        correction = make_correction(grid, model) if make_correction is not None else None
        z = ddim.sample(eps_fn, z.clone(), grid, correction=correction, callback=step_callback)
        if make_correction is not None:
            make_correction.measure(z)
        return z.to(x.dtype)


class ProtectionCorrection:
    """Image ``index``'s ``Protection`` for the SAMPLER, built once the sampler knows its
    grid; ``model`` is the sampler's wrapped model, which holds the original latent, the
    start noise and the latent format. With a ``counter``, the decoder and recogniser
    passes are counted there."""

    def __init__(self, decoders: "DecoderCache", protection: Protection, index: int = 0, node: str = "Guided DDIM",
                 counter: PassCounter | None = None, rows: slice = slice(None), owner: int = 0):
        self.decoders = decoders
        self.rows, self.owner = rows, owner  # its samples' rows in the sampler's batch, its place in the group
        if counter is not None and protection.guidance is not None:
            guidance = dataclasses.replace(protection.guidance, embedder=counter.embedder(protection.guidance.embedder))
            protection = dataclasses.replace(protection, guidance=guidance)
        self.protection = protection
        self.counter = counter
        self.index = index
        self.node = node
        self.latent_format = None
        self.similarity: list[float] | None = None  # each sample's cosine to the original, once sampled

    def __call__(self, grid, model):
        self.latent_format = model.inner_model.inner_model.latent_format
        try:
            return self.protection.correction(self.index, grid, model.latent_image.float()[self.rows],
                                              model.noise.float()[self.rows], self.decoder)
        except ValueError as exc:
            raise ValueError(f"{self.node}: {exc}") from None

    def measure(self, z: torch.Tensor) -> None:
        """What the guiding recogniser says of the finished samples (scaled latents)."""
        guidance = self.protection.guidance
        if guidance is None or guidance.lambdas.is_off or self.latent_format is None:
            return
        similarity = achieved_similarity(guidance, self.decoder(guidance.checkpoint_decoder), z, self.index)
        if similarity is not None:
            self.similarity = similarity.tolist()
            # A SAMPLER returns latents only: the log is where SamplerCustom users read this.
            text = report_text([similarity_report(guidance, self.index, self.similarity)])
            log.info("Diff-Privacy %s: %s", self.node, text.replace("**", "").replace("\n", "; "))

    def owning(self, rows: int):
        """The counter's passes inside the block are this image's (``rows`` samples)."""
        return nullcontext() if self.counter is None else self.counter.rows([self.owner] * rows)

    def owned(self, correction):
        """``correction`` with its passes counted as this image's."""
        if correction is None:
            return None

        def apply(step, t, z_next, x0, eps):
            with self.owning(z_next.shape[0]):
                return correction(step, t, z_next, x0, eps)
        return apply

    def decoder(self, checkpointed: bool):
        decoder = self.decoders.get(self.latent_format, checkpointed)
        return decoder if self.counter is None else self.counter.decoder(decoder)


class GroupCorrection:
    """The ``ProtectionCorrection`` of every image of a group sampled together, each on its
    own rows; the decoder and recogniser passes each makes are counted as that image's."""

    def __init__(self, parts: list[ProtectionCorrection]):
        self.parts = parts

    def __call__(self, grid, model):
        return by_rows([(part.rows, part.owned(part(grid, model))) for part in self.parts])

    def measure(self, z: torch.Tensor) -> None:
        for part in self.parts:
            with part.owning(z[part.rows].shape[0]):
                part.measure(z[part.rows])


class DecoderCache:
    """One differentiable copy of the VAE decoder per node run, made on first use."""

    def __init__(self, vae):
        self.vae = vae
        self.decoders: dict[bool, ComfyDecoder] = {}

    def get(self, latent_format, checkpointed: bool = False) -> ComfyDecoder:
        if checkpointed not in self.decoders:
            self.decoders[checkpointed] = ComfyDecoder(self.vae, latent_format, checkpointed)
        return self.decoders[checkpointed]


def check_conditioning(conditioning, batch: int, node: str, name: str = "positive") -> None:
    """CONDITIONING for SD 1.x with one row for all images or one per image."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{node}: '{name}' is an empty CONDITIONING")
    for cond, _options in conditioning:
        if cond.ndim != 3 or cond.shape[-1] != TEXT_WIDTH:
            raise ValueError(f"{node}: '{name}' holds conditionings of shape {tuple(cond.shape)}; SD 1.x needs "
                             f"[rows, tokens, {TEXT_WIDTH}] (from the Embedding Scheduler or an SD 1.x text encoder)")
        one_or_batch(cond.shape[0], batch, node, name, "conditioning row", "latent")
        check_finite(cond, node, name)


def conditioning_rows(conditioning: list, group: list[int], samples: int) -> list:
    """The CONDITIONING of a group of images sampled together, ``samples`` rows for each
    (one key-E per image when it was batched; one row serves every image)."""
    rows = []
    for cond, options in conditioning:
        if cond.shape[0] > 1:
            if max(group) >= cond.shape[0]:
                raise ValueError(f"the conditioning holds {cond.shape[0]} rows, but image {max(group)} needs one")
            cond = cond[group].repeat_interleave(samples, dim=0)
        rows.append([cond, options])
    return rows


def guided_sampler(make_correction, counter: PassCounter | None = None) -> comfy.samplers.KSAMPLER:
    return comfy.samplers.KSAMPLER(sample_guided_ddim, extra_options={"make_correction": make_correction,
                                                                      "counter": counter})


class GuidedDDIMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyGuidedDDIMSampler",
            display_name="Guided DDIM Sampler (Diff-Privacy)",
            category="Diff-Privacy/protect",
            description="Stage II: noises each original latent to the start of the last S_ns x steps of the DDIM "
                        "grid (t = 581 of 50 steps to anonymize, 791 of 100 to hide), then runs deterministic DDIM "
                        "with the scheduled key-E and the identity-energy correction (Algorithm 1).",
            inputs=[
                io.Model.Input("model", tooltip="the SD 1.x checkpoint key-E was made with"),
                io.Vae.Input("vae", tooltip="its VAE: the guidance decodes through it at every step"),
                io.Conditioning.Input("positive", tooltip="from the Embedding Scheduler"),
                io.Latent.Input("latent", tooltip="the original image(s), VAE-encoded"),
                io.Combo.Input("preset", options=[*TASKS, "custom"], default="anonymize",
                               tooltip="anonymize: S_ns 0.6, 50 steps, 4 samples; hide: S_ns 0.8, 100 steps, "
                                       "1 sample; for the inputs below left at 0. custom: the values below"),
                io.Float.Input("s_ns", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="noise strength: the fraction of the DDIM grid that is re-run; 0 = the preset's"),
                io.Int.Input("steps", default=0, min=0, max=500, tooltip="0 = the preset's"),
                io.Int.Input("samples", default=0, min=0, max=64,
                             tooltip="independent samples per image; 0 = the preset's"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="seeds each candidate's noise: the same seed gives the same pictures"),
                Guidance.Input("guidance", optional=True, tooltip="none = the w/o-guidance ablation"),
                io.Mask.Input("mask", optional=True, tooltip="white = protect, black = keep the original"),
                batch_size_input(DEFAULT_BATCH, 1024, "the images (with their samples each) sample together, one "
                                 "call a step for as many whole images as fit", "The pictures do"),
                FaceCrops.Input("crop_info", optional=True,
                                tooltip="the crops' crop_info (from Face Crop, or Face Batch for several photos): "
                                        "each face's noise is then seeded by its index within its own photo (seed + "
                                        "face index), so a face gets the same pictures whichever photos share the "
                                        "batch"),
            ],
            outputs=[io.Latent.Output(display_name="latent",
                                       tooltip="the protected latents: samples per image, image 0's first"),
                     io.Float.Output(display_name="identity_similarity", is_output_list=True,
                                     tooltip="per sample, the guiding recogniser's cosine to the original "
                                             "(none for images without guidance)"),
                     io.String.Output(display_name="identity_report",
                                      tooltip="the similarities in words: threshold verdicts, and whether the "
                                              "target similarity was reached (wire into Preview as Text)")],
        )

    @classmethod
    def execute(cls, model, vae, positive, latent, preset, s_ns, steps, samples, seed,
                guidance=None, mask=None, batch_size=DEFAULT_BATCH, crop_info=None) -> io.NodeOutput:
        originals = sd_latents(latent, NAME)
        sd1_model(model, NAME)
        batch = originals.shape[0]
        check_conditioning(positive, batch, NAME)
        if mask is not None:
            mask = mask.reshape(-1, *mask.shape[-2:])
            one_or_batch(mask.shape[0], batch, NAME, "mask", "mask", "latent")
            check_finite(mask, NAME, "mask")
        protection = Protection(guidance, mask)
        if guidance is not None:
            one_or_batch(len(guidance.targets), batch, NAME, "guidance", "reference image", "latent")
            for i in range(batch):
                try:
                    protection.check_frame(i, tuple(originals.shape[-2:]))
                except ValueError as exc:
                    raise ValueError(f"{NAME}: {exc}") from None
        s_ns = preset_value(NAME, preset, "s_ns", s_ns, 0.0, setting="strength")
        steps = preset_value(NAME, preset, "steps", steps, 0)
        samples = preset_value(NAME, preset, "samples", samples, 0)
        sigmas = ddim_grid(steps).tail(s_ns).sigmas().float()
        noise_index = face_noise_indices(crop_info, batch)
        # The UNet and the VAE stay loaded together: loading one mid-loop could evict the other.
        model = model.clone()
        model.set_additional_models("diffprivacy_vae", [vae.patcher])
        decoders = DecoderCache(vae)
        report, passes = [], []
        groups = image_groups(batch, samples, batch_size)
        # One bar over the whole batch (the images sample in groups), with previews.
        step_callback = preview_callback(model, Progress(len(groups) * (sigmas.shape[-1] - 1)))

        def sample_group(group, z0_raw, noise):
            counter = PassCounter()
            corrections = [ProtectionCorrection(decoders, protection, i, NAME, counter, rows, owner=k)
                           for k, (i, rows) in enumerate(zip(group, sample_rows(group, samples)))]
            sampler = guided_sampler(GroupCorrection(corrections), counter)
            guider = comfy.samplers.CFGGuider(model)
            rows = conditioning_rows(positive, group, samples)
            guider.set_conds(rows, rows)
            guider.set_cfg(1.0)
            latent = guider.sample(noise, z0_raw, sampler, sigmas, callback=step_callback,
                                  seed=seed + noise_index[group[0]]).cpu()
            report.extend(similarity_report(protection.guidance, c.index, c.similarity)
                          for c in corrections if c.similarity is not None)
            passes.extend(dict(entry, candidates=samples, decode_region=decode_region(protection.guidance))
                          for entry in counter.report(NAME, len(group), first=group[0]))
            return latent

        latents = protect_batch(sample_group, originals, samples, seed, groups, noise_index)
        similarities = [c for entry in report for c in entry["cosines"]]
        text = report_text(report)
        return io.NodeOutput({"samples": latents}, similarities, text,
                             ui={"identity_similarity": report, "text": [text], "passes": passes})


def face_noise_indices(crop_info, batch: int) -> list[int]:
    """Per image, the index its noise is seeded by: its place in the batch, or with
    ``crop_info`` its face's index within its own photo."""
    if crop_info is None:
        return list(range(batch))
    if len(crop_info) != batch:
        raise ValueError(f"{NAME}: {len(crop_info)} face crops for {batch} latents: connect the crop_info of the "
                         "crops the latent encodes")
    return noise_indices(crop_info)


def preview_callback(model, progress: Progress):
    """A sampler callback, as latent_preview.prepare_callback's, that steps ``progress``."""
    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

    def callback(_step, x0, _x, _total_steps):
        progress.step(preview=previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None)
    return callback


def decode_region(guidance) -> str | None:
    """What the guidance step decodes: the face crop or the whole frame (None: no guidance)."""
    if guidance is None or guidance.lambdas.is_off:
        return None
    return "whole frame" if guidance.crop_margin is None else "face crop"


def similarity_report(guidance, index: int, cosines: list[float]) -> dict:
    """One image's achieved similarity, as the history shows it (and summary.json keeps it)."""
    target = guidance.target
    return similarity_entry(index, guidance.embedder, cosines, guidance.mode,
                            None if target is None else target.goal(guidance.mode))


class GuidedDDIMSamplerSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyGuidedDDIM",
            display_name="Guided DDIM (Diff-Privacy SAMPLER)",
            category="Diff-Privacy/protect",
            description="Algorithm 1 as a SAMPLER for SamplerCustom / SamplerCustomAdvanced, so it composes with "
                        "LoRA, ControlNet and other guiders. Use sigmas from BasicScheduler (ddim_uniform, "
                        "denoise = S_ns) and a LATENT batch of one image's samples.",
            inputs=[
                io.Vae.Input("vae", tooltip="the VAE the guidance decodes through at every step"),
                Guidance.Input("guidance", optional=True,
                               tooltip="from Identity Energy Guidance; without it the SAMPLER is plain DDIM"),
                io.Int.Input("image_index", default=0, min=0, max=4096,
                             tooltip="which reference image of the guidance this sampler protects"),
            ],
            outputs=[io.Sampler.Output(tooltip="a SAMPLER for SamplerCustom (and SamplerCustomAdvanced)")],
        )

    @classmethod
    def execute(cls, vae, image_index, guidance=None) -> io.NodeOutput:
        return io.NodeOutput(guided_sampler(ProtectionCorrection(DecoderCache(vae), Protection(guidance), image_index)))
