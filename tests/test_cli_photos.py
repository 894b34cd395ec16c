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
from PIL import Image, ImageOps

from diffpriv_client import cli, graphs
from diffpriv_client.comfy_http import ComfyClient
from diffpriv_client.summary import latest_run
from diffpriv_core.faces.detect import detect_faces
from diffpriv_core.faces.crop import FaceCrop, paste_faces
from diffpriv_core.keys import load_key, save_key
from diffpriv_testmodels import cache
from diffpriv_testmodels.comfy_models import ARCFACE_ONNX, CHECKPOINT, CLIP_VISION, DEMO_CHECKPOINT, TEST_THRESHOLD
from conftest import keys_folder
from photos import as_image, insightface_photo
from test_host_faces import KEY_E_FILE, install_key_e
from test_host_recovery import random_key_e
from test_cli_demo import checked_recoveries, demo_template
from test_pictures import png_chunks
from key_helpers import checkpoint_fingerprint

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


def shipped_workflow(name: str, into: Path, key_e_file: str | None) -> Path:
    """A shipped workflow with the test models, 64 px crops and two candidates, and MSI (and
    its loss-curve preview) replaced by a key-E from a file (kept, with None)."""
    graph = graphs.load_workflow(graphs.default_workflow(name))
    for node_id, node in list(graph.items()):
        if node["class_type"] == "DiffPrivacyMSIInversion" and key_e_file is not None:
            graph[node_id] = {"class_type": "DiffPrivacyLoadKey", "inputs": {"key_name": key_e_file, "passphrase": ""}}
        elif node["class_type"] == "PreviewImage":
            del graph[node_id]
    graphs.set_models(graph, {str(Path(rel).parent): Path(rel).name for rel in (CHECKPOINT, CLIP_VISION)})
    graphs.set_face_recognizer(graph, ARCFACE_ONNX, TEST_THRESHOLD)
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


# --- people's files --------------------------------------------------------------------
SERIAL, OWNER, PLACE = "SN-4242-TEST-0042", "Jane Q. Example", "Rue de la Paix"
MIN_FACE = 16  # Face Detect's min_size here (faces down to 16 px)
FEATHER = 0.2  # the shipped workflows' Face Paste feather
DEMO_KEY_E_FILE = "people-demo-e.dpkey.safetensors"  # a key-E for the demo checkpoint


