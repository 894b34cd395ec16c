"""The evaluation toolkit on real photos with the real MTCNN, dlib detector and dlib
recogniser (all shipped in installed packages; nothing is downloaded)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffpriv_core.faces.detect import Face
from diffpriv_core.faces.recognizers import ARCFACE_THRESHOLD
from diffpriv_eval import metrics
from diffpriv_eval.baselines import gaussian_blur, mosaic
from diffpriv_eval.cli import main as eval_main
from diffpriv_eval.detectors import DlibDetector, MtcnnDetector
from diffpriv_eval.diversity import pairwise_distances, pca_2d
from diffpriv_eval.identity import FaceImage, identification_accuracy, protection_success_rate
from diffpriv_eval.images import group_by_stem, group_folder
from diffpriv_eval.verifiers import DlibRecognizer, distances, installed_recognizers, load_pack_recognizer
from diffpriv_eval.sample_photos import SamplePhotoMissingError, sample_photos
from diffpriv_eval.utility import compare_detections
from diffpriv_testmodels.face_models import ARCFACE_ONNX
from photos import variations


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """MTCNN runs many tiny convolutions: on a busy 2-core runner one thread takes
    0.2 s per photo where two threads take 3 s. Restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    try:
        return sample_photos()
    except SamplePhotoMissingError:
        pytest.skip("insightface (optional) is not installed: its sample photos are needed")


@pytest.fixture(scope="module")
def arcface_file(face_models) -> Path:
    """A seeded random-weight ArcFace ONNX file (recognises nobody; exercises the plumbing)."""
    return face_models / ARCFACE_ONNX


@pytest.fixture(scope="module")
def located(photos) -> dict[str, FaceImage]:
    detector = MtcnnDetector()
    return {name: FaceImage(image, detector.detect(image)[0]) for name, image in photos.items()}


def _identity_distances(located: dict[str, FaceImage], transform) -> np.ndarray:
    """dlib distance of every photo to its transformed self, read at the original's face."""
    recognizer = DlibRecognizer()
    items = list(located.values())
    originals = recognizer.embed([i.image for i in items], [i.face for i in items])
    changed = recognizer.embed([transform(i.image, i.face.box) for i in items], [i.face for i in items])
    return distances(originals, changed)


def test_dlib_distance_is_zero_to_itself_and_above_threshold_between_people(located):
    recognizer = DlibRecognizer()
    names = ["astronaut", "hanks", "t1_0", "t1_1"]
    items = [located[n] for n in names]
    embeddings = recognizer.embed([i.image for i in items], [i.face for i in items])
    again = recognizer.embed([i.image for i in items], [i.face for i in items])
    assert np.allclose(distances(embeddings, again), 0.0)
    assert np.linalg.norm(embeddings[0] - embeddings[1]) > recognizer.threshold  # astronaut vs Tom Hanks
    assert np.linalg.norm(embeddings[2] - embeddings[3]) > recognizer.threshold  # two people in t1.jpg


def test_pack_recognisers_align_on_the_landmarks_they_are_given(located, arcface_file):
    recognizer = load_pack_recognizer(arcface_file, "ArcFace", ARCFACE_THRESHOLD)
    assert recognizer.threshold == pytest.approx(0.8)  # the paper's ArcFace distance
    item = located["astronaut"]
    shifted = np.roll(item.image, shift=(5, 7), axis=(0, 1))  # 5 px down, 7 px right
    moved = Face(item.face.box, tuple((x + 7, y + 5) for x, y in item.face.landmarks), item.face.score)
    embedded = recognizer.embed([item.image, shifted, shifted], [item.face, moved, item.face])
    assert np.allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)
    assert np.linalg.norm(embedded[0] - embedded[1]) < 1e-4  # the alignment follows the face
    assert np.linalg.norm(embedded[0] - embedded[2]) > 1e-3  # stale landmarks read other pixels


