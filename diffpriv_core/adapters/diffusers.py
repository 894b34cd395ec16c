"""The host protocols over diffusers / transformers components, so the core runs (and is
tested) without ComfyUI: UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer,
CLIPVisionModel. The components are only called, never changed; they are duck-typed, so
this module imports neither library."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..clip_features import pick_blocks, to_clip_pixels

PLACEHOLDER = "*"


def _first_param(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


class DiffusersEps:
    """EpsModel over an eps-prediction ``UNet2DConditionModel``."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = _first_param(self.unet).dtype
        return self.unet(z_t.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()


class DiffusersCodec:
    """LatentCodec over ``AutoencoderKL``; latents scaled by its ``scaling_factor``."""

    def __init__(self, vae):
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def encode_moments(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        param = _first_param(self.vae)
        x = image[..., :3].movedim(-1, 1).to(param) * 2.0 - 1.0
        posterior = self.vae.encode(x).latent_dist
        return posterior.mean.float() * self.scale, posterior.std.float() * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(z.to(_first_param(self.vae).dtype) / self.scale).sample
        return ((x.float() + 1.0) / 2.0).movedim(1, -1)


class DiffusersText:
    """TextEncoder over ``CLIPTextModel`` + ``CLIPTokenizer``: the prompt "*" with the input
    embedding at the placeholder replaced (a forward hook on the token embedding, so the
    model's own positional embedding, masks and layer norm apply unchanged)."""

    def __init__(self, text_encoder, tokenizer, placeholder: str = PLACEHOLDER):
        self.model = text_encoder
        length = text_encoder.config.max_position_embeddings
        pieces = tokenizer(placeholder, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise ValueError(f"the placeholder {placeholder!r} must be one token; the tokenizer gives {pieces}")
        self.placeholder_id = pieces[0]
        self.prompt_ids = self._ids(tokenizer, placeholder, length)
        self.empty_ids = self._ids(tokenizer, "", length)
        self.slot = (self.prompt_ids == self.placeholder_id).unsqueeze(-1)  # [1, length, 1]

    @staticmethod
    def _ids(tokenizer, text: str, length: int) -> torch.Tensor:
        return tokenizer(text, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids

    def _device(self) -> torch.device:
        return _first_param(self.model).device

    @contextmanager
    def _substituted(self, token_embedding: torch.Tensor):
        slot = self.slot.to(self._device())

        def replace(_module, _args, output):
            return torch.where(slot, token_embedding.unsqueeze(1).to(output.dtype), output)

        handle = self.model.get_input_embeddings().register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()

    def encode_with_token(self, token_embedding: torch.Tensor) -> torch.Tensor:
        ids = self.prompt_ids.to(self._device()).expand(token_embedding.shape[0], -1)
        with self._substituted(token_embedding):
            return self.model(input_ids=ids).last_hidden_state.float()

    def encode_empty(self) -> torch.Tensor:
        return self.model(input_ids=self.empty_ids.to(self._device())).last_hidden_state.float()


class DiffusersImageFeatures:
    """ImageFeatures over ``CLIPVisionModel``: the kept blocks' hidden states (not normed)."""

    def __init__(self, vision_model):
        self.model = vision_model

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        param = _first_param(self.model)
        pixels = to_clip_pixels(image.to(param.device), size=self.model.config.image_size).to(param.dtype)
        hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        return pick_blocks(hidden[1:])  # hidden[0] is the embedding output, then one per block
