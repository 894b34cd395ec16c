"""A crowd of small faces through the real server, as the shipped every-face workflows run
it, in one graph: Face Detect at its defaults finds every face down to 16 px; the faces
under Face Crop's msi_min_size get the light protection (MSI Inversion gives them key-E =
the unconditional embedding, without training), the large one MSI's; the guidance reads
each face where Face Detect found it, the face cut by the frame included; every face
changes, keeps its own key, which records its protection and landmarks, and recovers it.

The picture: tests/photos.py crowd_photo, 256 x 192 (faces of 16, 24 and 30 px and one of
96 px cut by the left edge, made from real photos); crops at 64 px, test-size models; a
recoverable key-I (bdia, the default: 50 steps, recovery retraces the inversion exactly).

Then the same crowd through `diffpriv protect` and the shipped anonymize_faces workflow (at
test size, MSI included, two candidates), with a minimum face size that leaves its 16 px face out: the
command's summary.json and contact sheet list every face with the protection it got and the
possible face with its box, and --strict fails the photo for it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor

from diffpriv_client import cli
from diffpriv_client.summary import THUMB_PX, UNPROTECTED_COLOUR

from diffpriv_core.faces.crop import MSI, MSI_MIN_SIZE, UNCONDITIONAL, FaceCrop, paste_faces
from diffpriv_core.faces.detect import DEFAULT_MIN_SCORE, DEFAULT_MIN_SIZE, MTCNN
from diffpriv_core.keys import load_key
from diffpriv_eval.crowd import match
from diffpriv_testmodels.face_models import ARCFACE_ONNX, TEST_THRESHOLD
from photos import as_image, crowd_photo
from test_cli_photos import shipped_workflow
from test_host_faces import recover_face_graph
from test_host_foundation import fetch_image
from test_host_recovery import add, base_graph

pytestmark = pytest.mark.host
CROP = 64
SMALL = (16, 24, 30)
KEY_I = {"steps": 50, "mode": "bdia", "refine_iterations": 1}


def crowd_graph(image: str) -> dict:
    """The shipped anonymize_faces graph at test size: one chain for every face."""
    g = base_graph()
    add(g, "clipv", "CLIPVisionLoader", clip_name="dp-test-vitl14.safetensors")
    add(g, "img", "LoadImage", image=image)
    add(g, "detect", "DiffPrivacyFaceDetect", image=["img", 0], select="all", index=0, min_size=DEFAULT_MIN_SIZE,
        min_score=DEFAULT_MIN_SCORE[MTCNN], on_no_face="error", detector="mtcnn")
    add(g, "crop", "DiffPrivacyFaceCrop", image=["img", 0], faces=["detect", 0], size=CROP, margin=0.5,
        msi_min_size=MSI_MIN_SIZE)
    add(g, "enc", "VAEEncode", pixels=["crop", 0], vae=["ckpt", 2])
    add(g, "msi", "DiffPrivacyMSIInversion", model=["ckpt", 0], clip=["ckpt", 1], vae=["ckpt", 2],
        clip_vision=["clipv", 0], image=["crop", 0], preset="fast", steps=1, lr=0.0, seed=0, one_embedding=False,
        crop_info=["crop", 1])
    add(g, "sched", "DiffPrivacyEmbeddingScheduler", key_e=["msi", 0], preset="anonymize", tau=-1.0)
    add(g, "fr", "DiffPrivacyFaceRecognizerLoader", model_name=ARCFACE_ONNX, threshold=TEST_THRESHOLD)
    add(g, "guide", "DiffPrivacyIdentityGuidance", face_model=["fr", 0], image=["crop", 0], mode="anonymize",
        lambda_scale=1.0, normalize_gradient=False, diversity=True, decode_region="whole image", face_index=0,
        min_score=0.9, on_no_face="error", gradient_checkpointing=False, crop_info=["crop", 1])
    add(g, "sample", "DiffPrivacyGuidedDDIMSampler", model=["ckpt", 0], vae=["ckpt", 2], positive=["sched", 0],
        latent=["enc", 0], preset="custom", s_ns=0.6, steps=5, samples=1, seed=3, guidance=["guide", 0])
    add(g, "dec", "VAEDecode", samples=["sample", 0], vae=["ckpt", 2])
    add(g, "paste", "DiffPrivacyFacePaste", image=["img", 0], faces=["dec", 0], crop_info=["crop", 1], feather=0.2)
    add(g, "save", "SaveImage", images=["paste", 0], filename_prefix="crowd/protected")
    add(g, "recon", "VAEDecode", samples=["enc", 0], vae=["ckpt", 2])
    add(g, "saverecon", "SaveImage", images=["recon", 0], filename_prefix="crowd/reconstruction")
    add(g, "inv", "DiffPrivacyDDIMInversionKey", model=["ckpt", 0], latent=["enc", 0], key_e=["msi", 0], **KEY_I)
    add(g, "keys", "DiffPrivacySaveKey", key_e=["msi", 0], key_i=["inv", 0], crop_info=["crop", 1],
        filename_prefix="crowd/key", folder="keys", passphrase="")
    return g


@pytest.fixture(scope="module")
def protected_crowd(comfy_host):
    made = crowd_photo(SMALL, seed=1, width=256, height=192, large=96)
    name = comfy_host.upload(made.picture, "crowd.png")
    result = comfy_host.client.run(crowd_graph(name), timeout=1500)
    keys = [load_key(comfy_host.saved_file(r)) for r in result.files("keys", "diffprivacy_keys")]
    return made, result, keys


def test_every_face_of_the_crowd_is_found_and_reported(protected_crowd):
    made, result, keys = protected_crowd
    (report,) = result.outputs["detect"]["diffprivacy_faces"]
    assert report["detector"] == "mtcnn" and report["min_size"] == DEFAULT_MIN_SIZE and "possible" in report
    faces = report["faces"]
    recalled, true = match([f["box"] for f in faces], [f["score"] for f in faces], made.faces)
    assert all(recalled) and all(true), (recalled, true)
    assert [f["face"] for f in faces] == list(range(len(made.faces))) == list(range(len(keys)))
    assert sum(f["size"] < 40 for f in faces) == len(SMALL), "several faces under 40 px"


def test_small_faces_get_the_light_protection_without_msi_and_the_large_one_msi(protected_crowd):
    _made, result, keys = protected_crowd
    crops = [FaceCrop.from_json(meta["face_crop"]) for _, _, meta in keys]
    (report,) = result.outputs["detect"]["diffprivacy_faces"]
    sizes = [f["size"] for f in report["faces"]]
    assert [c.protection for c in crops] == [MSI if s >= MSI_MIN_SIZE else UNCONDITIONAL for s in sizes]
    assert crops[0].protection == MSI
    for (key_e, _key_i, _meta), crop in zip(keys, crops):
        unconditional = torch.equal(key_e.stages, key_e.uc.expand_as(key_e.stages))
        assert unconditional == (crop.protection == UNCONDITIONAL)
    passes = {entry["image"]: entry["passes"] for entry in result.outputs["msi"]["passes"]}
    for k, crop in enumerate(crops):  # the light faces cost one text-encoder pass, no UNet pass
        assert ("unet_forward" in passes[k]) == (crop.protection == MSI), passes[k]


def test_every_face_changes_and_nothing_outside_the_faces(comfy_host, protected_crowd):
    made, result, keys = protected_crowd
    (protected,) = [fetch_image(comfy_host, r) for r in result.files("save")]
    crops = [FaceCrop.from_json(meta["face_crop"]) for _, _, meta in keys]
    assert protected.shape == made.picture.shape
    _, union = paste_faces(as_image(made.picture)[None], torch.zeros(len(crops), CROP, CROP, 3), crops)
    outside = union[0].numpy() == 0
    assert np.array_equal(protected[outside], made.picture[outside]), "pixels outside the face masks are untouched"
    for crop in crops:
        _, mask = paste_faces(as_image(made.picture)[None], torch.zeros(1, CROP, CROP, 3), [crop])
        inside = mask[0].numpy() >= 0.5
        change = np.abs(protected.astype(int) - made.picture)[inside].mean()
        assert change > 3, f"face {crop.face_index} ({crop.protection}) changed by {change:.2f}/255 only"


def test_the_face_cut_by_the_frame_is_guided_with_the_detectors_landmarks(protected_crowd):
    _made, result, keys = protected_crowd
    (report,) = result.outputs["detect"]["diffprivacy_faces"]
    edge = FaceCrop.from_json(keys[0][2]["face_crop"])
    assert edge.box[0] < 0 and report["faces"][0]["box"][0] < 0, "the large face runs off the left edge"
    assert len(edge.landmarks) == 5 and [round(v, 1) for v in edge.face_box] == report["faces"][0]["box"]
    guided = result.outputs["guide"]["passes"]
    assert [entry["passes"] for entry in guided] == [{"recogniser_forward": 1}] * len(keys), \
        "each face's reference read once, where Face Detect found it"


def test_a_small_face_comes_back_from_its_own_key(comfy_host, protected_crowd):
    made, result, keys = protected_crowd
    (protected,) = [fetch_image(comfy_host, r) for r in result.files("save")]
    reconstructions = [fetch_image(comfy_host, r) for r in result.files("saverecon")]
    crops = [FaceCrop.from_json(meta["face_crop"]) for _, _, meta in keys]
    k = max(k for k, c in enumerate(crops) if c.protection == UNCONDITIONAL)  # the smallest light face
    name = comfy_host.upload(protected, "crowd-protected.png")
    key_name = result.files("keys", "diffprivacy_keys")[k]
    key_name = f"{key_name['subfolder']}/{key_name['filename']}"
    recovered = fetch_image(comfy_host, comfy_host.client.run(recover_face_graph(name, key_name)).files("save")[0])
    expected, mask = paste_faces(as_image(protected)[None], as_image(reconstructions[k])[None], [crops[k]])
    inside = mask[0].numpy() > 0
    assert np.array_equal(recovered[~inside], protected[~inside]), "the other faces stay protected"
    error = np.abs(as_image(recovered).numpy() - expected[0].numpy())[inside].mean()
    change = np.abs(as_image(protected).numpy() - expected[0].numpy())[inside].mean()
    assert error < 0.02 and error < change / 5, (error, change)


# --- through the command ------------------------------------------------------------------
LEFT_OUT = 20  # --min-face-size: the crowd's 16 px face (MTCNN's box of it is smaller) becomes a possible face


@pytest.fixture(scope="module")
def crowd_file(tmp_path_factory):
    made = crowd_photo(SMALL, seed=1, width=256, height=192, large=96)
    folder = tmp_path_factory.mktemp("crowd")
    Image.fromarray(made.picture).save(folder / "crowd.png")
    return made, folder / "crowd.png", shipped_workflow("anonymize_faces", folder, None)  # MSI as shipped


def protect_crowd(comfy_host, crowd_file, out: Path, *extra: str) -> int:
    _made, path, workflow = crowd_file
    return cli.main(["protect", str(path), "--task", "anonymize", "--out", str(out), "--workflow", str(workflow),
                     "--server", comfy_host.server.url, "--steps", "2", "--seed", "5",
                     "--min-face-size", str(LEFT_OUT), *extra])


def test_the_commands_summary_lists_every_face_with_its_protection_and_the_possible_faces(
        comfy_host, crowd_file, tmp_path, capsys):
    made, _path, _workflow = crowd_file
    out = tmp_path / "out"
    assert protect_crowd(comfy_host, crowd_file, out) == 0
    printed = capsys.readouterr().out
    entry = json.loads((out / "summary.json").read_text())["results"]["crowd"]
    assert entry["status"] == "ok", entry
    detection = entry["detection"]
    assert detection["detector"] == "mtcnn" and detection["min_size"] == LEFT_OUT
    faces = {face["face"]: face for face in entry["faces"]}
    assert sorted(faces) == [f["face"] for f in detection["faces"]] == list(range(len(made.faces) - 1)), \
        "every face Face Detect passed on has its key"
    assert all(faces[k]["key"] in entry["keys"] for k in faces)
    for found in detection["faces"]:
        expected = "msi" if found["size"] >= MSI_MIN_SIZE else "unconditional"
        assert faces[found["face"]]["protection"] == expected, (found, faces[found["face"]])
    assert {f["protection"] for f in faces.values()} == {"msi", "unconditional"}
    sixteen = [min(made.faces, key=lambda face: face.size)]
    recalled, _ = match([p["box"] for p in detection["possible"]], [p["score"] for p in detection["possible"]],
                        sixteen)
    assert all(recalled), ("the 16 px face is listed as a possible face with its box", detection["possible"])
    line = next(line for line in printed.splitlines() if line.startswith("crowd: ok, "))
    assert f"{len(faces)} faces found" in line and " msi" in line and " unconditional" in line, line
    assert "possible face NOT protected: box " in line, line
    # The contact sheet marks the possible face, in its own colour, on the photo as sent.
    (page,) = out.glob("contact_sheet_*.png")
    sheet = np.asarray(Image.open(page).convert("RGB")).astype(int)
    scale = THUMB_PX / made.picture.shape[0]
    for possible in detection["possible"]:
        x1, y1, x2, y2 = (round(v * scale) for v in possible["box"])
        edge = sheet[max(0, y1):y2 + 1, max(0, x1 - 1):x1 + 2]
        assert (np.abs(edge - ImageColor.getrgb(UNPROTECTED_COLOUR)) < 40).all(-1).any(), possible


def test_strict_fails_the_crowd_for_its_possible_face_and_writes_nothing(comfy_host, crowd_file, tmp_path, capsys):
    out = tmp_path / "strict"
    assert protect_crowd(comfy_host, crowd_file, out, "--strict") == 1
    printed = capsys.readouterr().out
    entry = json.loads((out / "summary.json").read_text())["results"]["crowd"]
    assert entry["status"] == "failed" and "not protected (--strict): box " in entry["error"], entry
    assert "crowd: failed: " in printed and "possible face" in printed
    assert entry["detection"]["possible"] and entry["outputs"] == entry["keys"] == []
    assert {face["protection"] for face in entry["faces"]} == {"msi", "unconditional"}, \
        "the summary still says what each face would have got"
    assert not (out / "crowd").exists() or not any((out / "crowd").iterdir()), "no picture and no key written"