def test_a_face_cut_by_the_photos_edge_reads_as_in_the_whole_photo(located, installed_models):
    """The astronaut's photo cut 10% into her face box from the top and at its left edge:
    MTCNN finds her landmarks where they are in the whole photo (facenet-pytorch alone puts
    them about 20 px off, and dlib and SFace then read another person), and every verifier
    reads her close to its reading of the whole photo."""
    whole = located["astronaut"]
    x1, y1, x2, y2 = whole.face.box
    left, top = int(x1), int(y1 + 0.1 * (y2 - y1))
    cut = np.ascontiguousarray(whole.image[top:, left:])
    (face, *_) = MtcnnDetector().detect(cut)
    assert face.box[1] < 0  # the box runs off the photo
    expected = whole.face.moved(-left, -top).landmarks
    assert np.abs(np.subtract(face.landmarks, expected)).max() < 4.0
    for recognizer in (DlibRecognizer(), *installed_recognizers(installed_models)):
        embedded = recognizer.embed([whole.image, cut], [whole.face, face])
        assert np.linalg.norm(embedded[0] - embedded[1]) < recognizer.threshold / 2, recognizer.name


@pytest.mark.parametrize("baseline, weak, strong", [(gaussian_blur, 0.5, 12.0), (mosaic, 2.0, 24.0)])
def test_strong_baselines_protect_more_than_weak_ones(located, baseline, weak, strong):
    threshold = DlibRecognizer.threshold
    weak_rate = protection_success_rate(_identity_distances(located, lambda im, box: baseline(im, weak, box)),
                                        threshold)
    strong_rate = protection_success_rate(_identity_distances(located, lambda im, box: baseline(im, strong, box)),
                                          threshold)
    assert strong_rate > weak_rate
    assert weak_rate <= 0.5 <= strong_rate


def test_baselines_change_only_the_face_box(photos):
    image = photos["astronaut"]
    box = (50.0, 40.0, 150.0, 160.0)
    for changed in (gaussian_blur(image, 6.0, box), mosaic(image, 12.0, box)):
        outside = np.ones(image.shape[:2], bool)
        outside[40:160, 50:150] = False
        assert np.array_equal(changed[outside], image[outside])
        assert not np.array_equal(changed[40:160, 50:150], image[40:160, 50:150])


@pytest.mark.parametrize("detector", [MtcnnDetector(), DlibDetector()], ids=lambda d: d.name)
def test_originals_are_all_detected_and_unmoved_against_themselves(photos, detector):
    found = [detector.detect(image) for image in photos.values()]
    assert all(found), "every original photo has a detectable face"
    result = compare_detections([f[0] for f in found], [detector.detect(image) for image in photos.values()])
    assert result.detection_rate == 1.0
    assert result.box_distance == 0.0 and result.landmark_distance == 0.0
    assert len(found[0][0].landmarks) == (5 if detector.name == "MTCNN" else 68)


def test_utility_sees_a_shifted_face_move_by_the_shift(photos):
    detector = DlibDetector()
    image = photos["astronaut"]
    shifted = np.roll(image, shift=(6, 8), axis=(0, 1))  # 6 px down, 8 px right
    result = compare_detections([detector.detect(image)[0]], [detector.detect(shifted)])
    assert result.detection_rate == 1.0
    assert result.landmark_distance == pytest.approx(10.0, abs=2.0)


def test_reidentification_needs_the_probes_own_person_closer_than_everyone_else(located):
    """Gallery: other views of each person; distractors: people outside the gallery. A probe
    counts only when its own gallery photo is closer than every other photo."""
    recognizer = DlibRecognizer()
    people = ["t1_0", "t1_1", "t1_2"]
    gallery = {p: [_mirrored(located[p])] for p in people}
    distractors = [located["t1_3"], located["hanks"]]
    probes = [(p, located[p]) for p in people]
    assert identification_accuracy(recognizer, probes, gallery, distractors) == 1.0
    # A probe whose face is another gallery person's is not identified: one of three wrong.
    swapped = [("t1_0", located["t1_1"]), ("t1_1", located["t1_1"]), ("t1_2", located["t1_2"])]
    assert identification_accuracy(recognizer, swapped, gallery, distractors) == pytest.approx(2 / 3)
    # A distractor that is the probe's own person beats the gallery's mirrored view.
    assert identification_accuracy(recognizer, probes[:1], gallery, [located["t1_0"]]) == 0.0
    with pytest.raises(ValueError, match="without gallery photos"):
        identification_accuracy(recognizer, [("astronaut", located["astronaut"])], gallery, distractors)