def people_photos(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Photos as people have them, each with the upright 8-bit RGB picture viewers show:
    a phone photo stored turned (EXIF orientation 6) carrying GPS, serial, owner, XMP names
    and a comment; a 16-bit grayscale scan; a crowd made from real photos (six faces of
    23-28 px, one of 110 px cut by the left edge)."""
    face = np.ascontiguousarray(skimage.data.astronaut()[10:210:2, 130:290:2])  # 80 x 100, one face
    exif = Image.Exif()
    exif[0x010F], exif[0x0112] = "ExampleCam", 6
    exif.get_ifd(0x8769).update({0xA431: SERIAL, 0xA430: OWNER})
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 52.0, 10.0), 3: "E", 4: (2.0, 19.0, 55.0)})
    xmp = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           f'<rdf:Description xmlns:mwg-rs="http://www.metadataworkinggroup.com/schemas/regions/">'
           f'<mwg-rs:Name>{OWNER}</mwg-rs:Name></rdf:Description></rdf:RDF></x:xmpmeta>').encode()
    phone = folder / "phone.jpg"
    Image.fromarray(face).transpose(Image.Transpose.ROTATE_90).save(  # stored turned; orientation 6 undoes it
        phone, exif=exif, xmp=xmp, comment=f"taken at {PLACE}".encode(), quality=95)
    assert Image.open(phone).size == (100, 80)
    scan_levels = np.rint(insightface_photo("Tom_Hanks_54745.png")[::2, ::2].mean(axis=-1) * 257).astype(np.uint16)
    scan = folder / "scan.png"
    Image.fromarray(scan_levels).save(scan)
    small = np.asarray(Image.fromarray(insightface_photo("t1.jpg")).resize((320, 221), Image.BOX))[:130, :160]
    crowd = np.ascontiguousarray(np.hstack([skimage.data.astronaut()[30:160, 190:290], small]))
    Image.fromarray(crowd).save(folder / "crowd.png")
    return {"phone": (phone, np.asarray(ImageOps.exif_transpose(Image.open(phone)).convert("RGB"))),
            "scan": (scan, np.repeat(np.rint(scan_levels * (255 / 65535)).astype(np.uint8)[..., None], 3, axis=-1)),
            "crowd": (folder / "crowd.png", crowd)}


def demo_workflow(comfy_host, into: Path) -> tuple[dict, Path]:
    """The shipped anonymize_faces workflow with the demo's models and settings (its gentle
    UNet recovers in 4 key-I steps), two candidates, faces down to MIN_FACE px, and MSI
    replaced by a key-E from a file."""
    graph = demo_template(comfy_host)
    key_e = comfy_host.keys / DEMO_KEY_E_FILE
    if not key_e.exists():
        save_key(key_e, random_key_e(13, checkpoint_fingerprint(str(cache.demo_models() / DEMO_CHECKPOINT))))
    for node_id, node in list(graph.items()):
        if node["class_type"] == "DiffPrivacyMSIInversion":
            graph[node_id] = {"class_type": "DiffPrivacyLoadKey", "inputs": {"key_name": DEMO_KEY_E_FILE,
                                                                             "passphrase": ""}}
        elif node["class_type"] == "PreviewImage":
            del graph[node_id]
    for node in graphs.nodes_of(graph, "DiffPrivacyFaceDetect"):
        node["inputs"]["min_size"] = MIN_FACE
    for node in graphs.nodes_of(graph, "DiffPrivacyGuidedDDIMSampler"):
        node["inputs"].update(preset="custom", samples=2)
    assert graphs.nodes_of(graph, "DiffPrivacyFacePaste")[0]["inputs"]["feather"] == FEATHER
    path = into / "people.json"
    path.write_text(json.dumps(graph))
    return graph, path


def test_peoples_photos_come_out_upright_protected_without_their_metadata_and_recover_whole(
        comfy_host, tmp_path, monkeypatch, capsys):
    photos = people_photos(tmp_path)
    template, workflow = demo_workflow(comfy_host, tmp_path)
    sent = []  # every picture the command uploads
    upload = ComfyClient.upload_to_job
    monkeypatch.setattr(ComfyClient, "upload_to_job", lambda self, job, kind, data, *a: (
        sent.append(data) if kind == "image" else None, upload(self, job, kind, data, *a))[1])
    out, url = tmp_path / "out", comfy_host.server.url
    rc = cli.main(["protect", *(str(p) for p, _ in photos.values()), "--task", "anonymize", "--out", str(out),
                   "--workflow", str(workflow), "--server", url, "--seed", "5"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    summary = latest_run(out)
    for name, (_, expected) in photos.items():
        entry = summary.results[name]
        assert entry["status"] == "ok" and f"{name}: ok, " in printed, entry
        assert entry["photo"]["size"] == [expected.shape[1], expected.shape[0]]
        found = detect_faces(as_image(expected), min_score=0.9, min_size=MIN_FACE)
        crops = [FaceCrop.from_json(load_key(out / key)[2]["face_crop"]) for key in sorted(entry["keys"])]
        assert len(crops) == len(found) == len(entry["faces"]), f"{name}: every face found has its key"
        _, masks = paste_faces(as_image(expected)[None], torch.zeros(len(crops), CROP, CROP, 3), crops)
        outside = masks[0].numpy() == 0
        for rel in entry["outputs"]:
            candidate = picture(out / rel)
            assert candidate.shape == expected.shape, f"{name}: upright, at the size viewers show"
            assert np.array_equal(candidate[outside], expected[outside]), f"{name}: untouched outside the faces"
            for crop in crops:
                x1, y1, x2, y2 = (round(v) for v in crop.face_box)
                box = (slice(max(0, y1), y2), slice(max(0, x1), x2))
                assert (candidate[box] != expected[box]).any(-1).mean() > 0.5, f"{name}: face {crop.face_index}"
    assert len(summary.results["crowd"]["keys"]) == 4 and min(c["box"][0] for c in summary.results["crowd"]["faces"]) \
        < 1, "three small faces and one cut by the frame"
    # Nothing of the files but their pixels went to the server or into --out.
    assert len(sent) == 3 and all(set(png_chunks(data)) == {b"IHDR", b"IDAT", b"IEND"} for data in sent)
    marks = [m.encode() for m in (SERIAL, OWNER, PLACE, "ExampleCam")]
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(m in data for m in marks), path
            if path.suffix == ".png":
                assert not {b"eXIf", b"iTXt", b"tEXt", b"zTXt", b"iCCP"} & set(png_chunks(data)), path

    # Each face's key recovers it into the protected photo, over every pixel its protection changed.
    checked = checked_recoveries(summary, template, url, capsys)
    assert sorted((c["photo"], c["face"]) for c in checked) == sorted(
        (name, face["face"]) for name in photos for face in summary.results[name]["faces"]), checked
    for found in checked:
        assert found["db"] > 40 and found["off"] == 0 and found["changed"] > 100, found
