"""`diffpriv protect --every-face` (the default, named) and `diffpriv recover --photo` against the real server."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffpriv_client import cli
from test_host_faces import every_face_graph, install_key_e, pair_photo, recover_face_graph

pytestmark = pytest.mark.host


def test_every_face_gets_a_key_listed_in_the_summary_and_one_face_comes_back(comfy_host, tmp_path):
    install_key_e(comfy_host)
    photo = tmp_path / "pair.png"
    Image.fromarray(pair_photo()).save(photo)
    protect_wf, recover_wf = tmp_path / "protect_faces.json", tmp_path / "recover_face.json"
    protect_wf.write_text(json.dumps(every_face_graph("placeholder.png")))
    recover_wf.write_text(json.dumps(recover_face_graph("placeholder.png", "placeholder.dpkey.safetensors")))
    out, url = tmp_path / "out", comfy_host.server.url

    assert cli.main(["protect", str(photo), "--task", "anonymize", "--every-face", "--out", str(out),
                     "--server", url, "--workflow", str(protect_wf)]) == 0
    entry = json.loads((out / "summary.json").read_text())["results"]["pair"]
    assert entry["status"] == "ok"
    assert [f["face"] for f in entry["faces"]] == [0, 1]
    assert [f["key"] for f in entry["faces"]] == [f"pair/pair_face{k}_00001.dpkey.safetensors" for k in (0, 1)]
    assert sorted(entry["keys"]) == sorted(f["key"] for f in entry["faces"])
    x1, y1, x2, y2 = entry["faces"][0]["box"]
    assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 220
    protected = sorted(p for p in entry["outputs"] if "_protected_" in p)
    assert len(protected) == 2
    # Per face: 3 guided steps (S_ns 0.6 of 5) x 2 candidates, each decoded and recognised with
    # a backward pass, then both candidates once more for the similarity report; key-I is 5
    # BDIA steps, one UNet call each; the stock nodes encode the crop once and decode 2
    # candidates + 1 reconstruction.
    sampler = {"unet_forward": 6, "vae_decode_forward": 8, "vae_decode_backward": 6, "recogniser_forward": 8,
               "recogniser_backward": 6}
    stages = {"Identity Energy Guidance": {"passes": {"recogniser_forward": 1}},
              "Guided DDIM Sampler": {"passes": sampler, "candidates": 2, "decode_region": "whole frame",
                                      "decoded": ["64x64"]},
              "DDIM Inversion Key": {"passes": {"unet_forward": 5}}, "VAE Encode": {"passes": {"vae_encode": 1}},
              "VAE Decode": {"passes": {"vae_decode_forward": 3}}}
    total = dict(sampler, unet_forward=11, vae_decode_forward=11, recogniser_forward=9, vae_encode=1)
    assert entry["passes"] == [{"face": k, "total": total, "stages": stages} for k in (0, 1)]
    # Calls made one after another, for the photo: both faces' 4 candidates go through the
    # UNet together (3 guided steps: 3 calls) and key-I inverts both in one call a step (5);
    # the guidance decodes and recognises each face's candidates on their own (per face 3
    # steps + 1 report); the reference embedding is one call per face; the stock nodes one
    # call each (one VAE Encode, two VAE Decodes).
    guided_calls = {"unet_forward": 3, "vae_decode_forward": 8, "vae_decode_backward": 6, "recogniser_forward": 8,
                    "recogniser_backward": 6}
    assert entry["calls"] == {
        "stages": {"Identity Energy Guidance": {"recogniser_forward": 2}, "Guided DDIM Sampler": guided_calls,
                   "DDIM Inversion Key": {"unet_forward": 5}, "VAE Encode": {"vae_encode": 1},
                   "VAE Decode": {"vae_decode_forward": 2}},
        "total": dict(guided_calls, unet_forward=8, vae_decode_forward=10, recogniser_forward=10, vae_encode=1)}

    key = out / entry["faces"][1]["key"]
    recovered = tmp_path / "recovered"
    assert cli.main(["recover", str(key), "--photo", str(out / protected[0]), "--out", str(recovered),
                     "--trust-server", url, "--workflow", str(recover_wf)]) == 0
    (result,) = json.loads((recovered / "summary.json").read_text())["results"].values()
    # BDIA recovery starts from key-I's two states: 4 UNet calls for its 5 steps.
    assert result["passes"] == [{"face": 0, "total": {"unet_forward": 4, "vae_decode_forward": 1}, "stages": {
        "Recover": {"passes": {"unet_forward": 4}}, "VAE Decode": {"passes": {"vae_decode_forward": 1}}}}]
    (picture,) = result["outputs"]
    restored = np.asarray(Image.open(recovered / picture).convert("RGB"))
    before = np.asarray(Image.open(out / protected[0]).convert("RGB"))
    assert restored.shape == before.shape
    changed = np.argwhere((restored != before).any(-1))
    assert len(changed), "face 1 was pasted back"
    box = entry["faces"][1]["box"]  # every changed pixel lies around face 1
    assert changed[:, 1].min() >= box[0] - (box[2] - box[0]) and changed[:, 1].max() <= box[2] + (box[2] - box[0])
