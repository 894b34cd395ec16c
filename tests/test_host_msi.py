"""MSI Inversion in the real ComfyUI server, on the generated SD1.5-shaped checkpoint and
CLIP ViT-L/14 (random weights: only shapes, determinism and control flow are meaningful)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from diffpriv_client.comfy_http import PromptFailed
from test_host_foundation import fetch_image

pytestmark = pytest.mark.host


def msi_graph(image_names: list[str], steps: int = 2, seed: int = 5, preset: str = "fast") -> dict:
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
        "preset": preset, "steps": steps, "lr": 0.0, "seed": seed}}
    graph["30"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 1], "filename_prefix": "msi_loss"}}
    return graph


@pytest.fixture(scope="module")
def faces(comfy_host, astronaut) -> list[str]:
    crops = (astronaut[40:232:3, 160:352:3], astronaut[300:492:3, 200:392:3])  # 64 x 64 each
    return [comfy_host.upload(np.ascontiguousarray(c), f"msi{i}.png") for i, c in enumerate(crops)]


def key_summaries(result) -> list[dict]:
    return result.outputs["20"]["key_e"]


def test_a_batch_of_two_gives_two_key_es_and_a_loss_curve(comfy_host, faces):
    result = comfy_host.client.run(msi_graph(faces, steps=2))
    keys = key_summaries(result)
    assert [k["image"] for k in keys] == [0, 1]
    for k in keys:
        assert k["stages"] == [10, 77, 768] and k["uc"] == [1, 77, 768] and float(k["final_loss"]) > 0
    assert keys[0]["sha256"] != keys[1]["sha256"]
    (record,) = result.files("30")
    curve = fetch_image(comfy_host, record)
    assert curve.shape == (256, 512, 3) and (curve < 250).any()


def test_the_same_seed_gives_the_same_key_e(comfy_host, faces):
    # A different seed in between evicts the cached result, so the third run trains again.
    runs = [key_summaries(comfy_host.client.run(msi_graph(faces[:1], steps=1, seed=s)))[0] for s in (11, 12, 11)]
    assert runs[0]["sha256"] == runs[2]["sha256"] != runs[1]["sha256"]


def test_interrupt_stops_training_promptly_and_the_next_prompt_runs(comfy_host, faces):
    client = comfy_host.client
    interrupted_at = []

    def interrupt_once_training(progress):
        if not interrupted_at and progress.get("node") == "20" and progress["value"] >= 1:
            interrupted_at.append(time.monotonic())
            client.interrupt()

    with pytest.raises(PromptFailed, match="interrupted"):
        client.run(msi_graph(faces, steps=500, seed=3), on_progress=interrupt_once_training)
    assert interrupted_at and time.monotonic() - interrupted_at[0] < 30
    assert key_summaries(client.run(msi_graph(faces[:1], steps=1, seed=4)))[0]["stages"] == [10, 77, 768]


def test_small_images_are_refused_with_a_clear_error(comfy_host, astronaut):
    name = comfy_host.upload(np.ascontiguousarray(astronaut[:48:2, :48:2]), "tiny.png")
    with pytest.raises(PromptFailed, match="at least 64 x 64 pixels, got 24 x 24"):
        comfy_host.client.run(msi_graph([name]))
