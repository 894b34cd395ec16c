"""Network passes counted where the core calls its host: what one protected face costs,
independent of the hardware.

``PassCounter`` wraps the host protocols (EpsModel, LatentCodec, a decoder, FaceEmbedder,
ImageFeatures, TextEncoder) without changing a value they return. Every pass is counted
per image of the batch (a UNet call on 4 latents is 4 UNet passes). A backward pass is
counted when a gradient really flows back through the network's output (a hook on that
output), so the counts say what ran, not what the code meant to run. Decoder passes also
record the pixel sizes decoded, which tells a whole frame from a face crop.

Beside passes it counts calls: each call of a network (and each backward through one of
its outputs) is one call, however many images it holds. On a GPU a call of SD's UNet on
a few latents takes about as long as on one, so the calls made one after another, not
the passes, say how long a batch of faces takes.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from contextlib import contextmanager

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
        self.counts: Counter[str] = Counter()  # passes shared alike by every image of the batch
        self.owned: dict[int, Counter[str]] = {}  # passes of rows whose image was named (``rows``)
        self.calls: Counter[str] = Counter()
        self.decoded_sizes: set[tuple[int, int]] = set()  # (height, width) in pixels
        self.owners: list[int] | None = None

    def clear(self) -> None:
        """Forget every count so far (a benchmark counting stage by stage)."""
        self.counts.clear()
        self.owned.clear()
        self.calls.clear()
        self.decoded_sizes.clear()

    @contextmanager
    def rows(self, owners: list[int]):
        """Within the block, row r of every counted call belongs to image ``owners[r]`` (a
        batch whose images run different passes: faces that stopped early, faces without
        guidance); its passes are that image's alone."""
        previous, self.owners = self.owners, list(owners)
        try:
            yield
        finally:
            self.owners = previous

    def add(self, name: str, n: int, owners: list[int] | None = None) -> None:
        """One call of ``n`` passes; ``owners`` (one image a row) makes them those images'."""
        self.calls[name] += 1
        if owners is None or len(owners) != n:
            self.counts[name] += n
            return
        for owner in owners:
            self.owned.setdefault(owner, Counter())[name] += 1

    def counted(self, output: torch.Tensor, forward: str, backward: str | None, n: int) -> torch.Tensor:
        """Count ``n`` forward passes now, and ``n`` backward passes whenever a gradient
        reaches ``output``."""
        owners = self.owners
        self.add(forward, n, owners)
        if backward is not None and output.requires_grad:
            output.register_hook(lambda grad: self.add(backward, n, owners))
        return output

    def as_dict(self) -> dict[str, int]:
        """Every pass count by name (zeros included), in a fixed order: the shared ones and
        every image's own."""
        return {name: self.counts[name] + sum(c[name] for c in self.owned.values()) for name in NAMES}

    def calls_dict(self) -> dict[str, int]:
        """The calls made of each network (zeros left out), in a fixed order."""
        return {name: self.calls[name] for name in NAMES if self.calls[name]}

    def decoded(self) -> list[str]:
        return [f"{w}x{h}" for h, w in sorted(self.decoded_sizes)]

    def report(self, stage: str, images: int = 1, first: int = 0) -> list[dict]:
        """What a node shows in its history, one entry per image of the batch it ran
        together: each image's passes (the shared counts divided by ``images``: a batched
        call counts each image, and every image of a batch runs the same shared passes;
        plus its own, see ``rows``), the zeros left out; and the calls the batch made
        together, with ``batch``, the images that shared them. ``first``: the batch index
        of its first image; ``owned`` rows name images 0..images-1 of the batch."""
        batch = list(range(first, first + images))
        entries = []
        for i in range(images):
            own = self.owned.get(i, Counter())
            passes = {name: self.counts[name] // images + own[name] for name in NAMES}
            entry = {"stage": stage, "passes": {k: n for k, n in passes.items() if n}, "image": first + i,
                     "calls": self.calls_dict(), "batch": batch}
            if self.decoded_sizes:
                entry["decoded"] = self.decoded()
            entries.append(entry)
        return entries

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
            self.add(CLIP_VISION, image.shape[0], self.owners)
            return features(image)
        return counted_features

    def text(self, text) -> "CountedText":
        return CountedText(text, self)

    def msi_host(self, host):
        """An ``msi_train.MSIHost`` with each of its networks counted."""
        return dataclasses.replace(host, eps=self.eps(host.eps), codec=self.codec(host.codec),
                                   text=self.text(host.text), features=self.features(host.features), rows=self.rows)


class CountedCodec:
    """LatentCodec that counts its encodes and decodes."""

    def __init__(self, codec, counter: PassCounter):
        self.inner, self.counter = codec, counter

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.counter.decoder(self.inner.decode)(z)

    def encode_moments(self, image: torch.Tensor):
        self.counter.add(VAE_ENCODE, image.shape[0], self.counter.owners)
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
