"""Keys sealed to age recipients, opened and sealed anew on the client (torch-free), identity
files, bounded face-crop geometry and a face key bound to its protected pictures."""
from __future__ import annotations

import json
import math
import stat

import numpy as np
import pytest
import torch

from diffpriv_core import key_crypto
from diffpriv_core import key_format as fmt
from diffpriv_core import keys
from diffpriv_core.faces.binding import bind, check_bound
from diffpriv_core.faces.crop import FaceCrop
from diffpriv_core.keys import KeyFileError, key_bytes, load_key_bytes
from key_helpers import forge, key_i_for, random_key_e

PASSPHRASE = "correct horse"
CROP = FaceCrop(0, 1, (96, 128), (20, 10, 64), 64, (36.0, 26.0, 68.0, 58.0))


def face_keys(seed=0):
    key_e = random_key_e(seed, checkpoint="abc")
    return key_e, key_i_for(key_e, 10, torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def identity():
    return key_crypto.new_identity()


@pytest.fixture
def cheap_scrypt(monkeypatch):
    """The cheapest scrypt the format allows, for tests that are not about the KDF."""
    monkeypatch.setitem(fmt.SCRYPT, fmt.VERSION, {"n": 2, "r": 1, "p": 1})


def test_a_key_sealed_to_a_recipient_opens_only_with_its_identity(identity):
    key_e, key_i = face_keys()
    data = key_bytes(key_e, key_i, recipient=str(identity.to_public()), extra={fmt.CROP_META: CROP.to_json()})
    meta = fmt.read_container(data).meta
    assert meta["kdf"] == "age-x25519" and meta["age.recipient"] == str(identity.to_public())
    assert key_e.stages.numpy().tobytes()[:64] not in data
    e2, i2, _ = load_key_bytes(data, identities=[identity])
    assert torch.equal(e2.stages, key_e.stages) and torch.equal(i2.latent, key_i.latent)
    with pytest.raises(KeyFileError, match="identity given does not open"):
        load_key_bytes(data, identities=[key_crypto.new_identity()])
    with pytest.raises(KeyFileError, match="only its identity file opens it"):
        load_key_bytes(data, PASSPHRASE)
    changed = data.replace(b'"steps\\":\\"10\\"', b'"steps\\":\\"11\\"', 1)
    assert changed != data
    with pytest.raises(KeyFileError, match="modified"):
        load_key_bytes(changed, identities=[identity])
    with pytest.raises(ValueError, match="passphrase or a recipient"):
        key_bytes(key_e, key_i, PASSPHRASE, recipient=str(identity.to_public()))
    with pytest.raises(ValueError, match="not an age recipient"):
        key_bytes(key_e, key_i, recipient="age-not-a-recipient")


def test_the_client_opens_and_seals_keys_without_torch(identity, cheap_scrypt):
    """What `diffpriv` does on the user's machine: a key the server sealed to the run's own
    recipient, sealed anew under the passphrase; an encrypted key opened into the plain key
    file it holds (for the embedded server)."""
    key_e, key_i = face_keys()
    sealed = key_bytes(key_e, key_i, recipient=str(identity.to_public()))
    resealed = key_crypto.resealed_with_passphrase(sealed, [identity], PASSPHRASE)
    assert fmt.read_container(resealed).meta["kdf"] == "scrypt"
    for data, opener in ((resealed, {"passphrase": PASSPHRASE}), (sealed, {"identities": [identity]})):
        plain = key_crypto.decrypted_file(data, **opener)
        assert "encryption" not in fmt.read_container(plain).meta
        assert plain == key_bytes(key_e, key_i), "the very file the pack writes without encryption"
    with pytest.raises(KeyFileError, match="not sealed to this run's recipient"):
        key_crypto.resealed_with_passphrase(key_bytes(key_e, key_i), [identity], PASSPHRASE)


def test_identity_files_are_new_private_and_need_their_passphrase(tmp_path):
    path = tmp_path / "me.identity"
    recipient = key_crypto.write_identity_file(path, PASSPHRASE)
    assert recipient.startswith("age1") and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"AGE-SECRET-KEY" not in path.read_bytes(), "the identity is encrypted"
    assert str(key_crypto.read_identity_file(path, PASSPHRASE).to_public()) == recipient
    with pytest.raises(ValueError, match="wrong passphrase"):
        key_crypto.read_identity_file(path, "wrong")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        key_crypto.write_identity_file(path, PASSPHRASE)
    assert path.read_bytes() == before


def crop_with(**changes) -> str:
    crop = json.loads(CROP.to_json())
    crop.update(changes)
    return json.dumps(crop).replace("NaN", "NaN")


FORGED = {"side 40000": crop_with(box=[20, 10, 40000]), "side 10^9": crop_with(box=[20, 10, 10**9]),
          "side 0": crop_with(box=[20, 10, 0]), "side -5": crop_with(box=[20, 10, -5]),
          "source 10^6": crop_with(source_size=[10**6, 128]), "source 0": crop_with(source_size=[0, 128]),
          "NaN box": crop_with(face_box=[math.nan, 26.0, 68.0, 58.0]),
          "zero-width box": crop_with(face_box=[36.0, 26.0, 36.0, 58.0]),
          "box outside": crop_with(face_box=[300.0, 26.0, 340.0, 58.0]),
          "square outside": crop_with(box=[500, 10, 64]), "size 60": crop_with(size=60),
          "size 10^5": crop_with(size=10**5), "float index": crop_with(face_index=1.5),
          "bool index": crop_with(face_index=True), "landmarks 4": crop_with(landmarks=[[40.0, 30.0]] * 4),
          "landmark NaN": crop_with(landmarks=[[40.0, 30.0]] * 4 + [[math.inf, 30.0]]),
          "landmark outside": crop_with(landmarks=[[40.0, 30.0]] * 4 + [[-500.0, 30.0]]),
          "protection": crop_with(protection="none"), "extra field": crop_with(extra=1),
          "digest": crop_with(region_digests=["x" * 64]), "not JSON": "{", "a list": "[]"}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_face_crop_geometry_is_refused(case):
    key_e, key_i = face_keys()
    meta = dict(keys._metadata(key_e, key_i, {}), face_crop=FORGED[case])
    with pytest.raises(KeyFileError, match="face crop"):
        load_key_bytes(forge(keys._tensors(key_e, key_i), **meta))


def test_honest_geometry_loads_and_key_i_must_fit_the_crop():
    key_e, key_i = face_keys()
    good = crop_with(landmarks=[[40.0, 30.0], [60.0, 30.0], [50.0, 40.0], [42.0, 50.0], [58.0, 50.0]],
                     protection="msi")
    assert FaceCrop.from_json(load_key_bytes(key_bytes(key_e, key_i, extra={fmt.CROP_META: good}))[2]["face_crop"])
    meta = dict(keys._metadata(key_e, key_i, {}), face_crop=crop_with(size=128))
    with pytest.raises(KeyFileError, match="works at 128 px"):
        load_key_bytes(forge(keys._tensors(key_e, key_i), **meta))


def test_an_empty_key_i_is_a_key_file_error():
    key_e = face_keys()[0]
    key_i = key_i_for(key_e, 10, torch.zeros(4, 0, 8))
    with pytest.raises(KeyFileError, match="empty"):
        load_key_bytes(forge(keys._tensors(key_e, key_i), **keys._metadata(key_e, key_i, {})))


def test_an_older_version_with_later_fields_is_refused():
    key_e, key_i = face_keys()
    tensors = keys._tensors(key_e, key_i)
    meta = keys._metadata(key_e, key_i, {})
    with pytest.raises(KeyFileError, match="version 1 file has no 'key_i.pair'"):
        load_key_bytes(forge(tensors, version="1", **{k: v for k, v in meta.items() if k != "version"}))
    with pytest.raises(KeyFileError, match="version 2 file has no 'age.recipient'"):
        load_key_bytes(forge(tensors, version="2", **{"age.recipient": "age1x"},
                             **{k: v for k, v in meta.items() if k != "version"}))


def test_a_face_key_recovers_only_into_its_protected_pictures():
    g = torch.Generator().manual_seed(0)
    protected = torch.rand(2, 96, 128, 3, generator=g)  # two candidates of one photo
    (crop,) = bind([CROP], protected)
    assert len(crop.region_digests) == 2 and FaceCrop.from_json(crop.to_json()) == crop
    # What Load Image gives back of the PNG SaveImage wrote.
    as_loaded = torch.from_numpy(np.clip(255.0 * protected.numpy(), 0, 255).astype(np.uint8)).float() / 255.0
    for picture in as_loaded:
        check_bound(picture, crop)
    other = as_loaded[0].clone()
    other[30, 40, 0] = (other[30, 40, 0] + 0.5) % 1.0  # one pixel of the face's region changed
    with pytest.raises(ValueError, match="made with other pictures"):
        check_bound(other, crop)
    outside = as_loaded[0].clone()
    outside[90, 120] = 0.0  # outside the crop square: still the protected picture for this face
    check_bound(outside, crop)


# --- files the command writes and removes ------------------------------------------------
def test_the_contact_sheet_is_private_and_a_planted_link_is_replaced_not_followed(tmp_path):
    from PIL import Image

    from diffpriv_client.summary import CONTACT_SHEET_PREFIX, Summary, write_contact_sheet

    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(out / "a" / "a_00001_.png")
    summary = Summary(out, "protect")
    summary.record("a", out / "a" / "a_00001_.png", "ok", [out / "a" / "a_00001_.png"])
    target = tmp_path / "elsewhere.png"
    target.write_bytes(b"not yours")
    (out / f"{CONTACT_SHEET_PREFIX}0001.png").symlink_to(target)
    (sheet,) = write_contact_sheet(summary)
    assert not sheet.is_symlink() and stat.S_IMODE(sheet.stat().st_mode) == 0o600
    assert target.read_bytes() == b"not yours"


def test_a_link_planted_at_a_photos_folder_is_refused(tmp_path):
    from diffpriv_client.batch import UnsafeDownload, write_numbered

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "photo").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafeDownload, match="link"):
        write_numbered(tmp_path / "photo", "photo", "_.png", b"x")
    assert not list(elsewhere.iterdir())


