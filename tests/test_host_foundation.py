"""The pack loads in the real ComfyUI server and its nodes run through /prompt."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from diffpriv_client.comfy_http import PromptFailed
from conftest import pack_node_ids

pytestmark = pytest.mark.host


def face_mask_graph(image_name: str, on_no_face: str = "error") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "DiffPrivacyFaceDetect", "inputs": {
            "image": ["1", 0], "select": "all", "index": 0, "min_size": 20, "min_score": 0.9,
            "on_no_face": on_no_face}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 1]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "facemask"}},
    }


def fetch_image(host, record) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(host.client.view(record))).convert("RGB"))


def test_every_pack_node_is_registered(comfy_host):
    info = comfy_host.client.object_info()
    ids = pack_node_ids()
    assert ids, "the pack defines no nodes"
    for node_id in ids:
        assert info[node_id]["category"].startswith("Diff-Privacy"), node_id


def test_face_detect_runs_in_the_real_host(comfy_host, astronaut):
    name = comfy_host.upload(astronaut, "astronaut.png")
    result = comfy_host.client.run(face_mask_graph(name))
    (record,) = result.files("4")
    mask = fetch_image(comfy_host, record)[..., 0]
    assert mask.shape == astronaut.shape[:2]
    # The astronaut's face is around (225, 115); the corners are background.
    assert mask[115, 225] == 255
    assert mask[5, 5] == 0 and mask[500, 500] == 0
    assert 0.02 < (mask > 127).mean() < 0.1


def test_no_face_is_a_clear_error_and_the_server_stays_up(comfy_host, astronaut):
    name = comfy_host.upload(np.full((96, 96, 3), 128, np.uint8), "grey.png")
    with pytest.raises(PromptFailed, match="no face found in image 0"):
        comfy_host.client.run(face_mask_graph(name))
    # skip policy: the image passes with an empty mask, and the server still answers.
    result = comfy_host.client.run(face_mask_graph(name, on_no_face="skip"))
    (record,) = result.files("4")
    assert fetch_image(comfy_host, record).max() == 0


def test_host_accepts_the_generated_sd15_checkpoint(comfy_host, astronaut):
    name = comfy_host.upload(np.ascontiguousarray(astronaut[::8, ::8]), "small.png")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dp-test-sd15.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": name}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "roundtrip"}},
        "6": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "dp-test-vitl14.safetensors"}},
    }
    result = comfy_host.client.run(graph)
    (record,) = result.files("5")
    assert fetch_image(comfy_host, record).shape == (64, 64, 3)
