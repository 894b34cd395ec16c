"""Network passes counted where the core calls its host: what one protected face costs,
independent of the hardware.

``PassCounter`` wraps the host protocols (EpsModel, LatentCodec, a decoder, FaceEmbedder,
ImageFeatures, TextEncoder) without changing a value they return. Every pass is counted
per image of the batch (a UNet call on 4 latents is 4 UNet passes). A backward pass is
counted when a gradient really flows back through the network's output (a hook on that
output), so the counts say what ran, not what the code meant to run. Decoder passes also
record the pixel sizes decoded, which tells a whole frame from a face crop.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import torch

UNET_FORWARD, UNET_BACKWARD = "unet_forward", "unet_backward"
VAE_ENCODE = "vae_encode"
DECODE_FORWARD, DECODE_BACKWARD = "vae_decode_forward", "vae_decode_backward"
RECOGNISER_FORWARD, RECOGNISER_BACKWARD = "recogniser_forward", "recogniser_backward"
CLIP_VISION, TEXT_FORWARD, TEXT_BACKWARD = "clip_vision", "text_forward", "text_backward"
NAMES = (UNET_FORWARD, UNET_BACKWARD, VAE_ENCODE, DECODE_FORWARD, DECODE_BACKWARD, RECOGNISER_FORWARD,
         RECOGNISER_BACKWARD, CLIP_VISION, TEXT_FORWARD, TEXT_BACKWARD)
TITLES = {UNET_FORWARD: "UNet fwd", UNET_BACKWARD: "UNet bwd", VAE_ENCODE: "VAE enc", DECODE_FORWARD: "VAE dec fwd",
          DECODE_BACKWARD: "VAE dec bwd", RECOGNISER_FORWARD: "recogniser fwd", RECOGNISER_BACKWARD: "recogniser bwd",
          CLIP_VISION: "CLIP vision", TEXT_FORWARD: "text enc fwd", TEXT_BACKWARD: "text enc bwd"}
DECODER_PIXELS = 8  # SD's VAE: one latent cell decodes to 8 x 8 pixels


class PassCounter:
    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.decoded_sizes: set[tuple[int, int]] = set()  # (height, width) in pixels

    def add(self, name: str, n: int) -> None:
        self.counts[name] += n

    def counted(self, output: torch.Tensor, forward: str, backward: str | None, n: int) -> torch.Tensor:
        """Count ``n`` forward passes now, and ``n`` backward passes whenever a gradient
        reaches ``output``."""
        self.add(forward, n)
        if backward is not None and output.requires_grad:
            output.register_hook(lambda grad: self.add(backward, n))
        return output

    def as_dict(self) -> dict[str, int]:
        """Every count by name (zeros included), in a fixed order."""
        return {name: self.counts[name] for name in NAMES}

    def decoded(self) -> list[str]:
        return [f"{w}x{h}" for h, w in sorted(self.decoded_sizes)]

    def report(self, stage: str, images: int = 1, first: int = 0) -> list[dict]:
        """What a node shows in its history, one entry per image of the batch it ran
        together: the counts divided by ``images`` (a batched call counts each image, and
        every image of a batch runs the same passes), the zeros left out. ``first``: the
        batch index of its first image."""
        passes = {name: n // images for name, n in self.as_dict().items() if n}
        entry = {"stage": stage, "passes": passes}
        if self.decoded_sizes:
            entry["decoded"] = self.decoded()
        return [dict(entry, image=first + i) for i in range(images)]

    # --- wrappers, one per protocol ------------------------------------------------------

    def eps(self, eps_model):
        def counted_eps(z_t, t, cond):
            return self.counted(eps_model(z_t, t, cond), UNET_FORWARD, UNET_BACKWARD, z_t.shape[0])
        return counted_eps

    def eps_fn(self, eps_fn):
        """A ``ddim.EpsFn`` (z, t) -> eps."""
        def counted_eps_fn(z, t):
            return self.counted(eps_fn(z, t), UNET_FORWARD, UNET_BACKWARD, z.shape[0])
        return counted_eps_fn

    def decoder(self, decode):
        def counted_decode(z):
            self.decoded_sizes.add((z.shape[-2] * DECODER_PIXELS, z.shape[-1] * DECODER_PIXELS))
            return self.counted(decode(z), DECODE_FORWARD, DECODE_BACKWARD, z.shape[0])
        return counted_decode

    def codec(self, codec) -> "CountedCodec":
        return CountedCodec(codec, self)

    def embedder(self, embedder) -> "CountedEmbedder":
        return CountedEmbedder(embedder, self)

    def features(self, features):
        def counted_features(image):
            self.add(CLIP_VISION, image.shape[0])
            return features(image)
        return counted_features

    def text(self, text) -> "CountedText":
        return CountedText(text, self)

    def msi_host(self, host):
        """An ``msi_train.MSIHost`` with each of its networks counted."""
        return dataclasses.replace(host, eps=self.eps(host.eps), codec=self.codec(host.codec),
                                   text=self.text(host.text), features=self.features(host.features))


class CountedCodec:
    """LatentCodec that counts its encodes and decodes."""

    def __init__(self, codec, counter: PassCounter):
        self.inner, self.counter = codec, counter

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.counter.decoder(self.inner.decode)(z)

    def encode_moments(self, image: torch.Tensor):
        self.counter.add(VAE_ENCODE, image.shape[0])
        return self.inner.encode_moments(image)


class CountedText:
    """TextEncoder that counts its passes (MSI backpropagates through it every step)."""

    def __init__(self, text, counter: PassCounter):
        self.inner, self.counter = text, counter

    def encode_with_token(self, token_embedding: torch.Tensor) -> torch.Tensor:
        out = self.inner.encode_with_token(token_embedding)
        return self.counter.counted(out, TEXT_FORWARD, TEXT_BACKWARD, token_embedding.shape[0])

    def encode_empty(self) -> torch.Tensor:
        return self.counter.counted(self.inner.encode_empty(), TEXT_FORWARD, None, 1)


class CountedEmbedder:
    """FaceEmbedder that counts its passes; everything else (input_size, ``to``, ...) is the
    wrapped recogniser's."""

    def __init__(self, embedder, counter: PassCounter):
        self.inner, self.counter = embedder, counter

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, aligned: torch.Tensor) -> torch.Tensor:
        return self.counter.counted(self.inner(aligned), RECOGNISER_FORWARD, RECOGNISER_BACKWARD, aligned.shape[0])
