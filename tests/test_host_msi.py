"""MSI Inversion in the real ComfyUI server, on the generated SD1.5-shaped checkpoint and
CLIP ViT-L/14 (random weights: only shapes, determinism and control flow are meaningful)."""
from __future__ import annotations

import hashlib
import types

import numpy as np
import pytest
import torch
# torch's own layers, not comfy.ops: a stand-in network for the test.
from torch.nn import Linear

from diffpriv_client.comfy_http import PromptFailed
from test_host_foundation import fetch_image

pytestmark = pytest.mark.host


def msi_graph(image_names: list[str], steps: int = 2, seed: int = 5, preset: str = "fast",
              one_embedding: bool = False, batch_size: int = 8) -> dict:
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dp-test-sd15.safetensors"}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "dp-test-vitl14.safetensors"}},
        "10": {"class_type": "LoadImage", "inputs": {"image": image_names[0]}},
    }
    batch = ["10", 0]
    if len(image_names) > 1:
        graph["11"] = {"class_type": "LoadImage", "inputs": {"image": image_names[1]}}
        graph["12"] = {"class_type": "ImageBatch", "inputs": {"image1": ["10", 0], "image2": ["11", 0]}}
        batch = ["12", 0]
    graph["20"] = {"class_type": "DiffPrivacyMSIInversion", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "clip_vision": ["2", 0], "image": batch,
        "preset": preset, "steps": steps, "lr": 0.0, "seed": seed, "one_embedding": one_embedding,
        "batch_size": batch_size}}
    graph["30"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 1], "filename_prefix": "msi_loss"}}
    return graph


@pytest.fixture(scope="module")
def faces(comfy_host, astronaut) -> list[str]:
    crops = (astronaut[40:232:3, 160:352:3], astronaut[300:492:3, 200:392:3])  # 64 x 64 each
    return [comfy_host.upload(np.ascontiguousarray(c), f"msi{i}.png") for i, c in enumerate(crops)]


def key_summaries(result) -> list[dict]:
    return result.outputs["20"]["key_e"]


def trained(result) -> bool:
    """The MSI node really ran in this prompt (not served from ComfyUI's output cache)."""
    cached = [data.get("nodes", []) for kind, data in result.status.get("messages", []) if kind == "execution_cached"]
    return "20" not in sum(cached, [])


@pytest.fixture(scope="module")
def batch_run(comfy_host, faces):
    return comfy_host.client.run(msi_graph(faces, steps=1, seed=5))


def test_a_batch_of_two_gives_two_key_es_and_a_loss_curve(comfy_host, batch_run):
    keys = key_summaries(batch_run)
    assert [k["image"] for k in keys] == [0, 1]
    for k in keys:
        assert k["stages"] == [10, 77, 768] and k["uc"] == [1, 77, 768] and float(k["final_loss"]) > 0
    assert keys[0]["sha256"] != keys[1]["sha256"]
    (record,) = batch_run.files("30")
    curve = fetch_image(comfy_host, record)
    assert curve.shape == (256, 512, 3) and (curve < 250).any()


def test_the_same_seed_gives_the_same_key_e(comfy_host, faces, batch_run):
    # Each image trains as if alone: alone it gets the key-E it got as image 0 of the batch,
    # bit for bit when the batch makes one UNet call per image (batch_size 1), and up to
    # the float rounding of a batched UNet call when both images share each call.
    alone = comfy_host.client.run(msi_graph(faces[:1], steps=3, seed=5))
    one_by_one = comfy_host.client.run(msi_graph(faces, steps=3, seed=5, batch_size=1))
    together = comfy_host.client.run(msi_graph(faces, steps=3, seed=5, batch_size=2))
    assert trained(alone) and trained(one_by_one) and trained(together)
    assert key_summaries(alone)[0]["sha256"] == key_summaries(one_by_one)[0]["sha256"]
    assert key_summaries(together)[0]["sha256"] != key_summaries(batch_run)[0]["sha256"]  # 3 steps, not 1
    losses = [float(key_summaries(r)[0]["final_loss"]) for r in (alone, together)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    calls = [r.outputs["20"]["passes"][0]["calls"] for r in (one_by_one, together)]
    assert calls[0]["unet_backward"] == 6 and calls[1]["unet_backward"] == 3  # 3 steps: 2 faces a call or 1


def test_the_one_embedding_ablation_is_an_input_of_the_node(comfy_host, faces, batch_run):
    result = comfy_host.client.run(msi_graph(faces[:1], steps=1, seed=5, one_embedding=True))
    (key,) = key_summaries(result)
    assert key["variant"] == "one_embedding" and key_summaries(batch_run)[0]["variant"] == "multi_stage"
    assert key["stages"] == [10, 77, 768] and key["sha256"] != key_summaries(batch_run)[0]["sha256"]


def test_small_images_are_refused_with_a_clear_error(comfy_host, astronaut):
    name = comfy_host.upload(np.ascontiguousarray(astronaut[:48:2, :48:2]), "tiny.png")
    with pytest.raises(PromptFailed, match="at least 64 x 64 pixels, got 24 x 24"):
        comfy_host.client.run(msi_graph([name]))


# --- in process: the node called directly on ComfyUI's own objects -------------------------

def fingerprint(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_training_leaves_every_host_model_unchanged(comfy_inproc, test_models, astronaut):
    import comfy.clip_vision

    with torch.inference_mode():  # as ComfyUI runs prompts
        model, clip, vae = comfy_inproc.sd.load_checkpoint_guess_config(
            str(test_models / "checkpoints" / "dp-test-sd15.safetensors"))[:3]
        clip_vision = comfy.clip_vision.load(str(test_models / "clip_vision" / "dp-test-vitl14.safetensors"))
        modules = {"unet": model.model, "text": clip.cond_stage_model, "vae": vae.first_stage_model,
                   "clip_vision": clip_vision.model}
        before = {name: fingerprint(m) for name, m in modules.items()}
        image = torch.from_numpy(np.ascontiguousarray(astronaut[40:232:3, 160:352:3])).float()[None] / 255
        node = comfy_inproc.pack.nodes.msi.MSIInversion
        keys, curve = node.execute(model, clip, vae, clip_vision, image, "fast", 1, 0.0, 3).args
        after = {name: fingerprint(m) for name, m in modules.items()}
    assert [tuple(k.stages.shape) for k in keys] == [(10, 77, 768)] and curve.shape == (1, 256, 512, 3)
    assert after == before
    assert all(not p.requires_grad or p.grad is None for m in modules.values() for p in m.parameters())


def test_image_encoders_other_than_vit_l14_are_refused(comfy_inproc):
    import comfy.clip_model
    import comfy.ops

    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "hidden_act": "quick_gelu", "model_type": "clip_vision_model", "num_channels": 3, "patch_size": 16,
              "image_size": 64, "projection_dim": 32}
    small = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "cpu", comfy.ops.manual_cast)
    adapters = comfy_inproc.pack.nodes.msi_adapters
    with pytest.raises(ValueError, match="OpenAI CLIP ViT-L/14 .* given is clip with hidden size 64, 2 layers"):
        adapters.check_clip_vision(types.SimpleNamespace(model=small, image_size=64))
    with pytest.raises(ValueError, match="given is Linear"):
        adapters.check_clip_vision(types.SimpleNamespace(model=Linear(2, 2), image_size=224))