def test_an_avih_query_is_wrong_when_a_different_identity_photo_is_as_close_as_set_s(located):
    """AVIH's protocol with dlib: t1_0 has two photos (hers and its mirror image). Probing with
    one, Set_s is the other's protected version, Set_d everyone else. A "protected" version
    that shows t1_1, who is also in Set_d, is no closer than Set_d: wrong. A copy of the probe
    under another name, anywhere, is never part of its verification set."""
    from diffpriv_eval.identity import Member, avih_verdicts

    her, mirror, other = located["t1_0"], _mirrored(located["t1_0"]), located["t1_1"]
    blurred = FaceImage(gaussian_blur(her.image, 1.0), her.face)
    people = {"t1_0": [Member("a", her, [blurred]), Member("b", mirror, [other])],
              "t1_2": [Member("c", located["t1_2"], [])]}
    verdicts = avih_verdicts(DlibRecognizer(), people, [other, located["hanks"]])
    assert verdicts.reference == {"a": True, "b": True}  # c's person has no protected photo: no probe
    assert verdicts.protected == {"a": [False], "b": [True]}
    people["t1_2"].append(Member("copy of a", her, []))  # at distance 0 from a, were it in a's Set_d
    assert avih_verdicts(DlibRecognizer(), people, [other]).reference["a"] is True
    alone = avih_verdicts(DlibRecognizer(), {"t1_0": people["t1_0"]}, [])  # no Set_d: nothing can be closer
    assert alone.protected == {"a": [True], "b": [True]}


def _mirrored(item: FaceImage) -> FaceImage:
    """The photo flipped left-right, its face box and 5 landmarks flipped with it (left
    and right eye, and mouth corners, swap roles)."""
    width = item.image.shape[1]
    x1, y1, x2, y2 = item.face.box
    points = [(width - x, y) for x, y in item.face.landmarks]
    face = Face((width - x2, y1, width - x1, y2), tuple(points[i] for i in (1, 0, 2, 4, 3)), item.face.score)
    return FaceImage(np.ascontiguousarray(item.image[:, ::-1]), face)


def test_psnr_and_ssim_agree_with_scikit_image_and_torchmetrics(photos):
    from skimage.metrics import peak_signal_noise_ratio
    from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    a = photos["astronaut"]
    b = gaussian_blur(a, 2.0)
    a01, b01 = a / 255.0, b / 255.0
    assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a01, b01, data_range=1.0))
    ta, tb = (torch.from_numpy(x).permute(2, 0, 1)[None] for x in (a01, b01))
    assert metrics.psnr(a, b) == pytest.approx(tm_psnr(tb, ta, data_range=1.0).item(), rel=1e-6)
    assert metrics.mse(a, b) == pytest.approx(np.mean((a01 - b01) ** 2))
    # Same Gaussian-window SSIM; only the border handling differs between the two libraries.
    assert metrics.ssim(a, b) == pytest.approx(tm_ssim(tb, ta, data_range=1.0).item(), abs=0.01)
    assert metrics.ssim(a, a) == pytest.approx(1.0) and metrics.psnr(a, a) == float("inf")


def test_lpips_says_why_it_is_not_computed_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reason = metrics.lpips_unavailable_reason()
    assert reason is not None and str(tmp_path) in reason


def test_candidates_pair_with_originals_by_stem():
    files = [Path(n) for n in ("a.png", "a_00001.png", "a_00002.png", "a_1.png", "b_x.png", "c_00001.jpg",
                               "g_face0_00001.png", "g_face2.png", "h_face1_x.png")]
    groups = group_by_stem(files, {"a", "a_1", "c", "g", "h"})
    # the recoveries of per-face keys (<photo>_face<k>_00001) go with their photo
    assert groups == {"a": [Path("a.png"), Path("a_00001.png"), Path("a_00002.png")],
                      "a_1": [Path("a_1.png")], "c": [Path("c_00001.jpg")],
                      "g": [Path("g_face0_00001.png"), Path("g_face2.png")]}


