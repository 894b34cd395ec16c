"""Stage II: the Guided DDIM Sampler (Algorithm 1) as a node and as a SAMPLER."""
from __future__ import annotations

import math

import comfy.model_management
import comfy.samplers
import latent_preview
import torch
from comfy_api.v0_0_2 import io

from diffpriv_core import ddim
from diffpriv_core.frame import latent_offset
from diffpriv_core.guided import PRESETS, IdentityCorrection, KeepOutsideMask, chain
from diffpriv_core.schedule import ddim_grid, grid_from_sigmas

from .adapters import ComfyDecoder
from .inputs import TEXT_WIDTH, check_finite, one_or_batch, sd1_model, sd_latents
from .types import Guidance

NAME = "Guided DDIM Sampler"


def sample_guided_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, make_correction=None):
    """A k-diffusion-style sampler function: deterministic DDIM over the guider's model (so
    CFG, ControlNet, LoRA and ComfyUI's own noise masks apply), with Algorithm 1's correction
    after every step. k-diffusion's x is z / sqrt(alpha_bar); the core works on z."""
    extra_args = extra_args or {}
    grid = grid_from_sigmas(sigmas)
    sigma_at = dict(zip(grid.timesteps, sigmas.tolist()))
    s_in = x.new_ones([x.shape[0]])

    def eps_fn(z, t):
        sigma = sigma_at[t]
        x_t = z * math.sqrt(1.0 + sigma**2)
        with torch.no_grad():  # Algorithm 1 never backpropagates through the UNet
            return (x_t - model(x_t, sigma * s_in, **extra_args)) / sigma

    def step_callback(k, _total, z, x0):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback({"x": z, "i": k, "sigma": sigmas[k], "sigma_hat": sigmas[k], "denoised": x0})

    z = x / math.sqrt(1.0 + float(sigmas[0]) ** 2)
    # Out of inference mode so the correction can take gradients w.r.t. the x0 estimates.
    with torch.inference_mode(False):
        correction = make_correction(grid, model) if make_correction is not None else None
        return ddim.sample(eps_fn, z.clone(), grid, correction=correction, callback=step_callback).to(x.dtype)


class ProtectionCorrection:
    """Builds Algorithm 1's correction (identity energy, then keeping the unmasked
    original) once the sampler knows its grid; ``model`` is the sampler's wrapped model,
    which holds the original latent, the start noise and the latent format."""

    def __init__(self, decoders: "DecoderCache", guidance=None, index: int = 0, mask: torch.Tensor | None = None):
        self.decoders = decoders
        self.guidance = guidance
        self.index = index
        self.mask = mask

    def __call__(self, grid, model):
        identity = None
        target = self.guidance.target_for(self.index) if self.guidance is not None else None
        if target is not None:
            check_reference_frame(target, tuple(model.latent_image.shape[-2:]), self.index)
        if target is not None and not self.guidance.lambdas.is_off:
            self.guidance.embedder.to(model.latent_image.device)
            decoder = self.decoders.get(model.inner_model.inner_model.latent_format,
                                        self.guidance.checkpoint_decoder)
            identity = IdentityCorrection(self.guidance, target, decoder, grid)
        background = None
        if self.mask is not None:
            background = KeepOutsideMask(self.mask, model.latent_image.float(), model.noise.float(), grid)
        return chain(identity, background)


class DecoderCache:
    """One differentiable copy of the VAE decoder per node run, made on first use."""

    def __init__(self, vae):
        self.vae = vae
        self.decoders: dict[bool, ComfyDecoder] = {}

    def get(self, latent_format, checkpointed: bool = False) -> ComfyDecoder:
        if checkpointed not in self.decoders:
            self.decoders[checkpointed] = ComfyDecoder(self.vae, latent_format, checkpointed)
        return self.decoders[checkpointed]


def check_reference_frame(target, latent_hw: tuple[int, int], index: int, node: str = "Guided DDIM") -> None:
    """Before any compute: the latent must be the encoding of the guidance's reference image
    (padded to a multiple of 8 by Pad to VAE Size, or cropped to one, centred, by VAE Encode;
    the guidance follows either)."""
    try:
        latent_offset(target.image_hw, latent_hw, IdentityCorrection.LATENT_FACTOR)
    except ValueError as exc:
        raise ValueError(f"{node}: image {index} of 'latent' does not match 'guidance': {exc}") from None


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


