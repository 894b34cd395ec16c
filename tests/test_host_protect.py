"""Stage II end to end in the real host: anonymize and hide through /prompt."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from diffpriv_core import guided
from diffpriv_core.energy import cosines_to
from diffpriv_core.faces.align import warp_faces
from diffpriv_core.faces.detect import detect_faces
from diffpriv_core.faces.recognizers import load_recognizer
from diffpriv_core.guided import face_target
from diffpriv_core.keys import save_key
from diffpriv_core.recovery import conditioned_eps
from diffpriv_core.schedule import ddim_grid
from diffpriv_testmodels.comfy_models import CHECKPOINT
from diffpriv_testmodels.face_models import ARCFACE_ONNX, TEST_THRESHOLD
from diffpriv_testmodels.inprocess import pack_module
from test_host_foundation import fetch_image
from test_host_recovery import add, base_graph, random_key_e

pytestmark = pytest.mark.host
STEPS, S_NS = 10, 0.6
# Random-weight models: the task's lambda (the reference code's) moves the identity too little to measure reliably
# against the noise of random decoders, so the guided runs use a large scale.


@pytest.fixture(scope="module")
def photo(comfy_host, astronaut):
    small = np.ascontiguousarray(astronaut[::4, ::4])  # 128 x 128, the face about 25 px wide
    save_key(comfy_host.keys / "protect-e.dpkey.safetensors", random_key_e(7))
    return small, comfy_host.upload(small, "protect.png")


def protect_graph(image: str, mode: str, samples: int, lambda_scale: float, seed: int = 3,
                  checkpointing: bool = False) -> dict:
    g = base_graph()
    add(g, "img", "LoadImage", image=image)
    add(g, "enc", "VAEEncode", pixels=["img", 0], vae=["ckpt", 2])
    add(g, "key", "DiffPrivacyLoadKey", key_name="protect-e.dpkey.safetensors", passphrase="")
    decoded = add_guided_sampling(g, ["img", 0], ["enc", 0], ["key", 0], mode=mode, lambda_scale=lambda_scale,
                                  s_ns=S_NS, steps=STEPS, samples=samples, seed=seed, checkpointing=checkpointing)
    add(g, "save", "SaveImage", images=decoded, filename_prefix=f"protect-{mode}")
    add(g, "inv", "DiffPrivacyDDIMInversionKey", model=["ckpt", 0], latent=["enc", 0], key_e=["key", 0],
        steps=STEPS, mode="ddim", refine_iterations=1)
    add(g, "keyout", "DiffPrivacySaveKey", key_e=["key", 0], key_i=["inv", 0], filename_prefix=f"protect/{mode}",
        folder="output", passphrase="")
    return g


def add_guided_sampling(g: dict, reference: list, latent: list, key_e: list, *, s_ns: float, steps: int,
                        samples: int, seed: int, mode: str = "anonymize", lambda_scale: float = 1.0,
                        checkpointing: bool = False) -> list:
    """Stage II in a test graph: Embedding Scheduler, the test recogniser, Identity Energy
    Guidance on ``reference`` and the Guided DDIM Sampler on ``latent``, then VAE Decode
    (nodes "sched", "fr", "guide", "sample", "dec"). Returns the decoded pictures' link."""
    add(g, "sched", "DiffPrivacyEmbeddingScheduler", key_e=key_e, preset=mode, tau=-1.0)  # the preset's
    add(g, "fr", "DiffPrivacyFaceRecognizerLoader", model_name=ARCFACE_ONNX, threshold=TEST_THRESHOLD)
    add(g, "guide", "DiffPrivacyIdentityGuidance", face_model=["fr", 0], image=reference, mode=mode,
        lambda_scale=lambda_scale, normalize_gradient=False, diversity=True, decode_region="whole image",
        face_index=0, min_score=0.9, on_no_face="error", gradient_checkpointing=checkpointing)
    add(g, "sample", "DiffPrivacyGuidedDDIMSampler", model=["ckpt", 0], vae=["ckpt", 2], positive=["sched", 0],
        latent=latent, preset="custom", s_ns=s_ns, steps=steps, samples=samples, seed=seed, guidance=["guide", 0])
    return add(g, "dec", "VAEDecode", samples=["sample", 0], vae=["ckpt", 2])


def identity_cosines(face_models, original: np.ndarray, outputs: list[np.ndarray]) -> torch.Tensor:
    """Cosine of each output's face (aligned like the original's) to the original's."""
    embedder = load_recognizer(face_models / ARCFACE_ONNX, TEST_THRESHOLD)
    image = torch.from_numpy(original).float() / 255
    target = face_target(embedder, image, detect_faces(image)[0])
    batch = torch.stack([torch.from_numpy(o.copy()).float() / 255 for o in outputs])
    with torch.no_grad():
        return cosines_to(target.embedding, embedder(warp_faces(batch, target.matrix, embedder.input_size)))


