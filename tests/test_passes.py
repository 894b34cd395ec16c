"""The pass counter: what ran through each host network, forward and backward, per image."""
from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("task, crop", [("anonymize", True), ("hide", False)])
def test_stage_ii_presets_pay_one_decoder_and_recogniser_pass_per_candidate_and_step_and_no_unet_backward(task, crop):
    from diffpriv_core import guided
    from diffpriv_core.schedule import ddim_grid
    from diffpriv_core.tasks import task as task_preset
    from diffpriv_testmodels.toy_host import ToyDecoder, ToyFaceNet

    torch.manual_seed(0)
    counter = PassCounter()
    decode, embedder = counter.decoder(ToyDecoder().requires_grad_(False)), counter.embedder(ToyFaceNet().requires_grad_(False))
    box = (16.0, 16.0, 48.0, 48.0)
    matrix = torch.tensor([[1.0, 0.0, -16.0], [0.0, 1.0, -16.0]])  # the 32 px box -> the net's 32 px crop
    target = guided.FaceTarget(matrix, box, torch.nn.functional.normalize(torch.randn(64), dim=0), (64, 64))
    preset = task_preset(task)
    guidance = guided.IdentityGuidance(embedder, task, preset.lambdas, (target,), crop_margin=0.25 if crop else None)
    eps = counter.eps_fn(lambda z, t: 0.1 * z)
    guided.protect(eps, torch.randn(1, 4, 8, 8), ddim_grid(preset.steps), preset.strength, preset.samples, seed=0,
                   guidance=guidance, decoder=decode)
    steps = round(preset.steps * preset.strength)  # anonymize: 30 of 50; hide: 80 of 100
    passes = steps * preset.samples
    counts = counter.as_dict()
    assert counts["unet_forward"] == passes and counts["unet_backward"] == 0
    assert counts["vae_decode_forward"] == counts["vae_decode_backward"] == passes
    assert counts["recogniser_forward"] == counts["recogniser_backward"] == passes
    assert counter.decoded() == (["48x48"] if crop else ["64x64"])
