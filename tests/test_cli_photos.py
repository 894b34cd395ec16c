"""Real photos of odd sizes through `diffpriv protect` and the real server, in both modes.

The shipped workflows run with the test-size models (as --demo-weights does), 64 px face
crops, two candidates and 2 steps everywhere (--steps 2): the pictures are meaningless,
the sizes and the untouched pixels are not. No photo side is a multiple of 8. MSI runs on
the whole-image photo only: on a CPU its full-size CLIP models cost minutes per face, so
the faces share a key-E loaded from a file (as in test_host_faces.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from diffpriv_client import cli, graphs
from diffpriv_core.faces.crop import FaceCrop, paste_faces
from diffpriv_core.keys import load_key

import make_face_models
import make_models
from conftest import keys_folder
from photos import as_image, insightface_photo
from test_host_faces import KEY_E_FILE, install_key_e

pytestmark = pytest.mark.host
CROP = 64


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    pixels = {
        # 222 x 161 of insightface's group photo, halved: two faces, the second cut by the right edge.
        "group": insightface_photo("t1.jpg")[::2, ::2][90:251, 195:417],
        "cat": skimage.data.chelsea()[1:298, 3:450],  # 447 x 297, no face
        "face": skimage.data.astronaut()[30:203, 150:301],  # 151 x 173, a face filling the picture (whole-image mode)
    }
    folder = tmp_path_factory.mktemp("photos")
    paths = {}
    for name, picture in pixels.items():
        assert picture.shape[0] % 8 and picture.shape[1] % 8, name
        paths[name] = folder / f"{name}.png"
        Image.fromarray(np.ascontiguousarray(picture)).save(paths[name])
    return paths


def shipped_workflow(name: str, into: Path, fixed_key_e: bool = False) -> Path:
    """A shipped workflow with the test models, 64 px crops and two candidates; with
    ``fixed_key_e``, MSI (and its loss-curve preview) replaced by a key-E from a file."""
    graph = graphs.load_workflow(graphs.default_workflow(name))
    if fixed_key_e:
        for node_id, node in list(graph.items()):
            if node["class_type"] == "DiffPrivacyMSIInversion":
                graph[node_id] = {"class_type": "DiffPrivacyLoadKey", "inputs": {"key_name": KEY_E_FILE, "passphrase": ""}}
            elif node["class_type"] == "PreviewImage":
                del graph[node_id]
    graphs.set_models(graph, {str(Path(rel).parent): Path(rel).name
                              for rel in (make_models.CHECKPOINT, make_models.CLIP_VISION)})
    graphs.set_face_recognizer(graph, make_face_models.ARCFACE_ONNX)
    for node in graphs.nodes_of(graph, "DiffPrivacyFaceCrop"):
        node["inputs"]["size"] = CROP
    for node in graphs.nodes_of(graph, "DiffPrivacyGuidedDDIMSampler"):
        node["inputs"].update(preset="custom", samples=2)
    path = into / f"{name}.json"
    path.write_text(json.dumps(graph))
    return path


def protect(images, out: Path, workflow: Path, url: str, *mode: str) -> int:
    return cli.main(["protect", *map(str, images), "--task", "anonymize", *mode, "--out", str(out),
                     "--workflow", str(workflow), "--server", url, "--steps", "2", "--seed", "5"])


def picture(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_every_face_by_default_any_size_untouched_outside_the_faces(comfy_host, photos, tmp_path, capsys):
    install_key_e(comfy_host)
    out = tmp_path / "out"
    workflow = shipped_workflow(cli.workflow_name(cli.build_parser().parse_args(
        ["protect", "p.png", "--task", "anonymize", "--out", "o"])), tmp_path, fixed_key_e=True)
    assert workflow.name == "anonymize_faces.json"
    rc = protect([photos[n] for n in ("group", "cat")], out, workflow, comfy_host.server.url)

    assert rc == 1
    results = json.loads((out / "summary.json").read_text())["results"]
    assert results["cat"]["status"] == "failed" and "no face found in image 0" in results["cat"]["error"]
    assert "cat: failed: " in capsys.readouterr().out, "the report lists the failure"
    entry = results["group"]
    assert entry["status"] == "ok", entry
    original = picture(photos["group"])
    crops = [FaceCrop.from_json(load_key(out / key)[2]["face_crop"]) for key in sorted(entry["keys"])]
    assert len(crops) == 2 and max(c.face_box[2] for c in crops) > original.shape[1], "a face is cut by the frame"
    _, masks = paste_faces(as_image(original)[None], torch.zeros(2, CROP, CROP, 3), crops)
    outside = masks[0].numpy() == 0
    protected = [picture(out / p) for p in entry["outputs"]]
    assert len(protected) == 2
    for candidate in protected:
        assert candidate.shape == original.shape, "the photo keeps its size"
        assert np.array_equal(candidate[outside], original[outside]), "nothing changes outside the faces"
        assert not np.array_equal(candidate[~outside], original[~outside]), "the faces changed"


def test_whole_image_mode_gives_back_the_original_size_and_refuses_before_queueing(comfy_host, photos, tmp_path,
                                                                                 capsys):
    out, url = tmp_path / "out", comfy_host.server.url
    too_big, broken = tmp_path / "banner.png", tmp_path / "broken.png"
    Image.fromarray(np.full((70, 2100, 3), 128, np.uint8)).save(too_big)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    workflow = shipped_workflow("anonymize", tmp_path)
    rc = protect([photos["face"], too_big, broken], out, workflow, url, "--whole-image")

    assert rc == 1
    printed = capsys.readouterr().out
    refusals = printed[printed.index("refused before queueing (2 of 3):"):printed.index("summary.json")]
    assert "banner: MSI takes images of at most 2048 x 2048 pixels, got 2100 x 70; resize" in refusals
    assert "broken: not a readable image" in refusals
    results = json.loads((out / "summary.json").read_text())["results"]
    assert results["banner"]["status"] == results["broken"]["status"] == "failed"
    assert results["banner"]["server"] is None, "never queued"
    entry = results["face"]
    assert entry["status"] == "ok", entry
    original = picture(photos["face"])
    assert [picture(out / p).shape for p in entry["outputs"]] == [original.shape] * 2
    (key,) = entry["keys"]
    assert load_key(out / key)[0].meta["image_size"] == "151x173"

    shutil.copy(out / key, keys_folder(comfy_host.base) / Path(key).name)
    recovered = tmp_path / "recovered"
    graph = graphs.load_workflow(graphs.default_workflow("recover"))
    graphs.set_models(graph, {"checkpoints": Path(make_models.CHECKPOINT).name})
    (tmp_path / "recover.json").write_text(json.dumps(graph))
    assert cli.main(["recover", str(out / key), "--out", str(recovered), "--server", url,
                     "--workflow", str(tmp_path / "recover.json")]) == 0
    (result,) = json.loads((recovered / "summary.json").read_text())["results"].values()
    (restored,) = result["outputs"]
    assert picture(recovered / restored).shape == original.shape


def test_the_host_starts_without_failed_imports(comfy_host):
    assert "IMPORT FAILED" not in comfy_host.log()