def test_a_diffpriv_output_folder_pairs_by_its_summary(tmp_path):
    """`diffpriv protect` writes <photo>/<photo>_<label>_00001_.png and summary.json;
    `diffpriv recover` names its entries after the key, <photo>_00001."""
    pictures = {"a/a_anonymize_00001_.png", "a/a_anonymize_00002_.png", "b/b_anonymize_00001_.png",
                "k_00001/k_00001_recovered_00001_.png"}
    for rel in pictures:
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).touch()
    results = {"a": {"status": "ok", "outputs": ["a/a_anonymize_00001_.png", "a/a_anonymize_00002_.png"]},
               "b": {"status": "failed", "outputs": ["b/b_anonymize_00001_.png"]},  # stale file of a failed run
               "k_00001": {"status": "skipped", "outputs": ["k_00001/k_00001_recovered_00001_.png"]}}
    (tmp_path / "summary.json").write_text(json.dumps({"command": "protect", "results": results}))
    assert group_folder(tmp_path, {"a", "b", "k"}) == {
        "a": [tmp_path / "a/a_anonymize_00001_.png", tmp_path / "a/a_anonymize_00002_.png"],
        "k": [tmp_path / "k_00001/k_00001_recovered_00001_.png"]}


def test_diversity_counts_pairs_and_projects_on_the_main_axis():
    points = np.array([[0.0, 0, 0], [1, 0, 0], [3, 0, 0]])
    assert sorted(pairwise_distances(points)) == [1.0, 2.0, 3.0]
    projected = pca_2d(points)
    assert projected.shape == (3, 2)
    assert np.allclose(np.abs(projected[:, 0]), np.abs(points[:, 0] - points[:, 0].mean()))


def test_cli_writes_the_report_for_blurred_candidates_and_recoveries(photos, arcface_file, installed_models,
                                                                     tmp_path):
    """The astronaut recovered exactly, Tom Hanks blurred a little: Cos-IE 1 for her, below
    1 but still the same person for him, beside the pixel metrics (Table 2)."""
    originals, protected, recovered = (tmp_path / n for n in ("originals", "protected", "recovered"))
    for folder in (originals, protected, recovered):
        folder.mkdir()
    for name in ("astronaut", "hanks"):
        image = photos[name]
        Image.fromarray(image).save(originals / f"{name}.png")
        Image.fromarray(image if name == "astronaut" else gaussian_blur(image, 1.5)).save(recovered / f"{name}.png")
        for k, sigma in enumerate((3.0, 9.0), start=1):
            Image.fromarray(gaussian_blur(image, sigma)).save(protected / f"{name}_{k:05d}.png")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(originals / "wall.png")  # no face
    Image.fromarray(photos["t1_0"]).save(originals / "t1_0.png")  # neither protected nor recovered
    out = tmp_path / "report"
    assert eval_main(["--originals", str(originals), "--protected", str(protected),
                      "--recovered", str(recovered), "--out", str(out), "--arcface", str(arcface_file),
                      "--models", str(installed_models)]) == 0
    results = json.loads((out / "results.json").read_text())
    # t1_0 produced nothing (a failed protection): not counted as evaluated
    assert results["cases"] == ["astronaut", "hanks"] and sorted(results["skipped"]) == ["t1_0", "wall"]
    assert results["protection"]["dlib"]["candidates"] == 4
    assert list(results["protection"]["dlib"]["distances_to_original"]) == ["astronaut", "hanks"]
    assert results["recovery"]["images"] == 2
    assert results["protection"]["dlib"]["diversity"]["pairs"] == 2
    recovery = results["recovery"]
    exact, blurred = recovery["per_image"]["astronaut"], recovery["per_image"]["hanks"]
    assert exact["psnr"] == "inf" and exact["ssim"] == pytest.approx(1.0) and 20 < blurred["psnr"] < 60
    # three independent real recognisers, each at its own operating point; SFace guided (white-box)
    protection = results["protection"]
    assert [(n, r["role"]) for n, r in protection.items()] == [
        ("dlib", "transfer"), ("SFace", "white-box"), ("FaceNet-CASIA", "transfer"), ("ArcFace", "transfer")]
    thresholds = {n: round(r["threshold"], 3) for n, r in protection.items()}
    assert thresholds == {"dlib": 0.6, "SFace": 1.129, "FaceNet-CASIA": 1.1, "ArcFace": 0.8}
    for name, identity in recovery["identity"].items():
        assert exact[f"cos_ie_{name}"] == pytest.approx(1.0, abs=1e-6)  # the exact original back
        assert exact[f"identity_distance_{name}"] == pytest.approx(0.0, abs=1e-6)
        assert identity["threshold"] == protection[name]["threshold"]
        assert identity["cos_ie"] == pytest.approx((1.0 + blurred[f"cos_ie_{name}"]) / 2)
    for name in ("dlib", "SFace", "FaceNet-CASIA"):  # the real recognisers still know him
        assert 0.5 < blurred[f"cos_ie_{name}"] < 1.0 - 1e-4, name
        assert recovery["identity"][name]["same_person_rate"] == 1.0, name
    assert set(results["utility"]) == {"MTCNN", "dlib"}
    report = (out / "report.md").read_text()
    assert "Protection success" in report and "grids/astronaut.png" in report
    assert "SFace guided the protection (white-box)" in report and "recovered as the same person" in report
    assert "| Cos-IE FaceNet-CASIA |" in report and "| PSNR dB |" in report
    for png in ("grids/astronaut.png", "grids/hanks.png", "diversity_dlib.png"):
        with Image.open(out / png) as image:
            assert image.width > 100


