"""The face recogniser loader and the identity guidance node in the real ComfyUI server."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from diffpriv_client.comfy_http import PromptFailed
from diffpriv_client.embedded import find_comfyui
from diffpriv_core import guided
from diffpriv_core.faces.recognizers import DEFAULT_RECOGNIZER, load_recognizer
from diffpriv_core.faces.wheel_models import FACENET_CASIA, SFACE
from photos import face_photos
from diffpriv_core.schedule import ddim_grid
from diffpriv_testmodels.face_models import ARCFACE_ONNX, TEST_THRESHOLD
from diffpriv_testmodels.inprocess import pack_module
from test_host_foundation import fetch_image

pytestmark = pytest.mark.host

TEST_RECOGNIZER = ARCFACE_ONNX  # "insightface/models/dp-test/dp-test-arcface.onnx"


def guidance_graph(image_names: list[str], model_name: str = TEST_RECOGNIZER, on_no_face: str = "error") -> dict:
    """Load the image(s) (batched with ImageBatch), run the guidance node, save aligned_faces."""
    graph = {"10": {"class_type": "LoadImage", "inputs": {"image": image_names[0]}}}
    images = ["10", 0]
    if len(image_names) > 1:
        graph["11"] = {"class_type": "LoadImage", "inputs": {"image": image_names[1]}}
        graph["12"] = {"class_type": "ImageBatch", "inputs": {"image1": ["10", 0], "image2": ["11", 0]}}
        images = ["12", 0]
    graph.update({
        "1": {"class_type": "DiffPrivacyFaceRecognizerLoader", "inputs": {
            "model_name": model_name, "threshold": TEST_THRESHOLD if model_name == TEST_RECOGNIZER else 0.0}},
        "2": {"class_type": "DiffPrivacyIdentityGuidance", "inputs": {
            "face_model": ["1", 0], "image": images, "mode": "anonymize", "lambda_scale": 1.0,
            "normalize_gradient": False, "diversity": True, "decode_region": "whole image",
            "face_index": 0, "min_score": 0.9, "on_no_face": on_no_face}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 1], "filename_prefix": "aligned"}},
    })
    return graph


@pytest.fixture(scope="module")
def uploads(comfy_host, astronaut):
    return {"astronaut": comfy_host.upload(astronaut, "astronaut.png"),
            "grey": comfy_host.upload(np.full(astronaut.shape, 128, np.uint8), "grey512.png")}


def test_loader_lists_recognisers_in_the_insightface_pack_layout(comfy_host):
    options = comfy_host.client.object_info()["DiffPrivacyFaceRecognizerLoader"]["input"]["required"]["model_name"]
    names = options[1]["options"] if isinstance(options[1], dict) and "options" in options[1] else options[0]
    assert TEST_RECOGNIZER in names
    assert "insightface/models/buffalo_l/w600k_r50.onnx" in names  # the usual file, offered even when absent
    # the trained recognisers the setup installs, SFace the default
    assert options[1]["default"] == DEFAULT_RECOGNIZER == "sface/face_recognition_sface_2021dec.onnx"
    assert {DEFAULT_RECOGNIZER, "facenet/20180408-102900-casia-webface.safetensors"} <= set(names)


@pytest.mark.parametrize("model", [SFACE, FACENET_CASIA], ids=["sface", "facenet-casia"])
def test_real_recognisers_through_the_nodes_align_their_own_way_and_tell_people_apart(comfy_host, model):
    """The installed recogniser (in the ComfyUI installation's models folder, while the
    server runs in a base directory of its own) aligns each photo's face its own way; its
    embeddings of those crops match the same person and tell different people apart."""
    photos, same = face_photos()
    names = ["astronaut", "astronaut_mirrored", "t1_0", "hanks"]
    graph = {"1": {"class_type": "DiffPrivacyFaceRecognizerLoader",
                   "inputs": {"model_name": f"{model.folder}/{model.file}"}}}
    for k, name in enumerate(names):
        load, guide, save = (str(10 * (k + 1) + j) for j in range(3))
        graph[load] = {"class_type": "LoadImage", "inputs": {"image": comfy_host.upload(photos[name], f"{name}.png")}}
        graph[guide] = {"class_type": "DiffPrivacyIdentityGuidance",
                        "inputs": {**guidance_graph(["x"])["2"]["inputs"], "image": [load, 0]}}
        graph[save] = {"class_type": "SaveImage", "inputs": {"images": [guide, 1], "filename_prefix": name}}
    result = comfy_host.client.run(graph)
    crops = {name: fetch_image(comfy_host, result.files(str(10 * (k + 1) + 2))[0]) for k, name in enumerate(names)}
    recognizer = load_recognizer(find_comfyui() / "models" / model.folder / model.file)
    size = recognizer.input_size
    assert all(c.shape == (size, size, 3) for c in crops.values())
    with torch.no_grad():
        batch = torch.stack([torch.from_numpy(c.copy()) for c in crops.values()]).permute(0, 3, 1, 2).float() / 255
        embeddings = dict(zip(names, recognizer(batch)))
    assert float(embeddings["astronaut"] @ embeddings["astronaut_mirrored"]) > recognizer.threshold + 0.3
    for other in ("t1_0", "hanks"):
        assert float(embeddings["astronaut"] @ embeddings[other]) < recognizer.threshold


def test_guidance_aligns_the_reference_face_for_the_recogniser(comfy_host, uploads):
    result = comfy_host.client.run(guidance_graph([uploads["astronaut"]]))
    (record,) = result.files("3")
    aligned = fetch_image(comfy_host, record)
    assert aligned.shape == (112, 112, 3)
    # The astronaut's face fills the crop: no black border from outside the photo, skin in the middle.
    assert aligned.min(axis=2).mean() > 60 and aligned[56, 56].mean() > 100


def test_no_face_names_the_image_index_and_skip_goes_on(comfy_host, uploads):
    pair = [uploads["astronaut"], uploads["grey"]]
    with pytest.raises(PromptFailed, match="no face found in image 1 of the batch for identity guidance"):
        comfy_host.client.run(guidance_graph(pair))
    records = comfy_host.client.run(guidance_graph(pair, on_no_face="skip")).files("3")
    first, second = (fetch_image(comfy_host, r) for r in records)
    assert first.max() > 0 and second.max() == 0


def test_missing_recogniser_is_a_clear_error(comfy_host, uploads):
    with pytest.raises(PromptFailed) as err:
        comfy_host.client.run(guidance_graph([uploads["astronaut"]], model_name="arcface/model_ir_se50.pth"))
    message = str(err.value)
    assert "'model_ir_se50.pth' not found" in message
    assert str(comfy_host.base / "models" / "arcface") in message and "InsightFace_Pytorch" in message


def test_guidance_built_inside_a_prompt_gives_gradients(comfy_inproc, face_models, astronaut):
    """Inference tensors cannot be saved for backward: the nodes must hand the sampler normal
    tensors (recogniser weights, reference embeddings, alignment matrices)."""
    import folder_paths

    guidance_nodes = pack_module("nodes.guidance")
    host = pack_module("nodes.host")
    folder_paths.add_model_folder_path("insightface", str(face_models / "insightface"))
    image = torch.from_numpy(astronaut.copy()).float()[None] / 255

    def decoder(z):  # a stand-in VAE decoder: the first three channels, 8x upsampled
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8).permute(0, 2, 3, 1)

    with torch.inference_mode():  # what execution.py wraps every prompt in
        (model,) = guidance_nodes.FaceRecognizerLoader.execute(TEST_RECOGNIZER, TEST_THRESHOLD).result
        guidance, _ = guidance_nodes.IdentityGuidanceNode.execute(
            model, image, "anonymize", 1.0, False, True, "face crop", 0, 0.9, "error").result
        with host.gradients():
            correction = guided.IdentityCorrection(guidance, guidance.target_for(0), decoder, ddim_grid(10))
            grad = correction.energy_gradient(torch.randn(2, 4, 64, 64))
    assert grad.abs().sum() > 0
    # the astronaut's face and half its size around it, in latent cells
    assert correction.window((64, 64)) == (1, 15, 29, 41)


def test_the_sampler_gives_each_image_of_a_batch_the_pictures_it_gets_alone(comfy_inproc, test_models, face_models,
                                                                              astronaut):
    """Three images, each with its own key-E, two guided (faces found) and one without a
    face (unguided): sampled together in one UNet call a step, each image gets the
    pictures, similarities and per-image passes it gets in a group of its own (float
    rounding aside); the calls made in sequence are those of one image."""
    import folder_paths

    from diffpriv_testmodels.comfy_models import CHECKPOINT
    from test_host_recovery import random_key_e

    guidance_nodes, protect = pack_module("nodes.guidance"), pack_module("nodes.protect")
    scheduler, adapters = pack_module("nodes.scheduler"), pack_module("nodes.adapters")
    folder_paths.add_model_folder_path("insightface", str(face_models / "insightface"))
    face = torch.from_numpy(astronaut[:256:2, 96:352:2].copy()).float() / 255  # 128 px, the face inside
    images = torch.stack([face, face.flip(1), torch.full_like(face, 0.5)])
    with torch.inference_mode():
        model, _clip, vae = comfy_inproc.sd.load_checkpoint_guess_config(str(test_models / CHECKPOINT))[:3]
        (recogniser,) = guidance_nodes.FaceRecognizerLoader.execute(TEST_RECOGNIZER, TEST_THRESHOLD).result
        guidance, _ = guidance_nodes.IdentityGuidanceNode.execute(
            recogniser, images, "anonymize", 1.0, False, True, "face crop", 0, 0.5, "skip").result
        assert [t is not None for t in guidance.targets] == [True, True, False]
        positive = scheduler.EmbeddingScheduler.execute([random_key_e(s) for s in (1, 2, 3)], "anonymize", -1.0).args[0]
        latent = {"samples": vae.encode(images)}

        def run(batch_size):
            out = protect.GuidedDDIMSampler.execute(model, vae, positive, latent, "custom", 0.6, 5, 2, 7,
                                                    guidance=guidance, batch_size=batch_size)
            return out.args[0]["samples"], out.args[1], out.ui["passes"]

        alone, together = run(2), run(0)
    assert alone[0].shape == together[0].shape == (6, 4, 16, 16)
    assert torch.allclose(alone[0], together[0], atol=1e-4 * float(alone[0].abs().max()))
    assert together[1] == pytest.approx(alone[1], abs=1e-4) and len(alone[1]) == 4  # two guided images x 2
    assert [e["passes"] for e in together[2]] == [e["passes"] for e in alone[2]]
    assert together[2][2]["passes"] == {"unet_forward": 6}  # no face: the UNet only, 3 steps x 2 samples
    assert [e["batch"] for e in alone[2]] == [[0], [1], [2]] and together[2][0]["batch"] == [0, 1, 2]
    assert {e["calls"]["unet_forward"] for e in alone[2] + together[2]} == {3}  # 3 steps, whatever the group
    guided_calls = alone[2][0]["calls"]["vae_decode_forward"]
    assert together[2][0]["calls"]["vae_decode_forward"] == 2 * guided_calls  # each face decodes its own
