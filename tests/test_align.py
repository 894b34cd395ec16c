"""Alignment to the recogniser template, checked on real photos with MTCNN."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpriv_core.faces import align
from diffpriv_core.faces.detect import detect_faces
from photos import as_image, insightface_photo


@pytest.fixture(scope="module")
def photos_with_faces(astronaut):
    """(image, faces) for the astronaut and insightface's six-person group photo."""
    out = []
    for photo in (astronaut, insightface_photo("t1.jpg")):
        image = as_image(photo)
        out.append((image, detect_faces(image, min_size=40)))  # as the canvas below is searched
    assert [len(faces) for _, faces in out] == [1, 6]
    return out


def landmarks_in_aligned_crop(image: torch.Tensor, matrix: torch.Tensor, size: int) -> np.ndarray:
    """MTCNN landmarks of the aligned crop. The crop is drawn in the middle of a canvas twice
    its size, because MTCNN needs context around a face to find it reliably."""
    pad = size / 2
    with_margin = matrix.clone()
    with_margin[:, 2] += pad
    canvas = align.warp_faces(image[None], with_margin, 2 * size)
    # Photo and canvas searched alike, from 20 px windows: MTCNN's landmarks of one face move
    # by up to 10 px of 100 between pyramids that start at different windows (its noise, not
    # the warp's, which is what this test measures).
    (face,) = detect_faces(canvas[0].permute(1, 2, 0), min_score=0.5, min_size=40)
    return np.asarray(face.landmarks) - pad


def apply_matrix(matrix: torch.Tensor, points) -> torch.Tensor:
    """Points [N, 2] mapped by a [2, 3] matrix."""
    pts = torch.as_tensor(np.asarray(points, dtype=np.float32))
    return pts @ matrix[:, :2].T + matrix[:, 2]


def mean_distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b), axis=1).mean())


@pytest.mark.parametrize("size", [112, 160])
def test_landmarks_of_the_aligned_crop_land_on_the_template(photos_with_faces, size):
    scale = size / align.ARCFACE_SIZE
    to_mapped, to_template = [], []
    for image, faces in photos_with_faces:
        for face in faces:
            matrix = align.alignment_matrix(face.landmarks, size)
            found = landmarks_in_aligned_crop(image, matrix, size)
            to_mapped.append(mean_distance(found, apply_matrix(matrix, face.landmarks)))
            to_template.append(mean_distance(found, align.arcface_template(size)))
    # The warp applies exactly the estimated transform (up to MTCNN's landmark noise) ...
    assert max(to_mapped) < 6 * scale and np.mean(to_mapped) < 3 * scale
    # ... which puts every face on the template (a similarity cannot fit 5 points exactly).
    assert max(to_template) < 7 * scale


def test_an_aligned_crop_stays_aligned():
    """insightface's Tom Hanks crop is already ArcFace-aligned: its transform is near identity."""
    image = as_image(insightface_photo("Tom_Hanks_54745.png"))
    (face,) = detect_faces(image, min_score=0.5)
    matrix = align.alignment_matrix(face.landmarks, 112)
    scale = float(torch.linalg.det(matrix[:, :2]).sqrt())
    rotation = float(torch.atan2(matrix[1, 0], matrix[0, 0]).rad2deg())
    corners = apply_matrix(matrix, [[0, 0], [111, 111]]).numpy()
    assert 0.9 < scale < 1.1 and abs(rotation) < 5
    # within MTCNN's landmark noise on a tight crop
    assert np.abs(corners - [[0, 0], [111, 111]]).max() < 10


def test_warp_matches_opencv(photos_with_faces):
    import cv2

    image, (face,) = photos_with_faces[0]
    matrix = align.alignment_matrix(face.landmarks, 112)
    ours = align.warp_faces(image[None], matrix, 112)[0].permute(1, 2, 0).numpy()
    theirs = cv2.warpAffine(image.numpy(), matrix.numpy(), (112, 112), flags=cv2.INTER_LINEAR, borderValue=0.0)
    assert np.abs(ours - theirs).mean() < 2e-3


def test_channel_first_and_channel_last_images_give_the_same_crop(photos_with_faces):
    image, (face,) = photos_with_faces[0]
    matrix = align.alignment_matrix(face.landmarks, 112)
    last = align.warp_faces(image[None], matrix, 112)
    first = align.warp_faces(image[None].permute(0, 3, 1, 2), matrix, 112)
    assert torch.equal(last, first) and last.shape == (1, 3, 112, 112)


def test_gradient_reaches_the_input_only_inside_the_face_region(photos_with_faces):
    image, (face,) = photos_with_faces[0]
    source = image[None].clone().requires_grad_(True)
    matrix = align.alignment_matrix(face.landmarks, 112)
    align.warp_faces(source, matrix, 112).sum().backward()
    touched = source.grad[0].abs().sum(-1) > 0
    ys, xs = torch.nonzero(touched, as_tuple=True)
    # The crop's corners mapped back into the photo bound the pixels that receive gradient.
    inverse = torch.linalg.inv(torch.cat([matrix, torch.tensor([[0.0, 0.0, 1.0]])]))[:2]
    corners = apply_matrix(inverse, [[0, 0], [111, 0], [0, 111], [111, 111]])
    lo, hi = corners.min(0).values - 1, corners.max(0).values + 1
    assert xs.min() >= lo[0] and xs.max() <= hi[0] and ys.min() >= lo[1] and ys.max() <= hi[1]
    x1, y1, x2, y2 = face.box
    assert touched[int((y1 + y2) / 2), int((x1 + x2) / 2)]
    assert 0.02 < touched.float().mean() < 0.2


def test_shift_source_aligns_a_sub_image_like_the_whole(photos_with_faces):
    image, (face,) = photos_with_faces[0]
    matrix = align.alignment_matrix(face.landmarks, 112)
    whole = align.warp_faces(image[None], matrix, 112)
    part = align.warp_faces(image[None, 20:300, 100:400], align.shift_source(matrix, 100, 20), 112)
    assert torch.allclose(whole, part, atol=1e-5)


def test_fallback_template_is_insightfaces():
    pytest.importorskip("insightface")
    from insightface.utils.face_align import arcface_dst

    assert np.array_equal(align._ARCFACE_DST_112, arcface_dst)