def test_the_report_names_the_ablation_a_protect_run_recorded(photos, installed_models, tmp_path):
    """A `diffpriv protect --no-guidance --one-embedding` --out folder: its summary.json says
    so for each photo, and the evaluation labels its report and results with it."""
    from diffpriv_client.summary import Summary

    Image.fromarray(photos["hanks"]).save(tmp_path / "hanks.png")
    out = tmp_path / "out"
    (out / "hanks").mkdir(parents=True)
    Image.fromarray(gaussian_blur(photos["hanks"], 4.0)).save(out / "hanks" / "hanks_anonymize_00001_.png")
    summary = Summary(out, "protect")
    summary.record("hanks", tmp_path / "hanks.png", "ok", [out / "hanks" / "hanks_anonymize_00001_.png"],
                   ablations=["no-guidance", "one-embedding"])
    summary.write_json()  # as the command does at the end of its run
    report = tmp_path / "report"
    assert eval_main(["--originals", str(tmp_path / "hanks.png"), "--protected", str(out), "--out", str(report),
                      "--models", str(installed_models)]) == 0
    assert json.loads((report / "results.json").read_text())["ablations"] == {"hanks": ["no-guidance", "one-embedding"]}
    assert ("- **ablation** w/o energy guidance (Table 5) + one embedding, Ours-OE (Table 6): every photo"
            in (report / "report.md").read_text())


def test_cli_baseline_mode_makes_and_evaluates_its_own_protected_set(photos, installed_models, tmp_path):
    Image.fromarray(photos["hanks"]).save(tmp_path / "hanks.png")
    out = tmp_path / "report"
    assert eval_main(["--originals", str(tmp_path / "hanks.png"), "--baseline", "mosaic", "--strength", "24",
                      "--out", str(out), "--models", str(installed_models)]) == 0
    with Image.open(out / "protected" / "hanks.png") as image:
        assert not np.array_equal(np.asarray(image), photos["hanks"])
    results = json.loads((out / "results.json").read_text())
    assert {r["role"] for r in results["protection"].values()} == {"transfer"}  # a baseline is guided by none
    assert results["protection"]["dlib"]["success_rate"] == 1.0
    assert results["recovery"] == {"images": 0}
    assert "mosaic, strength 24 px" in (out / "report.md").read_text()


