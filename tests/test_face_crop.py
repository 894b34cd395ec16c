"""Face Crop / Face Paste geometry on a real group photo with the real MTCNN detector."""
from __future__ import annotations

import pytest
import torch

from diffpriv_core.faces.crop import FaceCrop, crop_faces, face_mask, paste_faces, plan_crops
from diffpriv_core.faces.detect import detect_faces
from diffpriv_core.faces.mask import protected_pixels
from photos import as_image, insightface_photo

SIZE = 128


@pytest.fixture(scope="module")
def group():
    """insightface's t1.jpg (six people) as a ComfyUI IMAGE batch, and its faces."""
    photo = as_image(insightface_photo("t1.jpg"))[None]
    return photo, [detect_faces(photo[0])]


def test_every_face_gets_a_square_crop_centred_on_it(group):
    photo, faces = group
    crops = plan_crops(faces, photo.shape[1], photo.shape[2], SIZE, margin=0.5)
    assert len(crops) == len(faces[0]) == 6
    assert [c.face_index for c in crops] == list(range(6)) and {c.image_index for c in crops} == {0}
    images = crop_faces(photo, crops)
    assert images.shape == (6, SIZE, SIZE, 3)
    for image, crop in zip(images, crops):
        found = detect_faces(image)
        assert found, f"no face in crop {crop.face_index}"
        x1, y1, x2, y2 = found[0].box  # the largest face in the crop is the one it was cut around
        assert abs((x1 + x2) / 2 - SIZE / 2) < SIZE * 0.08 and abs((y1 + y2) / 2 - SIZE / 2) < SIZE * 0.08
        assert 0.35 < (x2 - x1) / SIZE < 0.65, "the face fills about half the crop (margin 0.5)"