def conditioning_row(conditioning: list, index: int) -> list:
    """The CONDITIONING of image ``index`` when it was batched (one key-E per image)."""
    rows = []
    for cond, options in conditioning:
        if cond.shape[0] > 1:
            if index >= cond.shape[0]:
                raise ValueError(f"the conditioning holds {cond.shape[0]} rows, but image {index} needs one")
            cond = cond[index:index + 1]
        rows.append([cond, options])
    return rows


def guided_sampler(make_correction) -> comfy.samplers.KSAMPLER:
    return comfy.samplers.KSAMPLER(sample_guided_ddim, extra_options={"make_correction": make_correction})


class GuidedDDIMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyGuidedDDIMSampler",
            display_name="Guided DDIM Sampler (Diff-Privacy)",
            category="Diff-Privacy/protect",
            description="Stage II: noises each original latent to S_ns*T, then runs deterministic DDIM with the "
                        "scheduled key-E and the identity-energy correction (Algorithm 1).",
            inputs=[
                io.Model.Input("model"),
                io.Vae.Input("vae"),
                io.Conditioning.Input("positive", tooltip="from the Embedding Scheduler"),
                io.Latent.Input("latent", tooltip="the original image(s), VAE-encoded"),
                io.Combo.Input("preset", options=[*PRESETS, "custom"], default="anonymize",
                               tooltip="anonymize: S_ns 0.6, 50 steps, 4 samples; hide: S_ns 0.8, 100 steps, "
                                       "1 sample; custom: the values below"),
                io.Float.Input("s_ns", default=0.6, min=0.01, max=1.0, step=0.01,
                               tooltip="noise strength: the fraction of the DDIM grid that is re-run"),
                io.Int.Input("steps", default=50, min=1, max=500),
                io.Int.Input("samples", default=4, min=1, max=64, tooltip="independent samples per image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                Guidance.Input("guidance", optional=True, tooltip="none = the w/o-guidance ablation"),
                io.Mask.Input("mask", optional=True, tooltip="white = protect, black = keep the original"),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, vae, positive, latent, preset, s_ns, steps, samples, seed,
                guidance=None, mask=None) -> io.NodeOutput:
        originals = sd_latents(latent, NAME)
        sd1_model(model, NAME)
        batch = originals.shape[0]
        check_conditioning(positive, batch, NAME)
        if mask is not None:
            mask = mask.reshape(-1, *mask.shape[-2:])
            one_or_batch(mask.shape[0], batch, NAME, "mask", "mask", "latent")
            check_finite(mask, NAME, "mask")
        if guidance is not None:
            one_or_batch(len(guidance.targets), batch, NAME, "guidance", "reference image", "latent")
            for i in range(batch):
                target = guidance.target_for(i)
                if target is not None:
                    check_reference_frame(target, tuple(originals.shape[-2:]), i, NAME)
        if preset in PRESETS:
            s_ns, steps, samples = PRESETS[preset].strength, PRESETS[preset].steps, PRESETS[preset].batch
        sigmas = ddim_grid(steps).tail(s_ns).sigmas().float()
        # The UNet and the VAE stay loaded together: loading one mid-loop could evict the other.
        model = model.clone()
        model.set_additional_models("diffprivacy_vae", [vae.patcher])
        decoders = DecoderCache(vae)
        outputs = []
        for i, original in enumerate(originals):
            image_mask = mask[min(i, mask.shape[0] - 1)] if mask is not None else None
            sampler = guided_sampler(ProtectionCorrection(decoders, guidance, i, image_mask))
            guider = comfy.samplers.CFGGuider(model)
            rows = conditioning_row(positive, i)
            guider.set_conds(rows, rows)
            guider.set_cfg(1.0)
            z0_raw = original[None].expand(samples, -1, -1, -1).clone()
            noise = torch.randn(z0_raw.shape, generator=torch.Generator().manual_seed(seed + i))
            callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
            outputs.append(guider.sample(noise, z0_raw, sampler, sigmas, callback=callback, seed=seed + i).cpu())
        return io.NodeOutput({"samples": torch.cat(outputs)})


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
                io.Vae.Input("vae"),
                Guidance.Input("guidance", optional=True),
                io.Int.Input("image_index", default=0, min=0, max=4096,
                             tooltip="which reference image of the guidance this sampler protects"),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, vae, image_index, guidance=None) -> io.NodeOutput:
        return io.NodeOutput(guided_sampler(ProtectionCorrection(DecoderCache(vae), guidance, image_index)))
