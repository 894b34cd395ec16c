"""Filling API-format templates in for one image or one key."""
from __future__ import annotations

import json

import pytest

from diffpriv_client import graphs

WORKFLOWS = graphs.PACK_DIR / "tests" / "workflows"


@pytest.fixture
def template() -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "vision": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "vitl14.safetensors"}},
        "img": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
        "msi": {"class_type": "DiffPrivacyMSI", "inputs": {"seed": 1, "steps": 300, "image": ["img", 0]}},
        "seed": {"class_type": "PrimitiveInt", "inputs": {"value": 5}},
        "sampler": {"class_type": "KSampler", "inputs": {"seed": ["seed", 0], "steps": 50}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "key": {"class_type": "DiffPrivacySaveKey",
                "inputs": {"filename_prefix": "k", "folder": "keys", "passphrase": "", "key_e": ["msi", 0]}},
        "out": {"class_type": "SaveImage", "inputs": {"filename_prefix": "results/anonymized", "images": ["s", 0]}},
    }


def test_protect_graph_fills_image_key_output_seed_and_steps(template):
    g = graphs.protect_graph(template, "upload/a.png", "photo", passphrase="pw", seed=42, steps=7)
    assert g["img"]["inputs"]["image"] == "upload/a.png"
    assert g["key"]["inputs"] == {"filename_prefix": "diffpriv/photo", "folder": "output", "passphrase": "pw",
                                  "key_e": ["msi", 0]}
    assert g["out"]["inputs"]["filename_prefix"] == "diffpriv/photo_anonymized"
    assert g["msi"]["inputs"]["seed"] == 42 and g["noise"]["inputs"]["noise_seed"] == 42
    assert g["msi"]["inputs"]["steps"] == 7 and g["sampler"]["inputs"]["steps"] == 7
    assert g["sampler"]["inputs"]["seed"] == ["seed", 0], "a linked seed stays linked"
    assert g["msi"]["inputs"]["image"] == ["img", 0]
    assert template["img"]["inputs"]["image"] == "x.png", "the template itself is left alone"


def test_protect_graph_keeps_template_seed_and_steps_unless_given(template):
    g = graphs.protect_graph(template, "a.png", "a")
    assert g["msi"]["inputs"]["seed"] == 1 and g["msi"]["inputs"]["steps"] == 300


def test_recover_graph_fills_the_key(template):
    template["load"] = {"class_type": "DiffPrivacyLoadKey", "inputs": {"key_name": "old", "passphrase": ""}}
    g = graphs.recover_graph(template, "diffpriv/a_00001.dpkey.safetensors", "a_00001", passphrase="pw")
    assert g["load"]["inputs"] == {"key_name": "diffpriv/a_00001.dpkey.safetensors", "passphrase": "pw"}


def test_missing_node_is_named(template):
    with pytest.raises(ValueError, match="no DiffPrivacyLoadKey node"):
        graphs.recover_graph(template, "k", "k")


def test_demo_recogniser_override(template):
    template["rec"] = {"class_type": "DiffPrivacyFaceRecognizerLoader", "inputs": {"model_name": "insightface/x.onnx"}}
    graphs.set_face_recognizer(template, "insightface/models/dp-test/dp-test-arcface.onnx")
    assert template["rec"]["inputs"]["model_name"] == "insightface/models/dp-test/dp-test-arcface.onnx"


def test_required_models_and_demo_override(template):
    assert graphs.required_models(template) == {"checkpoints": {"sd15.safetensors"},
                                                "clip_vision": {"vitl14.safetensors"}}
    graphs.set_models(template, {"checkpoints": "demo.safetensors"})
    assert graphs.required_models(template)["checkpoints"] == {"demo.safetensors"}
    assert graphs.required_models(template)["clip_vision"] == {"vitl14.safetensors"}


def test_ui_format_is_refused(tmp_path):
    path = tmp_path / "ui.json"
    path.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(ValueError, match="Export \\(API\\)"):
        graphs.load_workflow(path)


def test_missing_workflow_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="--workflow"):
        graphs.load_workflow(tmp_path / "nope.json")


