"""Achieved identity similarity in the real host: the Identity Similarity node on real faces
with SFace, the target-similarity example workflows (and `diffpriv protect
--target-similarity`), and the SamplerCustom workflow that measures its SAMPLER's pictures.

The workflows run as test_cli_photos.py runs the shipped ones (test-size models, 64 px face
crops, 2 steps, key-E from a file), with one candidate per face. Their pictures are
meaningless; what is checked is that each reports its recogniser's numbers, verdicts and
goal where it should."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffpriv_client import cli, graphs
from diffpriv_client.comfy_http import PromptFailed
from diffpriv_core.faces.recognizers import DEFAULT_RECOGNIZER, SFACE_THRESHOLD
from diffpriv_core.keys import save_key
from conftest import keys_folder
from key_helpers import random_key_e
from test_cli_photos import shipped_workflow
from test_host_faces import KEY_E_FILE, install_key_e

pytestmark = pytest.mark.host
SIZED_KEY_E_FILE = "similarity-e.dpkey.safetensors"


@pytest.fixture(scope="module")
def face(astronaut, tmp_path_factory) -> tuple[np.ndarray, Path]:
    """151 x 173 px of the astronaut, her face filling the picture (any size works)."""
    picture = np.ascontiguousarray(astronaut[30:203, 150:301])
    path = tmp_path_factory.mktemp("similarity") / "face.png"
    Image.fromarray(picture).save(path)
    return picture, path


def one_candidate(workflow: Path) -> Path:
    """A shipped workflow (as test_cli_photos runs it) with one candidate per face: the
    report per sample is checked in the other tests."""
    graph = graphs.load_workflow(workflow)
    graph[node_of(graph, "DiffPrivacyGuidedDDIMSampler")]["inputs"]["samples"] = 1
    workflow.write_text(json.dumps(graph))
    return workflow


def node_of(graph: dict, class_type: str) -> str:
    (node_id,) = [i for i, node in graph.items() if node["class_type"] == class_type]
    return node_id


def test_identity_similarity_tells_a_face_from_its_mosaic_with_sface(comfy_host, astronaut):
    photo = np.ascontiguousarray(astronaut[::2, ::2])  # 256 px
    rng = np.random.default_rng(0)
    noisy = np.clip(photo.astype(int) + rng.integers(-6, 7, photo.shape), 0, 255).astype(np.uint8)
    mosaic = np.asarray(Image.fromarray(photo).resize((16, 16), Image.BOX).resize((256, 256), Image.NEAREST))
    names = {k: comfy_host.upload(v, f"similarity-{k}.png") for k, v in
             (("photo", photo), ("noisy", noisy), ("mosaic", mosaic))}
    graph = {
        "orig": {"class_type": "LoadImage", "inputs": {"image": names["photo"]}},
        "a": {"class_type": "LoadImage", "inputs": {"image": names["noisy"]}},
        "b": {"class_type": "LoadImage", "inputs": {"image": names["mosaic"]}},
        "pair": {"class_type": "ImageBatch", "inputs": {"image1": ["a", 0], "image2": ["b", 0]}},
        "fr": {"class_type": "DiffPrivacyFaceRecognizerLoader", "inputs": {"model_name": DEFAULT_RECOGNIZER}},
        "sim": {"class_type": "DiffPrivacyIdentitySimilarity",
                "inputs": {"face_model": ["fr", 0], "original": ["orig", 0], "protected": ["pair", 0],
                           "face_index": 0, "min_score": 0.9, "on_no_face": "error"}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["sim", 2]}},
        "floats": {"class_type": "PreviewAny", "inputs": {"source": ["sim", 0]}},
    }
    result = comfy_host.client.run(graph)
    (entry,) = result.outputs["sim"]["identity_similarity"]
    assert entry["recognizer"] == Path(DEFAULT_RECOGNIZER).name and entry["threshold"] == round(SFACE_THRESHOLD, 4)
    same, pixelated = entry["cosines"]
    assert same > SFACE_THRESHOLD + 0.3 and pixelated < SFACE_THRESHOLD, entry
    assert entry["same_person"] == [True, False] and entry["goal"] is None
    # the report reaches Preview as Text, and the similarity output one number per picture
    (text,) = result.outputs["show"]["text"]
    assert result.outputs["sim"]["text"] == [text]
    assert f"image 0: {same:.4f} same person; {pixelated:.4f} different person" in text
    assert np.allclose([float(v) for v in result.outputs["floats"]["text"]], entry["cosines"], atol=1e-4)

    graph["sim"]["inputs"]["original"] = ["pair", 0]  # 2 originals for 3 pictures
    graph["sim"]["inputs"]["protected"] = ["three", 0]
    graph["three"] = {"class_type": "ImageBatch", "inputs": {"image1": ["pair", 0], "image2": ["orig", 0]}}
    with pytest.raises(PromptFailed, match="'protected' holds 3 pictures and 'original' 2 images"):
        comfy_host.client.run(graph)
    graph["sim"]["inputs"].update(original=["orig", 0], protected=["half", 0])
    graph["half"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["a", 0], "upscale_method": "area",
                                                              "scale_by": 0.5}}
    with pytest.raises(PromptFailed, match="image 0: the pictures are 128 x 128 px, their original 256 x 256"):
        comfy_host.client.run(graph)


def test_the_target_workflows_run_to_their_goal_and_the_command_sets_the_margin(comfy_host, face, tmp_path):
    """anonymize_faces_target through `diffpriv protect --target-similarity --margin 0.1`
    (the margin reaches the guidance: the goal moves), hide_faces_target queued as it is."""
    install_key_e(comfy_host)
    picture, path = face
    out = tmp_path / "out"
    workflow = one_candidate(shipped_workflow("anonymize_faces_target", tmp_path, KEY_E_FILE))
    assert cli.main(["protect", str(path), "--task", "anonymize", "--out", str(out), "--workflow", str(workflow),
                     "--server", comfy_host.server.url, "--steps", "2", "--seed", "5", "--target-similarity",
                     "--margin", "0.1"]) == 0
    entry = json.loads((out / "summary.json").read_text())["results"]["face"]
    (identity,) = entry["identity"]
    assert identity["mode"] == "anonymize" and identity["goal"] == pytest.approx(identity["threshold"] - 0.1, abs=1e-4)
    assert len(identity["cosines"]) == len(entry["outputs"]) == 1

    template = graphs.load_workflow(one_candidate(shipped_workflow("hide_faces_target", tmp_path, KEY_E_FILE)))
    graph = graphs.protect_graph(template, comfy_host.upload(picture, "similarity-face.png"), "hide", seed=5, steps=2)
    result = comfy_host.client.run(graph)
    (report,) = result.outputs[node_of(graph, "DiffPrivacyGuidedDDIMSampler")]["identity_similarity"]
    assert report["mode"] == "hide" and report["goal"] == pytest.approx(report["threshold"] + 0.05, abs=1e-4)
    (text,) = result.outputs[node_of(graph, "PreviewAny")]["text"]
    assert f"goal >= {report['goal']} (hide)" in text and "image 0: " in text


def test_the_samplercustom_workflow_measures_what_its_sampler_made(comfy_host, face, tmp_path):
    """The Guided DDIM SAMPLER returns latents only: it logs the similarity, and the
    workflow's Identity Similarity node reports it for the decoded pictures."""
    picture = np.ascontiguousarray(face[0][::2, ::2])  # 76 x 87: a small whole-image run
    key_e = random_key_e(12)
    key_e.meta["image_size"] = "76x87"  # what MSI records for this picture
    save_key(keys_folder(comfy_host.base) / SIZED_KEY_E_FILE, key_e)
    graph = graphs.load_workflow(shipped_workflow("anonymize_samplercustom", tmp_path, SIZED_KEY_E_FILE))
    graphs.set_input_image(graph, comfy_host.upload(picture, "similarity-small.png"))
    graphs.set_steps(graph, 2)  # BasicScheduler at denoise 0.6: 3 ddim_uniform steps, the last 2 run
    graph[node_of(graph, "RepeatLatentBatch")]["inputs"]["amount"] = 2
    logged = comfy_host.log().count("Diff-Privacy Guided DDIM: ")
    result = comfy_host.client.run(graph)
    measure = node_of(graph, "DiffPrivacyIdentitySimilarity")
    (entry,) = result.outputs[measure]["identity_similarity"]
    assert len(entry["cosines"]) == 2 and entry["same_person"] == [c >= entry["threshold"] for c in entry["cosines"]]
    assert result.outputs[node_of(graph, "PreviewAny")]["text"] == result.outputs[measure]["text"]
    assert comfy_host.log().count("Diff-Privacy Guided DDIM: ") == logged + 1