def test_removing_a_job_folder_never_follows_a_link(tmp_path):
    from diffpriv_core.files import remove_tree_no_follow

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.png").write_bytes(b"keep")
    job = tmp_path / "job"
    (job / "sub").mkdir(parents=True)
    (job / "sub" / "out.png").write_bytes(b"x")
    (job / "linked").symlink_to(outside, target_is_directory=True)
    (job / "file-link").symlink_to(outside / "keep.png")
    assert sorted(remove_tree_no_follow(job)) == ["file-link", "linked", "out.png"]
    assert not job.exists() and (outside / "keep.png").read_bytes() == b"keep"
    (tmp_path / "job-link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OSError, match="not a folder"):
        remove_tree_no_follow(tmp_path / "job-link")
    assert (outside / "keep.png").exists()


def test_a_history_entry_that_is_not_the_prompt_queued_is_not_trusted():
    from diffpriv_client.batch import UntrustedResult, check_entry

    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "diffpriv-jobs/a/x.png"}}}
    entry = {"prompt": [0, "p1", json.loads(json.dumps(graph)), {"client_id": "me"}, ["1"]]}
    check_entry(entry, "p1", graph, "me")
    swapped = {"1": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}
    for forged in ({"prompt": [0, "p1", swapped, {"client_id": "me"}, ["1"]]},
                   {"prompt": [0, "p1", graph, {"client_id": "someone else"}, ["1"]]},
                   {"prompt": [0, "p2", graph, {"client_id": "me"}, ["1"]]}, {"prompt": None}, {}):
        with pytest.raises(UntrustedResult, match="not the prompt this command queued"):
            check_entry(forged, "p1", graph, "me")
