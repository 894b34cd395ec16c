"""Recognisers are known by their content (the sha256 of the file), not by their name: a
renamed SFace keeps SFace's threshold, a file under a known name but other bytes is not
taken for that model, and a file the pack does not know needs its threshold stated."""
from __future__ import annotations

import shutil

import pytest

from diffpriv_core.faces.recognizers import (ARCFACE_THRESHOLD, KNOWN_FILES, SFACE_THRESHOLD, UnknownRecognizerError,
                                             load_recognizer)
from diffpriv_core.faces.wheel_models import FACENET_CASIA, SFACE, sha256
from diffpriv_client.comfy_http import PromptFailed
from diffpriv_testmodels.face_models import ARCFACE_ONNX
from test_host_guidance import guidance_graph


def test_a_renamed_sface_is_judged_with_sfaces_threshold(installed_models, tmp_path):
    renamed = tmp_path / "my_recogniser.onnx"  # e.g. listed under another name by extra_model_paths.yaml
    shutil.copyfile(installed_models / SFACE.folder / SFACE.file, renamed)
    assert load_recognizer(renamed).threshold == pytest.approx(SFACE_THRESHOLD) == pytest.approx(0.363)
    assert load_recognizer(renamed, 0.5).threshold == 0.5  # a stated threshold wins


def test_the_installed_recognisers_are_known_by_their_bytes():
    assert {SFACE.file_sha256, FACENET_CASIA.file_sha256} <= set(KNOWN_FILES)


def test_an_unknown_file_under_a_known_name_needs_its_threshold_stated(face_models, tmp_path):
    posing = tmp_path / "w600k_r50.onnx"  # buffalo_l's ArcFace name, other bytes
    shutil.copyfile(face_models / ARCFACE_ONNX, posing)
    with pytest.raises(UnknownRecognizerError) as err:
        load_recognizer(posing)
    message = str(err.value)
    assert sha256(posing) in message and "must be stated" in message and f"{ARCFACE_THRESHOLD:.3f}" in message
    assert load_recognizer(posing, ARCFACE_THRESHOLD).threshold == ARCFACE_THRESHOLD


@pytest.mark.host
def test_the_loader_names_the_input_to_set_for_an_unknown_file(comfy_host, astronaut):
    graph = guidance_graph([comfy_host.upload(astronaut, "identity.png")])
    graph["1"]["inputs"]["threshold"] = 0.0  # the random test recogniser is known to nobody
    with pytest.raises(PromptFailed) as err:
        comfy_host.client.run(graph)
    assert "not a face recogniser this pack knows by its content" in str(err.value)
    assert "Set this node's 'threshold' input" in str(err.value)