@pytest.mark.parametrize("name", ["protect.json", "recover.json"])
def test_test_templates_load(name):
    assert graphs.required_models(graphs.load_workflow(WORKFLOWS / name))["checkpoints"] == {
        "dp-test-sd15.safetensors"}


@pytest.mark.parametrize("task", ["anonymize", "hide"])
def test_the_shipped_protect_workflows_take_every_patch(task):
    g = graphs.protect_graph(graphs.load_workflow(graphs.default_workflow(task)), "diffpriv/p.png", "p",
                             passphrase="pw", seed=9, steps=12)
    (save_key,) = graphs.nodes_of(g, "DiffPrivacySaveKey")
    assert save_key["inputs"]["folder"] == "output" and save_key["inputs"]["passphrase"] == "pw"
    assert [n["inputs"]["image"] for n in graphs.nodes_of(g, "LoadImage")] == ["diffpriv/p.png"]
    seeds = [n["inputs"]["seed"] for n in g.values() if "seed" in n["inputs"]]
    assert seeds and set(seeds) == {9}
    # Sampling and key inversion stay on one grid: recovery needs the same step count.
    assert {n["inputs"]["steps"] for n in g.values() if "steps" in n["inputs"]} == {12}
    assert graphs.required_models(g) == {"checkpoints": {"v1-5-pruned-emaonly.safetensors"},
                                         "clip_vision": {"clip_vit_large_patch14.safetensors"}}


def test_the_shipped_recover_workflow_takes_the_key():
    template = graphs.load_workflow(graphs.default_workflow("recover"))
    g = graphs.recover_graph(template, "diffpriv-cli/k.dpkey.safetensors", "k", passphrase="pw")
    (load,) = graphs.nodes_of(g, "DiffPrivacyLoadKey")
    assert load["inputs"] == {"key_name": "diffpriv-cli/k.dpkey.safetensors", "passphrase": "pw"}


def test_steps_reach_a_sampler_that_is_on_a_preset():
    from diffpriv_client.graphs import load_workflow, nodes_of, set_steps
    from diffpriv_client.workflows import WORKFLOWS_DIR

    graph = load_workflow(WORKFLOWS_DIR / "api" / "hide.json")
    before = dict(nodes_of(graph, "DiffPrivacyGuidedDDIMSampler")[0]["inputs"])
    set_steps(graph, 3)
    (sampler,) = nodes_of(graph, "DiffPrivacyGuidedDDIMSampler")
    # A set input wins over the node's preset (tasks.preset_value), so only steps changes.
    assert sampler["inputs"] == dict(before, steps=3)


def test_the_demo_works_small_and_keeps_more_key_i_steps_than_sampling_steps():
    from diffpriv_client import demo

    graph = graphs.load_workflow(graphs.default_workflow("anonymize_faces"))
    demo.use_demo_models(graph)
    demo.apply_settings(graph)
    inputs = {n["class_type"]: n["inputs"] for n in graph.values()}
    settings = demo.SETTINGS
    assert inputs["DiffPrivacyFaceCrop"]["size"] == settings.crop == 64
    assert inputs["DiffPrivacyMSIInversion"]["steps"] == settings.msi_steps
    assert inputs["DiffPrivacyGuidedDDIMSampler"]["steps"] == settings.sampling_steps
    key_i = inputs["DiffPrivacyDDIMInversionKey"]
    assert (key_i["steps"], key_i["mode"]) == (settings.key_i_steps, "bdia"), "the workflow's mode, the default"
    assert settings.key_i_steps > settings.sampling_steps
    assert inputs["DiffPrivacyIdentityGuidance"]["gradient_checkpointing"] is False
    assert graphs.required_models(graph) == {"checkpoints": {"dp-demo-sd15.safetensors"},
                                             "clip_vision": {"dp-test-vitl14.safetensors"}}
    g = graphs.protect_graph(graph, "up.png", "astronaut", steps=3)  # --steps still sets every steps input
    assert {n["inputs"]["steps"] for n in g.values() if "steps" in n["inputs"]} == {3}
    assert "3 steps everywhere" in settings.describe(3) and "64 px" in settings.describe(None)
