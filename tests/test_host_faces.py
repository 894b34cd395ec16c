"""Every face of a group photo through the real server: detect, crop, guided protection,
per-face keys that record their crop, paste back; then recover one face.

insightface's t1.jpg (six people), halved to 640 x 443; crops at 64 px (test-size models).
The faces share one key-E loaded from a file: MSI on six crops costs minutes on a CPU (its
CLIP ViT-L/14 is full size), and one key-E per image of a batch is tested with MSI itself
(test_host_msi.py). Each face still gets its own key-I and key file."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from diffpriv_client.comfy_http import PromptFailed
from diffpriv_core.faces.crop import FaceCrop, paste_faces
from diffpriv_core.keys import load_key, save_key
from photos import as_image, insightface_photo
from test_host_foundation import fetch_image
from test_host_protect import add_guided_sampling
from key_helpers import install_key_e as install_random_key_e
from key_helpers import key_i_for
from test_host_recovery import add, base_graph, random_key_e

pytestmark = pytest.mark.host
CROP = 64
# key-I in the default mode, bdia, whose recovery retraces the inversion exactly at any step
# count: 5 steps for the tests of the plumbing; the task's 50 for the one that recovers a
# face, on a photo with fewer faces.
QUICK_KEY_I = {"steps": 5, "mode": "bdia", "refine_iterations": 1}
RECOVERABLE_KEY_I = {"steps": 50, "mode": "bdia", "refine_iterations": 1}
CANDIDATES = 2
KEY_E_FILE = "group-e.dpkey.safetensors"


def every_face_graph(image: str, on_no_face: str = "error", key_i: dict = QUICK_KEY_I, prefix: str = "group") -> dict:
    g = base_graph()
    add(g, "img", "LoadImage", image=image)
    add(g, "detect", "DiffPrivacyFaceDetect", image=["img", 0], select="all", index=0, min_size=20, min_score=0.9,
        on_no_face=on_no_face)
    add(g, "crop", "DiffPrivacyFaceCrop", image=["img", 0], faces=["detect", 0], size=CROP, margin=0.5)
    add(g, "enc", "VAEEncode", pixels=["crop", 0], vae=["ckpt", 2])
    add(g, "key_e", "DiffPrivacyLoadKey", key_name=KEY_E_FILE, passphrase="")
    decoded = add_guided_sampling(g, ["crop", 0], ["enc", 0], ["key_e", 0], s_ns=0.6, steps=5, samples=CANDIDATES,
                                  seed=3)
    add(g, "paste", "DiffPrivacyFacePaste", image=["img", 0], faces=decoded, crop_info=["crop", 1], feather=0.2)
    add(g, "save", "SaveImage", images=["paste", 0], filename_prefix=f"{prefix}/protected")
    add(g, "masks", "MaskToImage", mask=["paste", 1])
    add(g, "savemask", "SaveImage", images=["masks", 0], filename_prefix=f"{prefix}/mask")
    add(g, "recon", "VAEDecode", samples=["enc", 0], vae=["ckpt", 2])
    add(g, "saverecon", "SaveImage", images=["recon", 0], filename_prefix=f"{prefix}/reconstruction")
    add(g, "inv", "DiffPrivacyDDIMInversionKey", model=["ckpt", 0], latent=["enc", 0], key_e=["key_e", 0], **key_i)
    add(g, "keys", "DiffPrivacySaveKey", key_e=["key_e", 0], key_i=["inv", 0], crop_info=["crop", 1],
        filename_prefix=f"{prefix}/key", folder="keys", passphrase="")
    return g


def recover_face_graph(photo: str, key_name: str) -> dict:
    g = base_graph()
    add(g, "img", "LoadImage", image=photo)
    add(g, "key", "DiffPrivacyLoadKey", key_name=key_name, passphrase="")
    add(g, "rec", "DiffPrivacyRecover", model=["ckpt", 0], key_i=["key", 1], key_e=["key", 0])
    add(g, "dec", "VAEDecode", samples=["rec", 0], vae=["ckpt", 2])
    add(g, "paste", "DiffPrivacyFacePaste", image=["img", 0], faces=["dec", 0], crop_info=["key", 2], feather=0.2)
    add(g, "save", "SaveImage", images=["paste", 0], filename_prefix="recovered")
    return g


def pair_photo() -> np.ndarray:
    """Two of the group's faces (200 x 220), one overhanging the right edge of the photo."""
    return np.ascontiguousarray(insightface_photo("t1.jpg")[::2, ::2][40:260, 100:300])


def install_key_e(host) -> None:
    install_random_key_e(host.keys / KEY_E_FILE, 11)


@pytest.fixture(scope="module")
def group(comfy_host):
    photo = np.ascontiguousarray(insightface_photo("t1.jpg")[::2, ::2])
    name = comfy_host.upload(photo, "group.png")
    install_key_e(comfy_host)
    return photo, comfy_host.client.run(every_face_graph(name), timeout=1500)


