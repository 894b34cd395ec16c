"""ComfyUI objects as the core's protocols (see diffpriv_core/adapters/protocols.py)."""
from __future__ import annotations

import functools

import comfy.model_management
import torch
import torch.utils.checkpoint

from diffpriv_core.ddim import eps_from_denoised, k_diffusion_scale
from diffpriv_core.keys import model_fingerprint

from .host import autograd_copy


class ComfyEpsModel:
    """The host's UNet (with whatever patches the user applied) as eps(z_t, t, cond).

    ComfyUI's ``apply_model`` works in k-diffusion's space, x = z_t / sqrt(alpha_bar), with
    sigma = sqrt((1 - alpha_bar) / alpha_bar), and returns the x0 estimate; the noise
    prediction is (x - x0) / sigma. Latents here are SD's scaled latents.
    """

    def __init__(self, model_patcher, differentiable: bool = False):
        """``differentiable``: run an autograd copy of the model, so gradients reach ``cond``
        and ``z_t`` (MSI training); otherwise the loaded model itself."""
        comfy.model_management.load_models_gpu([model_patcher])
        self.patcher = model_patcher
        self.base = autograd_copy(model_patcher.model) if differentiable else model_patcher.model
        self.model_sampling = model_patcher.get_model_object("model_sampling")
        self.device = model_patcher.load_device

    def sigma(self, t) -> torch.Tensor:
        """sigma of an integer timestep, or of each timestep of a tensor."""
        return self.model_sampling.sigma(torch.as_tensor(t, dtype=torch.float32)).float()

    def __call__(self, z_t: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        """``t``: one timestep for the batch, or a [B] tensor with one per sample."""
        sigma = self.sigma(t).to(self.device).expand(z_t.shape[0])
        s = sigma.view(-1, 1, 1, 1)
        x = z_t.to(self.device, torch.float32) * k_diffusion_scale(s)
        x0 = self.base.apply_model(x, sigma, c_crossattn=cond.to(self.device))
        return eps_from_denoised(x, x0.float(), s).to(z_t.device)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Of the UNet's weights, computed once per node run (keys and checks all need it)."""
        return model_fingerprint(self.base.diffusion_model.state_dict().items())

    def to_z(self, samples: torch.Tensor) -> torch.Tensor:
        """LATENT samples (raw VAE latents) -> scaled latents, float32."""
        return self.base.process_latent_in(samples.float()).float()

    def to_samples(self, z: torch.Tensor) -> torch.Tensor:
        return self.base.process_latent_out(z.float().cpu())


class ComfyDecoder:
    """The host VAE's decoder as the core's differentiable ``decode`` of scaled latents.

    It calls the decoder network directly: ``VAE.decode`` clamps (zero gradient outside
    [0, 1]) and may fall back to a tiled path that runs under inference mode.
    """

    def __init__(self, vae, latent_format, checkpointed: bool = False):
        self.vae = vae
        self.network = autograd_copy(vae.first_stage_model, private=checkpointed)
        self.latent_format = latent_format
        if checkpointed:
            checkpoint_blocks(self.network.decoder)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return decode_scaled(self.vae, self.network, self.latent_format, z)


def decode_scaled(vae, network: torch.nn.Module, latent_format, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> [B, H, W, 3] through ``network`` (the VAE's first stage, or a copy
    of it), unclamped."""
    raw = latent_format.process_out(z).to(vae.device, vae.vae_dtype)
    return ((network.decode(raw).float() + 1.0) / 2.0).movedim(1, -1)


def checkpoint_blocks(network: torch.nn.Module, block_class: str = "ResnetBlock") -> None:
    """Gradient checkpointing of a private module copy: each residual block keeps only its
    input and recomputes its activations during backward (the VAE decoder's activations at
    full resolution are what fills memory in the guidance step)."""
    for module in network.modules():
        if type(module).__name__ == block_class:
            forward = module.forward
            module.forward = functools.partial(torch.utils.checkpoint.checkpoint, forward, use_reentrant=False)
