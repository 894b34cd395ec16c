"""Real photos of odd sizes through `diffpriv protect` and the real server, in both modes.

The shipped workflows run with the test-size models (as --demo-weights does), 64 px face
crops, two candidates and 2 steps everywhere (--steps 2): the pictures are meaningless,
the sizes and the untouched pixels are not. No photo side is a multiple of 8. MSI is
replaced by a key-E loaded from a file (as in test_host_faces.py): on a CPU its full-size
CLIP models cost minutes per face (one whole-image run with MSI took 11 minutes on the
shared 2-core test machine). The whole-image key-E records its photo's size, as MSI's does
(test_msi.py checks that MSI records it and trains on any size)."""
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
from diffpriv_core.keys import load_key, save_key
from diffpriv_testmodels.comfy_models import ARCFACE_ONNX, CHECKPOINT, CLIP_VISION
from conftest import keys_folder
from photos import as_image, insightface_photo
from test_host_faces import KEY_E_FILE, install_key_e
from test_host_recovery import random_key_e

pytestmark = pytest.mark.host
CROP = 64
SIZED_KEY_E_FILE = "photo-size-e.dpkey.safetensors"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    pixels = {
        # 222 x 161 of insightface's group photo, halved: two faces, one cut by the right edge.
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


def shipped_workflow(name: str, into: Path, key_e_file: str) -> Path:
    """A shipped workflow with the test models, 64 px crops and two candidates, and MSI (and
    its loss-curve preview) replaced by a key-E from a file."""
    graph = graphs.load_workflow(graphs.default_workflow(name))
    for node_id, node in list(graph.items()):
        if node["class_type"] == "DiffPrivacyMSIInversion":
            graph[node_id] = {"class_type": "DiffPrivacyLoadKey", "inputs": {"key_name": key_e_file, "passphrase": ""}}
        elif node["class_type"] == "PreviewImage":
            del graph[node_id]
    graphs.set_models(graph, {str(Path(rel).parent): Path(rel).name for rel in (CHECKPOINT, CLIP_VISION)})
    graphs.set_face_recognizer(graph, ARCFACE_ONNX)
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
        ["protect", "p.png", "--task", "anonymize", "--out", "o"])), tmp_path, KEY_E_FILE)
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
    assert len(crops) == 2 and max(c.box[0] + c.box[2] for c in crops) > original.shape[1], \
        "a face's square runs off the frame"
    _, masks = paste_faces(as_image(original)[None], torch.zeros(2, CROP, CROP, 3), crops)
    outside = masks[0].numpy() == 0
    protected = [picture(out / p) for p in entry["outputs"]]
    assert len(protected) == 2
    for candidate in protected:
        assert candidate.shape == original.shape, "the photo keeps its size"
        assert np.array_equal(candidate[outside], original[outside]), "nothing changes outside the faces"
        assert not np.array_equal(candidate[~outside], original[~outside]), "the faces changed"


def test_whole_image_mode_gives_back_the_original_size_even_at_recovery(comfy_host, photos, tmp_path, capsys):
    out, url = tmp_path / "out", comfy_host.server.url
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    size_key_e = random_key_e(12)
    size_key_e.meta["image_size"] = "151x173"  # what MSI records for this photo
    save_key(keys_folder(comfy_host.base) / SIZED_KEY_E_FILE, size_key_e)
    workflow = shipped_workflow("anonymize", tmp_path, SIZED_KEY_E_FILE)
    rc = protect([photos["face"], broken], out, workflow, url, "--whole-image")

    assert rc == 1
    printed = capsys.readouterr().out
    assert "refused before queueing (1 of 2):\n  broken: not a readable image" in printed
    results = json.loads((out / "summary.json").read_text())["results"]
    assert results["broken"]["status"] == "failed" and results["broken"]["server"] is None, "never queued"
    entry = results["face"]
    assert entry["status"] == "ok", entry
    original = picture(photos["face"])
    assert [picture(out / p).shape for p in entry["outputs"]] == [original.shape] * 2
    (key,) = entry["keys"]  # the key file carries key-E's size to the recovery
    shutil.copy(out / key, keys_folder(comfy_host.base) / Path(key).name)
    recovered = tmp_path / "recovered"
    graph = graphs.load_workflow(graphs.default_workflow("recover"))
    graphs.set_models(graph, {"checkpoints": Path(CHECKPOINT).name})
    (tmp_path / "recover.json").write_text(json.dumps(graph))
    assert cli.main(["recover", str(out / key), "--out", str(recovered), "--trust-server", url,
                     "--workflow", str(tmp_path / "recover.json")]) == 0
    (result,) = json.loads((recovered / "summary.json").read_text())["results"].values()
    (restored,) = result["outputs"]
    assert picture(recovered / restored).shape == original.shape


def test_the_host_starts_without_failed_imports(comfy_host):
    assert "IMPORT FAILED" not in comfy_host.log()