def test_cli_gallery_runs_avihs_protocol_and_reidentification(photos, installed_models, tmp_path, capsys):
    """AVIH's protocol from the command line, on an LFW-style gallery of real photos: several
    pictures per person (variations of one photo each: no package ships two photos of one
    person), real other people as distractors, and "protected" versions of the gallery's
    photos: the astronaut's lightly blurred (still her), t1_0's showing a distractor where
    her face was, and only one of t1_1's photos protected (so that photo is no probe: no
    other photo of t1_1 has a protected version). The originals are the gallery's photos."""
    gallery, protected = tmp_path / "gallery", tmp_path / "protected"

    def views(person):  # three pictures of each person
        return {v: p for v, p in variations(photos[person]).items() if v != "shifted"}

    for person in ("astronaut", "t1_0", "t1_1"):
        (gallery / person).mkdir(parents=True)
        for view, picture in views(person).items():
            Image.fromarray(picture).save(gallery / person / f"{person}_{view}.png")
    (gallery / "distractors").mkdir()
    for person in ("t1_2", "t1_3", "hanks"):
        Image.fromarray(photos[person]).save(gallery / "distractors" / f"{person}.png")
    protected.mkdir()
    for view, picture in views("astronaut").items():
        Image.fromarray(gaussian_blur(picture, 1.0)).save(protected / f"astronaut_{view}_00001.png")
    for view, picture in views("t1_0").items():
        Image.fromarray(np.asarray(Image.fromarray(photos["t1_3"]).resize(picture.shape[1::-1]))).save(
            protected / f"t1_0_{view}_00001.png")
    Image.fromarray(gaussian_blur(variations(photos["t1_1"])["mirrored"], 1.0)).save(
        protected / "t1_1_mirrored_00001.png")
    out = tmp_path / "report"
    assert eval_main(["--gallery", str(gallery), "--protected", str(protected), "--out", str(out),
                      "--models", str(installed_models)]) == 0
    table = json.loads((out / "results.json").read_text())["identification"]
    assert table["gallery"]["identities"] == {"astronaut": 3, "t1_0": 3, "t1_1": 3} and table["gallery"]["distractors"] == 3
    avih = table["avih"]
    assert avih["protected_photos"] == {"astronaut": 3, "t1_0": 3, "t1_1": 1}
    assert list(avih["not_probed"]) == ["t1_1_mirrored"]
    names = [f"_{v}" for v in ("brighter", "mirrored", "small")]
    for name in ("dlib", "SFace", "FaceNet-CASIA"):
        rows = avih["recognizers"][name]
        assert rows["originals"]["queries"] == 8 and rows["originals"]["accuracy"] == 1.0, name
        expected = {**{f"astronaut{v}": [True] for v in names}, **{f"t1_0{v}": [False] for v in names},
                    **{f"t1_1{v}": [True] for v in names if v != "_mirrored"}}
        assert rows["protected"]["right"] == expected, name
        assert rows["protected"]["accuracy"] == pytest.approx(5 / 8), name
        reidentified = table["reidentification"]["recognizers"][name]
        assert reidentified["originals"]["accuracy"] == 1.0, name  # every original re-identified
        assert reidentified["protected"]["identified"]["t1_0_mirrored"] == [False], name  # another person
        assert reidentified["protected"]["identified"]["astronaut_small"] == [True], name
    report = (out / "report.md").read_text()
    assert "Identification accuracy (Table 3, AVIH's protocol)" in report
    assert "| SFace | white-box | protected | 8 | 0.625 |" in report
    assert "Re-identification of protected photos (not AVIH's protocol)" in report
    (gallery / "loose.png").write_bytes((gallery / "t1_1" / "t1_1_small.png").read_bytes())
    assert eval_main(["--gallery", str(gallery), "--protected", str(protected), "--out", str(out),
                      "--models", str(installed_models)]) == 2
    assert "outside any identity folder (loose.png" in capsys.readouterr().err


def test_an_original_outside_the_gallery_is_the_person_named_like_it(photos, installed_models, tmp_path):
    """photos/astronaut.png is the gallery's astronaut: a probe of AVIH's protocol against her
    gallery photos' protected versions, and re-identified against her gallery photos."""
    gallery, originals, protected = tmp_path / "gallery", tmp_path / "photos", tmp_path / "protected"
    (gallery / "astronaut").mkdir(parents=True)
    for view, picture in list(variations(photos["astronaut"]).items())[:2]:
        Image.fromarray(picture).save(gallery / "astronaut" / f"astronaut_{view}.png")
    (gallery / "distractors").mkdir()
    Image.fromarray(photos["hanks"]).save(gallery / "distractors" / "hanks.png")
    originals.mkdir(), protected.mkdir()
    Image.fromarray(photos["astronaut"]).save(originals / "astronaut.png")
    Image.fromarray(gaussian_blur(photos["astronaut"], 1.0)).save(protected / "astronaut_00001.png")
    out = tmp_path / "report"
    assert eval_main(["--originals", str(originals), "--gallery", str(gallery), "--protected", str(protected),
                      "--out", str(out), "--models", str(installed_models)]) == 0
    table = json.loads((out / "results.json").read_text())["identification"]
    dlib = table["avih"]["recognizers"]["dlib"]
    # the two gallery views are probes against her protected photo; the photo itself has no other protected one
    assert dlib["protected"]["right"] == {"astronaut_mirrored": [True], "astronaut_small": [True]}
    assert table["avih"]["not_probed"] == {"astronaut": "no other photo of this person has a protected version"}
    assert table["reidentification"]["probes"] == {"astronaut": "astronaut"}
    assert table["reidentification"]["recognizers"]["dlib"]["protected"]["identified"] == {"astronaut": [True]}


