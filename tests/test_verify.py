"""Fail closed (no server): what a protect prompt brought back is checked before anything is
written. The pictures are a real photo with its faces changed or not, as a server could
send them; the keys are real key files recording their face."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageColor

from diffpriv_client.comfy_http import PromptResult
from diffpriv_client.verify import NotProtected, check_protected, describe
from diffpriv_core.faces.crop import FaceCrop
from diffpriv_core.key_format import CROP_META
from diffpriv_core.keys import save_key
from key_helpers import random_key_e
from photos import insightface_photo

GRAPH = {"load": {"class_type": "LoadImage", "inputs": {}},
         "paste": {"class_type": "DiffPrivacyFacePaste", "inputs": {}},
         "save": {"class_type": "SaveImage", "inputs": {"images": ["paste", 0]}},
         "save_mask": {"class_type": "SaveImage", "inputs": {"images": ["mask", 0]}}}
# Two faces of the photo below (x1, y1, x2, y2) and the squares cut around them (x, y, side).
FACES = [((40.0, 30.0, 80.0, 80.0), (20, 15, 80)), ((130.0, 40.0, 160.0, 78.0), (115, 29, 60))]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    pixels = np.ascontiguousarray(insightface_photo("t1.jpg")[::4, ::4][:160, :200])
    path = tmp_path_factory.mktemp("photo") / "group.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("keys")
    files = []
    for k, (box, square) in enumerate(FACES):
        crop = FaceCrop(0, k, (160, 200), square, 64, box)
        files.append(save_key(folder / f"face{k}.dpkey.safetensors", random_key_e(k + 1),
                              extra={CROP_META: crop.to_json()}).read_bytes())
    return files


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def protected(pixels: np.ndarray, faces=(0, 1)) -> np.ndarray:
    out = pixels.copy()
    for k in faces:
        x1, y1, x2, y2 = map(int, FACES[k][0])
        out[y1:y2, x1:x2] = 255 - out[y1:y2, x1:x2]
    return out


def report(faces=(0, 1), possible=()) -> PromptResult:
    entry = {"image": 0, "detector": "mtcnn", "min_size": 16, "min_score": 0.9,
             "faces": [{"face": k, "box": list(FACES[k][0]), "score": 0.99, "size": 50} for k in faces],
             "possible": [{"box": list(box), "score": 0.7} for box in possible]}
    return PromptResult("p", {"detect": {"diffprivacy_faces": [entry]}})


def check(photo, result, pictures, keys, strict=False, graph=GRAPH, whole_image=False):
    return check_protected(photo[0], strict, graph, result, pictures, keys, whole_image=whole_image)


def test_every_face_changed_and_keyed_is_ok_and_reported(photo, keys):
    pictures = [("save", png(protected(photo[1]))), ("save_mask", png(np.zeros((160, 200, 3), np.uint8))),
                ("save", png(photo[1][:64, :64]))]  # a crop of another size: no protected photo
    got = check(photo, report(), pictures, keys)
    assert got["photo"] == {"size": [200, 160], "notes": []}
    assert [f["face"] for f in got["detection"]["faces"]] == [0, 1] and got["detection"]["possible"] == []
    line = describe("group", {"status": "ok", "faces": [{"face": 0, "protection": "msi"}, {"face": 1}],
                              "detection": got["detection"]})
    assert line == "group: ok, 2 faces found (#0 50 px score 0.99 msi, #1 50 px score 0.99)"


@pytest.mark.parametrize("case, message", [
    ("a face without its key", "face 1 (50 px at [130.0, 40.0, 160.0, 78.0]) was found but no key came back"),
    ("a face left as it was", "face 1 came back unchanged in picture 1: 0% of its pixels changed"),
    ("a change outside every keyed face", "picture 1 changed 100 pixels outside every face with a key"),
    ("a possible face with --strict", "1 possible face not protected (--strict): box [1.0, 2.0, 11.0, 14.0]"),
    ("a report that is not Face Detect's numbers", "Face Detect's report cannot be read"),
])
def test_the_photo_fails_with_what_was_not_protected(photo, keys, case, message):
    pixels, result, got_keys, strict = protected(photo[1]), report(), keys, False
    if case == "a face without its key":
        got_keys = keys[:1]
    elif case == "a face left as it was":
        pixels = protected(photo[1], faces=(0,))
    elif case == "a change outside every keyed face":
        pixels[150:160, 0:10] = 255 - pixels[150:160, 0:10]
    elif case == "a possible face with --strict":
        result, strict = report(possible=[(1, 2, 11, 14)]), True
    else:
        result.outputs["detect"]["diffprivacy_faces"][0]["faces"][0]["score"] = float("nan")
    with pytest.raises(NotProtected, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")) as failed:
        check(photo, result, [("save", png(pixels))], got_keys, strict)
    if case != "a report that is not Face Detect's numbers":
        assert failed.value.report["photo"]["size"] == [200, 160], "the summary still says what was found"


def test_possible_faces_are_listed_and_fail_only_with_strict(photo, keys):
    got = check(photo, report(possible=[(1, 2, 11, 14)]), [("save", png(protected(photo[1])))], keys)
    assert got["detection"]["possible"] == [{"box": [1.0, 2.0, 11.0, 14.0], "score": 0.7}]
    line = describe("group", {"status": "ok", "faces": [{"face": 0}, {"face": 1}], "detection": got["detection"]})
    assert line.endswith("; 1 possible face NOT protected: box [1.0, 2.0, 11.0, 14.0] score 0.70")


def test_hostile_reports_are_bounded(photo, keys):
    huge = report()
    huge.outputs["detect"]["diffprivacy_faces"][0]["possible"] = [{"box": [0, 0, 1, 1], "score": 0.5}] * 20_000
    with pytest.raises(NotProtected, match="at most 10000 entries"):
        check(photo, huge, [], keys)
    for bad in ({"face": True}, {"box": [0, 0, 1]}, {"score": 2.0}, {"size": 1e30}):
        result = report()
        result.outputs["detect"]["diffprivacy_faces"][0]["faces"][0].update(bad)
        with pytest.raises(NotProtected, match="cannot be read"):
            check(photo, result, [], keys)


def test_a_whole_image_key_needs_its_picture_changed(photo, tmp_path):
    key = save_key(tmp_path / "whole.dpkey.safetensors", random_key_e(3)).read_bytes()
    result = PromptResult("p", {})
    assert check(photo, result, [("save", png(255 - photo[1]))], [key], whole_image=True)["detection"] is None
    with pytest.raises(NotProtected, match="the picture came back unchanged in picture 1"):
        check(photo, result, [("save", png(photo[1]))], [key], whole_image=True)
    # A workflow whose MSI trains on the uploaded photo is a whole-image one without --whole-image.
    msi_on_photo = dict(GRAPH, msi={"class_type": "DiffPrivacyMSIInversion", "inputs": {"image": ["load", 0]}})
    assert check(photo, result, [("save", png(255 - photo[1]))], [key], graph=msi_on_photo)["detection"] is None


def test_a_whole_image_key_holds_every_face_found_and_each_must_change(photo, tmp_path):
    key = save_key(tmp_path / "whole.dpkey.safetensors", random_key_e(3)).read_bytes()
    everything_but_face_1 = 255 - photo[1]
    x1, y1, x2, y2 = map(int, FACES[1][0])
    everything_but_face_1[y1:y2, x1:x2] = photo[1][y1:y2, x1:x2]
    assert check(photo, report(), [("save", png(255 - photo[1]))], [key])["detection"]["faces"]
    with pytest.raises(NotProtected, match="face 1 came back unchanged in picture 1"):
        check(photo, report(), [("save", png(everything_but_face_1))], [key])


@pytest.mark.parametrize("graph, message", [
    (GRAPH, "the workflow has no Face Detect, so nothing says every face of the photo was found and protected"),
    (dict(GRAPH, detect={"class_type": "DiffPrivacyFaceDetect", "inputs": {}}),
     "the workflow's Face Detect sent no report of the faces it found"),
])
def test_without_face_detects_report_an_every_face_photo_fails(photo, keys, tmp_path, graph, message):
    """Fail closed: keys and changed faces came back, but nothing says they are all the faces."""
    whole = save_key(tmp_path / "whole.dpkey.safetensors", random_key_e(3)).read_bytes()
    for got_keys, picture, faces in ((keys, protected(photo[1]), [0, 1]), ([whole], 255 - photo[1], [])):
        with pytest.raises(NotProtected, match=message) as failed:
            check(photo, PromptResult("p", {}), [("save", png(picture))], got_keys, graph=graph)
        assert failed.value.report["detection"] is None
        assert [f["face"] for f in failed.value.report["faces"]] == faces, "the keys' faces, for the summary"


def test_the_contact_sheet_marks_protected_and_possible_faces_on_the_upright_photo(photo, tmp_path):
    from diffpriv_client.summary import PROTECTED_COLOUR, THUMB_PX, UNPROTECTED_COLOUR, Summary, write_contact_sheet

    # The photo stored turned (EXIF orientation 6): boxes are in the upright picture's pixels.
    stored = Image.fromarray(photo[1]).transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    source = tmp_path / "turned.jpg"
    stored.save(source, exif=exif, quality=95)
    summary = Summary(tmp_path / "out", "protect")
    summary.record("turned", source, "ok",
                   faces=[{"face": 0, "box": list(FACES[0][0]), "protection": "msi"}],
                   detection={"faces": [{"face": 0, "box": list(FACES[0][0]), "score": 0.99, "size": 50},
                                        {"face": 1, "box": list(FACES[1][0]), "score": 0.98, "size": 38}],
                              "possible": [{"box": [170.0, 100.0, 190.0, 124.0], "score": 0.7}]})
    [page] = write_contact_sheet(summary)
    sheet = np.asarray(Image.open(page).convert("RGB"))
    assert sheet.shape[:2] == (THUMB_PX, round(200 * THUMB_PX / 160)), "the upright photo, THUMB_PX high"
    scale = THUMB_PX / 160

    def colour_on_edge(box, colour) -> bool:
        x1, y1, x2, y2 = (round(v * scale) for v in box)
        edge = sheet[(y1 + y2) // 2, x1:x1 + 2]  # the box's left edge, halfway down
        return bool((np.abs(edge.astype(int) - ImageColor.getrgb(colour)) < 40).all(axis=-1).any())

    assert colour_on_edge(FACES[0][0], PROTECTED_COLOUR), "the protected face"
    assert colour_on_edge(FACES[1][0], UNPROTECTED_COLOUR), "a face found without a key"
    assert colour_on_edge((170.0, 100.0, 190.0, 124.0), UNPROTECTED_COLOUR), "the possible face"
