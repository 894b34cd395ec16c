"""Key files: round trip, determinism, encryption, and refusal of every bad file."""
from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from diffpriv_core import keys
from diffpriv_core.key_types import KeyE, KeyI
from diffpriv_core.keys import KeyFileError, key_bytes, load_key, load_key_bytes, save_key


def make_keys(seed=0):
    g = torch.Generator().manual_seed(seed)
    key_e = KeyE(torch.randn(10, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g), {"checkpoint": "abc"})
    key_i = KeyI(torch.randn(4, 8, 8, generator=g), 50, "fixed_point", 3, {"checkpoint": "abc", "image_size": "64x64"})
    return key_e, key_i


def test_round_trip_plain(tmp_path):
    key_e, key_i = make_keys()
    path = save_key(tmp_path / "k.safetensors", key_e, key_i, extra={"task": "anonymize"})
    e2, i2, meta = load_key(path)
    assert torch.equal(e2.stages, key_e.stages) and torch.equal(e2.uc, key_e.uc)
    assert torch.equal(i2.latent, key_i.latent)
    assert (i2.steps, i2.inversion, i2.refine) == (50, "fixed_point", 3)
    assert e2.meta["checkpoint"] == "abc" and i2.meta["image_size"] == "64x64" and meta["task"] == "anonymize"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_unencrypted_bytes_are_deterministic():
    assert key_bytes(*make_keys()) == key_bytes(*make_keys())
    assert key_bytes(*make_keys(0)) != key_bytes(*make_keys(1))


def test_key_e_only_file():
    key_e, _ = make_keys()
    e2, i2, _ = load_key_bytes(key_bytes(key_e))
    assert i2 is None and torch.equal(e2.stages, key_e.stages)


def test_encrypted_round_trip_and_secrecy():
    key_e, key_i = make_keys()
    data = key_bytes(key_e, key_i, passphrase="correct horse")
    assert key_e.stages.numpy().tobytes()[:64] not in data
    e2, i2, _ = load_key_bytes(data, "correct horse")
    assert torch.equal(e2.stages, key_e.stages) and torch.equal(i2.latent, key_i.latent)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_key_bytes(data, "wrong")
    with pytest.raises(KeyFileError, match="passphrase is required"):
        load_key_bytes(data)


def test_encrypted_metadata_is_authenticated():
    data = bytearray(key_bytes(*make_keys(), passphrase="pw"))
    old, new = b'\\"steps\\":\\"50\\"', b'\\"steps\\":\\"99\\"'
    i = data.find(old)
    assert i > 0
    data[i:i + len(old)] = new
    with pytest.raises(KeyFileError, match="wrong passphrase, or the key file was modified"):
        load_key_bytes(bytes(data), "pw")


def test_tampered_plain_file_is_refused():
    data = bytearray(key_bytes(*make_keys()))
    data[-100] ^= 0x01
    with pytest.raises(KeyFileError, match="integrity"):
        load_key_bytes(bytes(data))


@pytest.mark.parametrize("cut", [0, 4, 8, 50, 500, -10])
def test_truncated_files_are_refused(cut):
    data = key_bytes(*make_keys())
    with pytest.raises(KeyFileError):
        load_key_bytes(data[:cut])


def test_other_safetensors_and_wrong_shapes_are_refused():
    with pytest.raises(KeyFileError, match="not a Diff-Privacy key"):
        load_key_bytes(save_bytes({"w": torch.zeros(3)}))
    forged = {"key_e.stages": torch.zeros(9, 77, 768), "key_e.uc": torch.zeros(1, 77, 768)}
    meta = {"format": keys.FORMAT, "version": keys.VERSION}
    meta["digest"] = keys._digest(meta, forged)
    with pytest.raises(KeyFileError, match="shape"):
        load_key_bytes(save_bytes(forged, metadata={keys.META_KEY: keys._canonical(meta).decode()}))


def test_random_bytes_are_refused():
    g = torch.Generator().manual_seed(3)
    for n in (1, 16, 4096):
        with pytest.raises(KeyFileError):
            load_key_bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes())


