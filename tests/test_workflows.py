"""The shipped workflows: UI files match their API twins, and every node and input they
use exists in the real host."""
from __future__ import annotations

import json

import pytest

from diffpriv_client.workflows import WORKFLOWS_DIR, load_api, ui_to_api, workflow_names

pytestmark = pytest.mark.host
NAMES = workflow_names()


def test_every_task_has_a_workflow():
    assert {"anonymize", "hide", "recover", "anonymize_faces", "hide_faces", "recover_face"} <= set(NAMES)


@pytest.fixture(scope="module")
def object_info(comfy_host):
    return comfy_host.client.object_info()


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_the_same_graph_as_its_api_twin(object_info, name):
    ui = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
    assert ui_to_api(ui, object_info) == load_api(name)
    assert (WORKFLOWS_DIR / f"{name}.jpg").stat().st_size > 1000


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_uses_only_real_nodes_and_inputs(object_info, name):
    for node_id, node in load_api(name).items():
        info = object_info[node["class_type"]]
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        assert set(node["inputs"]) <= set(spec), (name, node_id, set(node["inputs"]) - set(spec))
        assert set(info["input"].get("required", {})) <= set(node["inputs"]), (name, node_id)
        for value in node["inputs"].values():
            if isinstance(value, list):
                source = load_api(name)[value[0]]
                assert value[1] < len(object_info[source["class_type"]]["output"])


@pytest.mark.parametrize("name", NAMES)
def test_workflows_guide_with_the_installed_sface_recogniser(name):
    from diffpriv_core.faces.recognizers import DEFAULT_RECOGNIZER

    for node in load_api(name).values():
        if node["class_type"] == "DiffPrivacyFaceRecognizerLoader":
            assert node["inputs"]["model_name"] == DEFAULT_RECOGNIZER, name


@pytest.mark.parametrize("name", NAMES)
def test_every_node_has_a_title_api_clients_address_it_by(name):
    titles = [(node.get("_meta") or {}).get("title") for node in load_api(name).values()]
    assert all(isinstance(title, str) and title.strip() for title in titles), name
    assert len(set(titles)) == len(titles), name


@pytest.mark.parametrize("name", NAMES)
def test_the_photo_a_workflow_opens_is_the_example_photo_or_a_protect_workflows_output(object_info, name):
    photos = object_info["LoadImage"]["input"]["required"]["image"][0]
    assert "diffprivacy_astronaut.png" in photos, "the pack puts its example photo in the input folder"
    saved = {f"{node['inputs']['filename_prefix']}_00001_.png [output]" for other in NAMES
             for node in load_api(other).values() if node["class_type"] == "SaveImage"}
    for node in load_api(name).values():
        if node["class_type"] == "LoadImage":
            assert node["inputs"]["image"] in {"diffprivacy_astronaut.png"} | saved, name


@pytest.mark.parametrize("name", NAMES)
def test_the_model_files_a_workflow_names_say_their_folder_and_where_to_get_them(name):
    """The editor's missing-models panel reads a node's properties.models."""
    from diffpriv_client.workflows import MODEL_FILES

    ui = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
    for node in ui["nodes"]:
        named = [v for v in node["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
        if node["type"] in ("CheckpointLoaderSimple", "CLIPVisionLoader"):
            assert named and named[0] in MODEL_FILES, (name, node["type"])
        for file in named:
            if file in MODEL_FILES:
                folder, url = MODEL_FILES[file]
                assert {"name": file, "url": url, "directory": folder} in node["properties"]["models"], (name, file)
                assert url.startswith("https://") and url.endswith(".safetensors")