def test_pasting_changes_only_the_masks_and_restores_what_was_cut(group):
    photo, faces = group
    crops = plan_crops(faces, photo.shape[1], photo.shape[2], SIZE, margin=0.5)
    noise = torch.rand(len(crops) * 2, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    pasted, masks = paste_faces(photo, noise, crops)
    assert pasted.shape == (2, *photo.shape[1:]) and masks.shape == pasted.shape[:3]
    for candidate, mask in zip(pasted, masks):
        assert torch.equal(candidate[mask == 0], photo[0][mask == 0]), "bit-identical outside the mask"
    assert not torch.equal(pasted[0], pasted[1]), "one photo per candidate"
    for c in crops:  # every face's centre is fully replaced
        x1, y1, x2, y2 = c.face_box
        assert masks[0, int((y1 + y2) / 2), int((x1 + x2) / 2)] == 1
    # Cut and paste back unprocessed: the faces come back up to the resizing round trip.
    same, masks = paste_faces(photo, crop_faces(photo, crops), crops)
    inside = masks[0] > 0
    assert (same[0][inside] - photo[0][inside]).abs().mean() < 0.03
    assert torch.equal(same[0][~inside], photo[0][~inside])


def test_the_mask_is_a_feathered_ellipse_inside_the_square(group):
    photo, faces = group
    crop = plan_crops(faces, photo.shape[1], photo.shape[2], SIZE, margin=0.5)[0]
    mask = face_mask(crop, feather=0.2)
    side = crop.box[2]
    assert mask.shape == (side, side) and mask.max() == 1 and mask.min() == 0
    assert mask[0].max() == 0 and mask[-1].max() == 0 and mask[:, 0].max() == 0, "zero at the square's edge"
    soft = ((mask > 0) & (mask < 1)).sum()
    assert soft > 0 and torch.equal(face_mask(crop, feather=0.0).unique(), torch.tensor([0.0, 1.0]))


def test_a_face_at_the_border_is_cropped_with_repeated_edges_and_pasted_inside_only(group):
    photo, faces = group
    left = min(faces[0], key=lambda f: f.box[0])
    shifted = photo[:, :, int(left.box[0]) + 30:].contiguous()  # the leftmost face now overhangs the edge
    found = [detect_faces(shifted[0], min_score=0.5)]
    crops = plan_crops(found, shifted.shape[1], shifted.shape[2], SIZE, margin=0.5)
    edge = min(crops, key=lambda c: c.box[0])
    assert edge.box[0] < 0, "the crop square overhangs the photo"
    image = crop_faces(shifted, [edge])[0]
    overhang = round(-edge.box[0] * SIZE / edge.box[2])
    assert (image[:, :max(overhang - 2, 1)] - image[:, max(overhang - 2, 1):max(overhang - 1, 2)]).abs().max() < 0.05
    pasted, masks = paste_faces(shifted, torch.zeros(1, SIZE, SIZE, 3), [edge])
    assert pasted.shape == shifted.shape and masks[0, :, 0].max() > 0, "the part inside the photo is pasted"


def test_geometry_round_trips_through_text_and_mismatches_are_refused(group):
    photo, faces = group
    crops = plan_crops(faces, photo.shape[1], photo.shape[2], SIZE, margin=0.5)
    assert [FaceCrop.from_json(c.to_json()) for c in crops] == crops
    with pytest.raises(ValueError, match="face crop metadata is damaged"):
        FaceCrop.from_json('{"box": [1, 2]}')
    with pytest.raises(ValueError, match="7 face images for 6 crops"):
        paste_faces(photo, torch.zeros(7, SIZE, SIZE, 3), crops)
    with pytest.raises(ValueError, match=r"cut from a 1280x886 photo; the photo given is 640x443"):
        paste_faces(photo[:, ::2, ::2], torch.zeros(6, SIZE, SIZE, 3), crops)
    with pytest.raises(ValueError, match="multiple of 8"):
        plan_crops(faces, photo.shape[1], photo.shape[2], 100, margin=0.5)


def test_detect_policies_decide_which_faces_are_cropped(comfy_inproc, group):
    photo, _ = group
    nodes = comfy_inproc.pack.nodes.faces

    def crops(**policy):
        args = dict(select="all", index=0, min_size=20, min_score=0.9, on_no_face="error") | policy
        faces, _mask = nodes.FaceDetect.execute(photo, **args).args
        return nodes.FaceCrop.execute(photo, faces, SIZE, 0.5).args[1]

    assert len(crops()) == 6
    big = crops(min_size=125)  # the smallest faces fall below the minimum size (the box's longer side)
    assert 0 < len(big) < 6 and all(max(c.face_box[2] - c.face_box[0], c.face_box[3] - c.face_box[1]) >= 125
                                    for c in big)
    assert len(crops(select="largest")) == 1
    (third,) = crops(select="by_index", index=2)
    assert third.face_box == crops()[2].face_box and third.face_index == 0


def test_no_face_anywhere_blocks_everything_downstream(comfy_inproc):
    from comfy_execution.graph_utils import ExecutionBlocker

    nodes = comfy_inproc.pack.nodes.faces
    blank = torch.full((1, 64, 64, 3), 0.5)
    faces, _ = nodes.FaceDetect.execute(blank, "all", 0, 20, 0.9, "skip").args
    out = nodes.FaceCrop.execute(blank, faces, SIZE, 0.5).args
    assert faces == [[]] and all(isinstance(o, ExecutionBlocker) and o.message is None for o in out)



def test_a_recovered_face_replaces_every_pixel_its_protection_changed(group):
    """Protect (paste noise), then put the original crop back as a recovery does: with
    ``restore`` every pixel the protection changed is the recovered crop's, whatever the
    protected photo held there; the protection's own mask would leave a ring of protected
    pixels at its feathered edge."""
    photo, faces = group
    crops = plan_crops(faces, photo.shape[1], photo.shape[2], SIZE, margin=0.5)[:1]
    recovered = crop_faces(photo, crops)
    noise = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1))
    protected, _ = paste_faces(photo, noise, crops)
    changed = (protected[0] != photo[0]).any(-1)
    restored, masks = paste_faces(protected, recovered, crops, restore=True)
    assert torch.equal(masks[0][changed], torch.ones(int(changed.sum()))), "full weight wherever it changed"
    into_original, _ = paste_faces(photo, recovered, crops, restore=True)
    assert torch.equal(restored[0][changed], into_original[0][changed]), "nothing of the protected face is left"
    beyond = masks[0] == 0
    assert torch.equal(restored[0][beyond], protected[0][beyond]), "untouched beyond its mask"
    assert ((masks[0] > 0) & ~changed).any(), "it fades out over pixels the protection left alone"
    ring, _ = paste_faces(protected, recovered, crops)
    assert (ring[0][changed] - into_original[0][changed]).abs().max() > 0.1, "the protection's mask leaves a ring"


def test_the_command_knows_the_pixels_a_paste_may_change(group):
    """mask.protected_pixels (torch-free, for the command) is where Face Paste's mask is above 0."""
    photo, faces = group
    crops = plan_crops(faces, photo.shape[1], photo.shape[2], SIZE, margin=0.5)
    height, width = photo.shape[1:3]
    for feather in (0.0, 0.2, 0.6):
        _, masks = paste_faces(photo, torch.zeros(1, SIZE, SIZE, 3), crops[-1:], feather=feather)
        assert (protected_pixels(crops[-1].box, crops[-1].face_box, feather, height, width)
                == (masks[0] > 0).numpy()).all()