def test_cli_guidance_baseline_crosses_the_guiding_recognisers_threshold(photos, installed_models, tmp_path):
    """Identity guidance without diffusion on a real photo: SFace (white-box) reads another
    person in an all but unchanged picture; the report gives each verifier's numbers."""
    Image.fromarray(photos["astronaut"]).save(tmp_path / "astronaut.png")
    out = tmp_path / "report"
    assert eval_main(["--originals", str(tmp_path / "astronaut.png"), "--baseline", "guidance",
                      "--out", str(out), "--models", str(installed_models)]) == 0
    with Image.open(out / "protected" / "astronaut.png") as image:
        change = np.abs(np.asarray(image).astype(float) - photos["astronaut"]).mean()
    assert 0 < change < 2.0  # in 8-bit levels
    protection = json.loads((out / "results.json").read_text())["protection"]
    assert [(n, r["role"]) for n, r in protection.items()] == [
        ("dlib", "transfer"), ("SFace", "white-box"), ("FaceNet-CASIA", "transfer")]
    assert protection["SFace"]["success_rate"] == 1.0
    assert protection["SFace"]["mean_distance_to_original"] > protection["SFace"]["threshold"]
    report = (out / "report.md").read_text()
    assert "identity guidance without diffusion by SFace" in report and "SFace guided the protection" in report
    assert eval_main(["--originals", str(tmp_path / "astronaut.png"), "--baseline", "guidance", "--guided-by",
                      "dlib", "--out", str(out), "--models", str(installed_models)]) == 2  # not differentiable


