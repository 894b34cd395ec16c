"""The pass counter: what ran through each host network, forward and backward, per image."""
from __future__ import annotations

import torch

from diffpriv_core.passes import PassCounter


class Net(torch.nn.Module):
    input_size = 8

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, x):
        return x * self.weight


def test_forward_passes_count_images_and_backward_passes_count_real_gradients():
    counter = PassCounter()
    eps = counter.eps(lambda z, t, cond: z * cond.mean())
    z = torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        eps(z, 10, torch.ones(4, 77, 8))  # sampling: no gradient can flow
    cond = torch.ones(3, 77, 8, requires_grad=True)
    out = eps(z[:3], 10, cond)
    assert counter.counts["unet_forward"] == 7 and counter.counts["unet_backward"] == 0
    out.sum().backward()
    assert counter.counts["unet_backward"] == 3


def test_decoder_records_the_sizes_it_decoded_and_the_embedder_keeps_its_attributes():
    counter = PassCounter()
    decode = counter.decoder(lambda z: torch.nn.functional.interpolate(z, scale_factor=8))
    embedder = counter.embedder(Net())
    leaf = torch.randn(2, 4, 24, 20, requires_grad=True)
    faces = embedder(decode(leaf)[:, :3, :8, :8])
    (grad,) = torch.autograd.grad(faces.sum(), leaf)
    decode(torch.randn(1, 4, 64, 64))
    assert embedder.input_size == 8 and isinstance(embedder.to("cpu"), Net)
    assert counter.decoded() == ["160x192", "512x512"]
    counts = counter.as_dict()
    assert (counts["vae_decode_forward"], counts["vae_decode_backward"]) == (3, 2)
    assert (counts["recogniser_forward"], counts["recogniser_backward"]) == (2, 2)
    assert counts["unet_forward"] == 0 and list(counts)[0] == "unet_forward"