@pytest.mark.parametrize("passphrase", [None, "pw"])
def test_fuzz_every_corruption_is_a_clean_key_error(passphrase):
    """Flipped bits anywhere (header, metadata, payload), truncation anywhere, and an
    oversized header all end in KeyFileError: never another exception, a hang or a load."""
    data = key_bytes(*make_keys(), passphrase=passphrase)
    g = torch.Generator().manual_seed(11)
    header_end = 8 + int.from_bytes(data[:8], "little")
    # Each encrypted load runs scrypt (~0.1 s): fewer samples there.
    tries = 40 if passphrase else 200
    positions = list(range(0, header_end, max(1, header_end // tries))) + \
        torch.randint(header_end, len(data), (tries,), generator=g).tolist()
    for n, pos in enumerate(positions):
        corrupted = bytearray(data)
        corrupted[pos] ^= 1 << (n % 8)
        with pytest.raises(KeyFileError):
            load_key_bytes(bytes(corrupted), passphrase)
    for cut in torch.randint(1, len(data), (tries // 4,), generator=g).tolist():
        with pytest.raises(KeyFileError):
            load_key_bytes(data[:cut], passphrase)
    oversized = (2**40).to_bytes(8, "little") + data[8:]
    with pytest.raises(KeyFileError):
        load_key_bytes(oversized, passphrase)


def test_file_names_never_leave_the_folder(tmp_path):
    for bad in ("../x", "/etc/passwd", "a/../../x", "..", "", "a\\..\\x", "x\x00y"):
        with pytest.raises(ValueError):
            keys.safe_join(tmp_path, bad)
    (tmp_path / "link").symlink_to("/tmp")
    with pytest.raises(ValueError):
        keys.safe_join(tmp_path, "link/x")
    assert keys.safe_join(tmp_path, "sub/k.dpkey.safetensors") == tmp_path.resolve() / "sub" / "k.dpkey.safetensors"
    assert keys.next_key_path(tmp_path, "sub/k").name == "k_00001.dpkey.safetensors"


def forge(tensors: dict, **extra_meta) -> bytes:
    """A plain key file with a valid digest around whatever tensors are given."""
    meta = {"format": keys.FORMAT, "version": keys.VERSION, **extra_meta}
    meta["digest"] = keys._digest(meta, tensors)
    return save_bytes(tensors, metadata={keys.META_KEY: keys._canonical(meta).decode()})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("name", ["key_e.stages", "key_e.uc", "key_i.latent"])
def test_wrong_dtypes_are_refused_even_with_a_valid_digest(name, dtype):
    key_e, key_i = make_keys()
    tensors = keys._tensors(key_e, key_i)
    tensors[name] = tensors[name].to(dtype)
    data = forge(tensors, steps="50", inversion="fixed_point", refine="3")
    with pytest.raises(KeyFileError, match=f"{name} has dtype {dtype}"):
        load_key_bytes(data)


def test_truncation_inside_every_region_is_refused():
    """Cuts in the length prefix, the JSON header, at its end, inside and between every
    tensor, and one byte short of the end."""
    for passphrase in (None, "pw"):
        data = key_bytes(*make_keys(), passphrase=passphrase)
        header_len = int.from_bytes(data[:8], "little")
        start = 8 + header_len
        header = json.loads(data[8:start])
        cuts = {1, 7, 8, 9, 8 + header_len // 2, start - 1, start, len(data) - 1}
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                cuts |= {start + begin, start + begin + 1, start + (begin + end) // 2, start + end - 1}
        for cut in sorted(c for c in cuts if 0 < c < len(data)):
            with pytest.raises(KeyFileError):
                load_key_bytes(data[:cut], passphrase)


def test_hostile_headers_are_refused_quickly():
    body = key_bytes(*make_keys())
    nested = b"[" * 200_000 + b"]" * 200_000  # a JSON nesting bomb within the header size limit
    hostile = [
        len(nested).to_bytes(8, "little") + nested,
        (2**20 + 1).to_bytes(8, "little") + b"{" + b" " * 2**20,  # over the header limit
        (8).to_bytes(8, "little") + b'"\xff\xfe"    ',  # not UTF-8
        body[:8] + body[8:].replace(b'"dtype":"F32"', b'"dtype":"XYZ"', 1),
        body[:8] + body[8:].replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1),
    ]
    for data in hostile:
        started = time.monotonic()
        with pytest.raises(KeyFileError):
            load_key_bytes(data)
        assert time.monotonic() - started < 2.0


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(tempfile.gettempdir()) / f"dp-key-pickle-ran-{os.getpid()}"


def test_a_pickle_is_never_unpickled(tmp_path):
    """A torch.save (pickle) file whose unpickling would run a command: refused as not a
    key, and the command never runs."""
    path = tmp_path / "evil.dpkey.safetensors"
    torch.save({"key_e.stages": _Payload()}, path)
    for passphrase in (None, "pw"):
        with pytest.raises(KeyFileError):
            load_key(path, passphrase)
    assert not MARKER.exists()


def test_scrypt_parameters_a_file_asks_for_are_bounded():
    """The public metadata is only authenticated after the key is derived, so a file must
    not be able to make derivation arbitrarily costly."""
    data = key_bytes(*make_keys(), passphrase="pw")
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"][keys.META_KEY])
    meta["kdf.params"] = json.dumps({"n": 2**17, "r": 16, "p": 4})  # 256 MiB, 32 times the work
    hostile = save_bytes(load_bytes(data), metadata={keys.META_KEY: keys._canonical(meta).decode()})
    started = time.monotonic()
    with pytest.raises(KeyFileError, match="scrypt"):
        load_key_bytes(hostile, "pw")
    assert time.monotonic() - started < 1.0