def run_outputs(host, graph, report: list | None = None) -> tuple[list[np.ndarray], list[dict]]:
    """The saved pictures and key records; ``report`` receives the sampler's identity report."""
    result = host.client.run(graph, timeout=1200)
    if report is not None:
        report.extend(result.outputs["sample"]["identity_similarity"])
    return [fetch_image(host, r) for r in result.files("save")], result.files("keyout", "diffprivacy_keys")


def test_anonymize_lowers_identity_similarity(comfy_host, photo, face_models):
    original, name = photo
    report = []
    guided, keys = run_outputs(comfy_host, protect_graph(name, "anonymize", samples=2, lambda_scale=50.0), report)
    unguided, _ = run_outputs(comfy_host, protect_graph(name, "anonymize", samples=2, lambda_scale=0.0))
    assert len(guided) == 2 and guided[0].shape == original.shape
    assert len(keys) == 1 and keys[0]["filename"].endswith(".dpkey.safetensors")
    assert not np.array_equal(guided[0], guided[1])  # independent noises
    with_guidance = identity_cosines(face_models, original, guided).mean()
    without = identity_cosines(face_models, original, unguided).mean()
    assert with_guidance < without, (with_guidance, without)
    # the sampler reports what the guiding recogniser says of each sample it made
    (entry,) = report
    assert entry["image"] == 0 and entry["recognizer"] == Path(ARCFACE_ONNX).name and entry["mode"] == "anonymize"
    assert np.allclose(entry["cosines"], identity_cosines(face_models, original, guided).numpy(), atol=0.05)
    assert entry["same_person"] == [c >= entry["threshold"] for c in entry["cosines"]] and entry["goal"] is None


def test_hide_raises_identity_similarity(comfy_host, photo, face_models):
    original, name = photo
    guided, keys = run_outputs(comfy_host, protect_graph(name, "hide", samples=1, lambda_scale=50.0,
                                                         checkpointing=True))
    unguided, _ = run_outputs(comfy_host, protect_graph(name, "hide", samples=1, lambda_scale=0.0))
    assert len(guided) == 1 and len(keys) == 1
    assert identity_cosines(face_models, original, guided)[0] > identity_cosines(face_models, original, unguided)[0]


def test_a_checkpointed_decoder_gives_the_same_gradient_and_leaves_the_host_vae_alone(comfy_inproc, test_models):
    adapters = pack_module("nodes.adapters")
    model, _clip, vae = comfy_inproc.sd.load_checkpoint_guess_config(str(test_models / CHECKPOINT))[:3]
    latent_format = model.get_model_object("latent_format")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        decoder = adapters.ComfyDecoder(vae, latent_format, checkpointed)
        with torch.enable_grad():
            leaf = z.clone().requires_grad_(True)
            decoder(leaf).square().mean().backward()
        grads.append(leaf.grad)
        blocks = [m for m in decoder.network.decoder.modules() if type(m).__name__ == "ResnetBlock"]
        assert blocks and all(isinstance(m.forward, functools.partial) == checkpointed for m in blocks)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert not any(isinstance(m.forward, functools.partial) for m in vae.first_stage_model.modules())


def test_the_sampler_node_samplercustom_and_the_core_run_one_stage_two(comfy_inproc, test_models):
    """The Guided DDIM Sampler node, the Guided DDIM SAMPLER in SamplerCustom (ComfyUI's
    ddim_uniform sigmas, SamplerCustom's seeded noise) and the core's guided.protect give the
    same latents: one orchestration of Stage II, three ways in (unguided, so any model works)."""
    protect = pack_module("nodes.protect")
    scheduler = pack_module("nodes.scheduler")
    adapters = pack_module("nodes.adapters")
    model, _clip, vae = comfy_inproc.sd.load_checkpoint_guess_config(str(test_models / CHECKPOINT))[:3]
    key_e, seed = random_key_e(3), 5
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 4
    positive = scheduler.EmbeddingScheduler.execute([key_e], "anonymize", -1.0).args[0]  # tau: the preset's 0.4
    node = protect.GuidedDDIMSampler.execute(model, vae, positive, {"samples": latent}, "custom", 0.6, 20, 1,
                                             seed).args[0]["samples"]
    sigmas = comfy_inproc.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", 20)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))  # SamplerCustom's, for seed
    sampler = protect.GuidedDDIMSamplerSelect.execute(vae, 0).args[0]
    custom = comfy_inproc.sample.sample_custom(model, noise, 1.0, sampler, sigmas[-13:], positive, positive, latent,
                                               seed=seed, disable_pbar=True)
    eps = adapters.ComfyEpsModel(model)
    core = eps.to_samples(guided.protect(conditioned_eps(eps, [key_e], tau=0.4), eps.to_z(latent), ddim_grid(20), 0.6,
                                         1, seed))
    tolerance = 1e-3 * core.abs().max().item()
    assert torch.allclose(node, core, atol=tolerance), (node - core).abs().max()
    assert torch.allclose(custom.float(), core, atol=tolerance), (custom - core).abs().max()
    other = guided.protect(conditioned_eps(eps, [key_e], tau=0.4), eps.to_z(latent), ddim_grid(20), 0.6, 1, seed + 1)
    assert not torch.allclose(eps.to_samples(other), core, atol=tolerance)  # the seed decides the noise