def test_cli_refuses_bad_arguments_with_a_message(photos, tmp_path, capsys):
    photo = tmp_path / "photos" / "hanks.png"
    photo.parent.mkdir()
    Image.fromarray(photos["hanks"]).save(photo)
    assert eval_main(["--originals", str(photo), "--baseline", "blur", "--out", str(tmp_path / "r"),
                      "--models", str(tmp_path / "models")]) == 2
    message = capsys.readouterr().err
    assert "face_recognition_sface_2021dec.onnx not found in" in message and "./scripts/setup" in message
    with pytest.raises(SystemExit) as both_missing:
        eval_main(["--originals", str(tmp_path), "--out", str(tmp_path / "r")])
    assert both_missing.value.code == 2
    assert eval_main(["--originals", str(tmp_path / "missing"), "--baseline", "blur", "--out", str(tmp_path)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert eval_main(["--originals", str(tmp_path), "--baseline", "blur", "--out", str(tmp_path / "r")]) == 2
    assert "no original images" in capsys.readouterr().err
    assert eval_main(["--originals", str(photo), "--protected", str(tmp_path), "--out", str(tmp_path / "r"),
                      "--facenet", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_importing_the_toolkit_does_not_load_dlib():
    code = ("import sys, diffpriv_eval.cli; "
            "assert not {'dlib', 'face_recognition_models'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def _save_keys(folder: Path, names, face_crop: str | None = None) -> list[Path]:
    """Key files of random keys (no checkpoint needed to pair or plan them), named as
    `diffpriv protect` names them."""
    from diffpriv_core.key_format import CROP_META
    from diffpriv_core.keys import save_key
    from key_helpers import key_i_for, random_key_e

    paths = []
    for seed, name in enumerate(names, start=1):
        key_e = random_key_e(seed, checkpoint="0123456789abcdef")
        path = folder / f"{name}.dpkey.safetensors"
        save_key(path, key_e, key_i_for(key_e, 3), extra={CROP_META: face_crop} if face_crop else None)
        paths.append(path)
    return paths


def test_the_wrong_key_experiment_pairs_each_key_with_its_photo_and_the_next_photos_keys(photos, tmp_path):
    from diffpriv_eval import wrong_keys
    from diffpriv_eval.images import load_cases

    originals = tmp_path / "photos"
    originals.mkdir()
    for name in ("astronaut", "hanks"):
        Image.fromarray(photos[name]).save(originals / f"{name}.png")
    keys = tmp_path / "out"
    (keys / "deep").mkdir(parents=True)
    files = _save_keys(keys, ["astronaut_00001", "hanks_00001"]) + _save_keys(keys / "deep", ["stranger_00001"])
    cases, skipped = wrong_keys.key_cases(wrong_keys.key_files([keys]), load_cases([originals], None, None))
    assert [c.case.stem for c in cases] == ["astronaut_00001", "hanks_00001"]
    assert skipped == {"stranger_00001.dpkey.safetensors": "no original named like it"}
    assert cases[0].others == (files[1], files[0]) and cases[1].others == (files[0], files[1])
    assert np.array_equal(cases[0].case.original, photos["astronaut"])  # a whole-image key: the whole photo
    # Two photos: "both wrong" would be the other photo's key-I with this photo's key-E, the wrong key-I.
    assert [v.name for v in cases[0].variants()] == ["right_pair", "wrong_key_i", "wrong_key_e", "uc_as_key_e"]
    template = json.loads((Path(__file__).parent / "workflows" / "recover.json").read_text())
    graph = wrong_keys.experiment_graph(template, ("own", "next", "own"), cases[0].variants(), "diffpriv-jobs/j")
    assert {n["inputs"]["key_name"]: n["inputs"]["passphrase"] for n in graph.values()
            if n["class_type"] == "DiffPrivacyLoadKey"} == {"own": "", "next": ""}  # opened keys: no passphrase
    loaded = {i: n["inputs"]["key_name"] for i, n in graph.items() if n["class_type"] == "DiffPrivacyLoadKey"}
    runs = {n["inputs"]["key_i"][0]: n for n in graph.values() if n["class_type"] == wrong_keys.EXPERIMENT_NODE}
    uses = sorted((loaded[n["inputs"]["key_i"][0]], loaded[n["inputs"]["key_e"][0]], n["inputs"]["unconditional"])
                  for n in graph.values() if n["class_type"] == wrong_keys.EXPERIMENT_NODE)
    assert uses == [("next", "own", False), ("own", "next", False), ("own", "own", False), ("own", "own", True)]
    assert runs and all(n["inputs"]["model"] == ["ckpt", 0] for n in runs.values())
    assert sorted(n["inputs"]["filename_prefix"] for n in graph.values() if n["class_type"] == "SaveImage") == [
        f"diffpriv-jobs/j/{v}" for v in ("right_pair", "uc_as_key_e", "wrong_key_e", "wrong_key_i")]
    assert not [n for n in graph.values() if n["class_type"] in ("DiffPrivacyRecover", "DiffPrivacySaveKey")]


def test_the_wrong_key_experiment_measures_a_face_key_on_its_crop_and_needs_two_photos(photos, tmp_path, capsys):
    from diffpriv_core.faces.crop import FaceCrop
    from diffpriv_eval import wrong_keys
    from diffpriv_eval.images import Case

    photo = photos["astronaut"]
    crop = FaceCrop(0, 0, photo.shape[:2], (40, 20, 128), 64, (60.0, 40.0, 150.0, 130.0))
    (key,) = _save_keys(tmp_path, ["astronaut_face0_00001"], crop.to_json())
    cropped = wrong_keys.original_for(key, photo)
    expected = np.asarray(Image.fromarray(photo[20:148, 40:168]).resize((64, 64), Image.Resampling.BILINEAR))
    assert cropped.shape == (64, 64, 3) and np.abs(cropped.astype(int) - expected).mean() < 3
    with pytest.raises(ValueError, match="needs the keys of at least 2 photos"):
        wrong_keys.key_cases([key], [Case("astronaut", photo)])
    others = _save_keys(tmp_path, ["hanks_00001", "t1_0_00001"])
    originals = [Case("astronaut", photo[:100]), Case("hanks", photos["hanks"]), Case("t1_0", photos["t1_0"])]
    cases, skipped = wrong_keys.key_cases([key, *others], originals)
    assert [c.case.stem for c in cases] == ["hanks_00001", "t1_0_00001"]
    assert skipped == {key.name: f"its face was cut from a {photo.shape[1]} x {photo.shape[0]} photo, the original "
                                 f"is {photo.shape[1]} x 100"}
    originals = tmp_path / "photos"
    originals.mkdir()
    Image.fromarray(photo).save(originals / "astronaut.png")
    assert eval_main(["--originals", str(originals), "--wrong-keys", str(key), "--out", str(tmp_path / "r")]) == 2
    assert "needs the keys of at least 2 photos" in capsys.readouterr().err
