"""The core's host protocols over ComfyUI's CLIP, VAE and CLIP_VISION, as MSI needs them:
the text encoder differentiable w.r.t. the pseudo-token (a private autograd copy), the VAE
and CLIP vision used as they are, under no_grad. The UNet is adapters.ComfyEpsModel."""
from __future__ import annotations

import types

import comfy.clip_model
import comfy.model_management
import torch

from diffpriv_core.clip_features import check_vit_l14, pick_blocks, to_clip_pixels

from .adapters import decode_scaled
from .host import autograd_copy

PLACEHOLDER = "*"


def load_all(*patchers) -> None:
    """Load every model a loop needs up front, so none evicts another mid-loop."""
    comfy.model_management.load_models_gpu(list(patchers), force_full_load=True)


def alphas_of(model) -> torch.Tensor:
    """alpha_bar(t), t = 0..999, of the MODEL's own schedule."""
    sigmas = model.get_model_object("model_sampling").sigmas.detach().double().cpu()
    return 1.0 / (1.0 + sigmas**2)


class ComfyCodec:
    """LatentCodec over a KL VAE's first_stage_model, latents scaled by the MODEL's latent format."""

    def __init__(self, vae, model):
        stage = vae.first_stage_model
        if not (hasattr(stage, "encoder") and hasattr(stage, "decoder") and hasattr(stage, "regularization")):
            raise ValueError("MSI needs a KL autoencoder VAE (the SD 1.x VAE), not " + type(stage).__name__)
        self.vae, self.stage = vae, stage
        self.latent_format = model.model.latent_format

    def encode_moments(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.vae.process_input(image[..., :3].movedim(-1, 1)).to(self.vae.device, self.vae.vae_dtype)
        h = self.stage.encoder(x)
        if getattr(self.stage, "quant_conv", None) is not None:
            h = self.stage.quant_conv(h)
        mean, logvar = h.float().chunk(2, dim=1)
        std = (0.5 * logvar.clamp(-30.0, 20.0)).exp()
        return self.latent_format.process_in(mean), std * self.latent_format.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return decode_scaled(self.vae, self.stage, self.latent_format, z)


def _residual_out_of_place(layer, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward without its in-place residual adds, which break
    autograd (layer_norm1 saved the tensor the in-place add then changes)."""
    x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
    return x + layer.mlp(layer.layer_norm2(x))


def _differentiable(encoder: torch.nn.Module) -> torch.nn.Module:
    """A private frozen copy of a ComfyUI CLIP text encoder that autograd can go through."""
    encoder = autograd_copy(encoder, private=True)
    for layer in encoder.modules():
        if isinstance(layer, comfy.clip_model.CLIPLayer):
            layer.forward = types.MethodType(_residual_out_of_place, layer)
    return encoder


class ComfyText:
    """TextEncoder over an SD 1.x CLIP: the prompt "*" tokenized by the host, the placeholder
    replaced by the pseudo-token the way ComfyUI inserts textual-inversion embeddings, encoded
    with the CLIP's own layer setting (CLIPSetLastLayer) by a differentiable private copy."""

    def __init__(self, clip):
        encoder = clip.cond_stage_model
        if not isinstance(getattr(encoder, "clip", None), str):
            raise ValueError("MSI needs an SD 1.x CLIP text encoder (one CLIP-L), not " + type(encoder).__name__)
        self.encoder = _differentiable(getattr(encoder, encoder.clip))
        self.encoder.reset_clip_options()
        if clip.layer_idx is not None:
            self.encoder.set_clip_options({"layer": clip.layer_idx})
        name = encoder.clip_name
        self.prompt = [pair[0] for pair in clip.tokenize(PLACEHOLDER)[name][0]]
        self.empty = [pair[0] for pair in clip.tokenize("")[name][0]]
        special = set(self.encoder.special_tokens.values())
        slots = [i for i, token in enumerate(self.prompt) if token not in special]
        if len(slots) != 1:
            raise ValueError(f"the placeholder {PLACEHOLDER!r} must be one token, the host tokenizer gives {self.prompt}")
        self.slot = slots[0]

    def encode_with_token(self, token_embedding: torch.Tensor) -> torch.Tensor:
        prompts = [self.prompt[:self.slot] + [token] + self.prompt[self.slot + 1:] for token in token_embedding.float()]
        return self.encoder(prompts)[0].float()

    def encode_empty(self) -> torch.Tensor:
        return self.encoder([self.empty])[0].float()


def _vision_facts(clip_vision) -> tuple[str, int, int, int]:
    """(kind, hidden size, layers, patch size) of a CLIP_VISION's image encoder."""
    model = clip_vision.model
    if not isinstance(model, comfy.clip_model.CLIPVisionModelProjection):
        return type(model).__name__, 0, 0, 0
    vision = model.vision_model
    patch = vision.embeddings.patch_embedding
    kind = "clip" if vision.embeddings.class_embedding is not None else "siglip"
    return kind, patch.out_channels, len(vision.encoder.layers), patch.kernel_size[0]


def check_clip_vision(clip_vision) -> None:
    check_vit_l14(*_vision_facts(clip_vision))


class ComfyImageFeatures:
    """ImageFeatures over a CLIP_VISION: all block outputs, the MSI blocks cloned."""

    def __init__(self, clip_vision):
        check_clip_vision(clip_vision)
        self.clip_vision = clip_vision

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        cv = self.clip_vision
        pixels = to_clip_pixels(image, cv.image_size, cv.image_mean, cv.image_std).to(cv.load_device)
        hidden = cv.model(pixel_values=pixels, intermediate_output="all")[1]  # [B, layers, tokens, dim]
        return pick_blocks(hidden.unbind(1))