@pytest.fixture(scope="module")
def pair(comfy_host):
    """The pair photo protected with recoverable keys."""
    photo = pair_photo()
    name = comfy_host.upload(photo, "pair.png")
    install_key_e(comfy_host)
    return photo, comfy_host.client.run(every_face_graph(name, key_i=RECOVERABLE_KEY_I, prefix="pair"), timeout=1500)


def saved_keys(host, result) -> list[tuple]:
    """(key-E, key-I, metadata) of every key file the prompt saved, in order."""
    return [load_key(host.saved_file(r))
            for r in result.files("keys", "diffprivacy_keys")]


def test_every_face_is_protected_and_nothing_else_changes(comfy_host, group):
    photo, result = group
    protected = [fetch_image(comfy_host, r) for r in result.files("save")]
    assert len(protected) == CANDIDATES and all(p.shape == photo.shape for p in protected)
    crops = [FaceCrop.from_json(meta["face_crop"]) for _, _, meta in saved_keys(comfy_host, result)]
    _, mask = paste_faces(as_image(photo)[None], torch.zeros(len(crops), CROP, CROP, 3), crops)
    outside = mask[0].numpy() == 0
    for picture in protected:
        assert np.array_equal(picture[outside], photo[outside]), "pixels outside the masks are untouched"
        assert (np.abs(picture.astype(int) - photo)[~outside]).mean() > 2, "the faces changed"
    assert not np.array_equal(protected[0], protected[1]), "one photo per candidate"
    saved_mask = fetch_image(comfy_host, result.files("savemask")[0])[..., 0]
    assert np.array_equal(saved_mask > 0, mask[0].numpy() * 255 >= 1), "the node's mask output is that mask"


def test_each_face_has_its_own_key_recording_its_crop(comfy_host, group):
    photo, result = group
    names = [r["filename"] for r in result.files("keys", "diffprivacy_keys")]
    assert names == [f"key_face{k}_00001.dpkey.safetensors" for k in range(6)]
    keys = saved_keys(comfy_host, result)
    crops = [FaceCrop.from_json(meta["face_crop"]) for _, _, meta in keys]
    assert [c.face_index for c in crops] == list(range(6))
    assert all(c.source_size == photo.shape[:2] and c.size == CROP for c in crops)
    assert len({c.box for c in crops}) == 6 and not torch.equal(keys[0][1].latent, keys[1][1].latent)


def test_recovering_one_face_restores_it_and_leaves_the_others_protected(comfy_host, pair):
    photo, result = pair
    assert len(result.files("keys", "diffprivacy_keys")) == 2
    protected = fetch_image(comfy_host, result.files("save")[0])
    reconstructions = [fetch_image(comfy_host, r) for r in result.files("saverecon")]
    k = 1
    name = comfy_host.upload(protected, "pair-protected.png")
    key_name = f"pair/key_face{k}_00001.dpkey.safetensors"
    recovered = fetch_image(comfy_host, comfy_host.client.run(recover_face_graph(name, key_name)).files("save")[0])

    _, _, meta = load_key(comfy_host.keys / key_name)
    crop = FaceCrop.from_json(meta["face_crop"])
    expected, mask = paste_faces(as_image(protected)[None], as_image(reconstructions[k])[None], [crop])
    inside = mask[0].numpy() > 0
    assert np.array_equal(recovered[~inside], protected[~inside]), "the other faces stay protected"
    error = np.abs(as_image(recovered).numpy() - expected[0].numpy())[inside].mean()
    change = np.abs(as_image(protected).numpy() - expected[0].numpy())[inside].mean()
    assert error < 0.02 and error < change / 5, (error, change)


def test_a_photo_without_a_face_is_refused_or_passed_by_policy(comfy_host):
    name = comfy_host.upload(skimage.data.chelsea(), "cat.png")
    with pytest.raises(PromptFailed, match="no face found in image 0"):
        comfy_host.client.run(every_face_graph(name))
    keys = comfy_host.keys
    before = sorted(keys.rglob("*"))
    result = comfy_host.client.run(every_face_graph(name, on_no_face="skip"))
    assert not result.files("save") and not result.files("keys", "diffprivacy_keys"), "nothing written"
    assert sorted(keys.rglob("*")) == before


def test_a_key_without_crop_geometry_is_refused_by_face_paste(comfy_host, group):
    photo, _ = group
    key_e = random_key_e(1)
    key_i = key_i_for(key_e, 5, torch.zeros(4, CROP // 8, CROP // 8))
    save_key(comfy_host.keys / "whole.dpkey.safetensors", key_e, key_i)
    g = recover_face_graph(comfy_host.upload(photo, "group-again.png"), "whole.dpkey.safetensors")
    with pytest.raises(PromptFailed, match="no crop geometry"):
        comfy_host.client.run(g)
