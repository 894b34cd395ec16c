"""Key files: round trip, one encoding, encryption, pairs, exclusive creation, and refusal
of every bad file with a plain message. (Random mutations: test_key_fuzz.py.)"""
from __future__ import annotations

import json
import os
import stat
import tempfile
import time
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from diffpriv_core import key_format as fmt
from diffpriv_core import keys
from diffpriv_core.files import PARTIAL_SUFFIX, STALE_PARTIAL_S
from diffpriv_core.key_types import KeyE, KeyI
from diffpriv_core.keys import KeyFileError, key_bytes, load_key, load_key_bytes, next_key_path, save_key
from key_helpers import forge, key_i_for, random_key_e

PASSPHRASE = "correct horse"


def make_keys(seed=0):
    key_e = random_key_e(seed, checkpoint="abc")
    return key_e, key_i_for(key_e, 50, torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed)),
                            "fixed_point", 3, image_size="64x64")


def plain_file(seed=0) -> bytes:
    return key_bytes(*make_keys(seed))


@pytest.fixture(scope="module")
def encrypted() -> bytes:
    """One encrypted file for the module: each derivation costs about a second (scrypt N = 2^17)."""
    return key_bytes(*make_keys(), passphrase=PASSPHRASE)


def header_of(data: bytes) -> tuple[dict, dict]:
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return header, json.loads(header["__metadata__"][fmt.META_KEY])


def reheader(data: bytes, header: dict, **dumps) -> bytes:
    """The same tensor bytes under another header (JSON written as given)."""
    body = data[8 + int.from_bytes(data[:8], "little"):]
    raw = json.dumps(header, **dumps).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


def v1_file(key_e, key_i, passphrase=None) -> bytes:
    """A key file as version 1 of the pack wrote it (scrypt N = 2^15, the metadata as the
    associated data, key-I without a pair id)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    tensors = keys._tensors(key_e, key_i)
    meta = {k: v for k, v in keys._metadata(key_e, key_i, {}).items() if k != "key_i.pair"}
    meta["version"] = "1"
    if not passphrase:
        return forge(tensors, **meta)
    salt, nonce = os.urandom(16), os.urandom(12)
    meta.update({"encryption": "aes-256-gcm", "kdf": "scrypt", "kdf.params": json.dumps(fmt.SCRYPT["1"]),
                 "kdf.salt": salt.hex(), "nonce": nonce.hex()})
    derived = Scrypt(salt=salt, length=32, **fmt.SCRYPT["1"]).derive(passphrase.encode())
    sealed = AESGCM(derived).encrypt(nonce, save_bytes(tensors), fmt.canonical_json(meta).encode())
    return save_bytes({"ciphertext": torch.frombuffer(bytearray(sealed), dtype=torch.uint8)},
                      metadata={fmt.META_KEY: fmt.canonical_json(meta)})


# --- round trips ---------------------------------------------------------------------
def test_round_trip_plain(tmp_path):
    key_e, key_i = make_keys()
    path = save_key(tmp_path / "k.dpkey.safetensors", key_e, key_i, extra={"task": "anonymize"})
    e2, i2, meta = load_key(path)
    assert torch.equal(e2.stages, key_e.stages) and torch.equal(e2.uc, key_e.uc)
    assert torch.equal(i2.latent, key_i.latent)
    assert (i2.steps, i2.inversion, i2.refine) == (50, "fixed_point", 3)
    assert e2.meta["checkpoint"] == "abc" and i2.meta["image_size"] == "64x64" and meta["task"] == "anonymize"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert fmt.read_public_metadata(path) == meta  # the torch-free reader sees the same metadata
    assert load_bytes(path.read_bytes()).keys() == {"key_e.stages", "key_e.uc", "key_i.latent"}  # plain safetensors


def exact_keys(seed=0, steps=50):
    """A bdia key pair: key-I is two latents, the top state and the one a level below it."""
    key_e = random_key_e(seed, checkpoint="abc")
    g = torch.Generator().manual_seed(100 + seed)
    return key_e, key_i_for(key_e, steps, torch.randn(4, 8, 8, generator=g), "bdia",
                            below=torch.randn(4, 8, 8, generator=g))


def test_exact_key_round_trip_plain_and_encrypted(tmp_path, encrypted_exact):
    key_e, key_i = exact_keys()
    path = save_key(tmp_path / "k.dpkey.safetensors", key_e, key_i)
    assert load_bytes(path.read_bytes()).keys() == {"key_e.stages", "key_e.uc", "key_i.latent", "key_i.below"}
    for data, passphrase in ((path.read_bytes(), None), (encrypted_exact, PASSPHRASE)):
        e2, i2, meta = load_key_bytes(data, passphrase)
        assert (i2.steps, i2.inversion, i2.refine, meta["version"]) == (50, "bdia", 0, "4")
        assert torch.equal(i2.latent, key_i.latent) and torch.equal(i2.below, key_i.below)
        assert torch.equal(e2.stages, key_e.stages) and i2.meta == key_i.meta
    assert key_i.below.numpy().tobytes()[:64] not in encrypted_exact


@pytest.fixture(scope="module")
def encrypted_exact() -> bytes:
    return key_bytes(*exact_keys(), passphrase=PASSPHRASE)


def forged_exact(change) -> tuple[dict, dict]:
    """The tensors and metadata of an exact key file, after ``change(tensors, meta)``."""
    key_e, key_i = exact_keys()
    tensors, meta = keys._tensors(key_e, key_i), keys._metadata(key_e, key_i, {})
    change(tensors, meta)
    return tensors, meta


FORGED_EXACT = {
    "no second latent": (lambda t, m: t.pop("key_i.below"), "bdia key-I .* lacks it"),
    "a second latent on a fixed_point key": (lambda t, m: m.update(inversion="fixed_point", refine="3"),
                                             "this fixed_point key-I holds it"),
    "a second latent on a ddim key": (lambda t, m: m.update(inversion="ddim"), "this ddim key-I holds it"),
    "a second latent without key-I": (lambda t, m: t.pop("key_i.latent"), "a key file holds"),
    "a second latent of another shape": (lambda t, m: t.update({"key_i.below": torch.zeros(4, 8, 16)}),
                                         r"key_i.below is F32 \[4, 8, 16\]; .* float32 \(4, 8, 8\)"),
    "a second latent of another dtype": (lambda t, m: t.update({"key_i.below": t["key_i.below"].double()}),
                                         "key_i.below is F64"),
    "a second latent holding NaN": (lambda t, m: t["key_i.below"].__setitem__((0, 0, 0), float("nan")),
                                    "key_i.below holds NaN"),
    "an empty second latent": (lambda t, m: t.update({"key_i.below": torch.zeros(4, 8, 0)}), "key_i.below is F32"),
    "a one-step bdia key": (lambda t, m: m.update(steps="1", **{"key_i.grid": "1"}), "at least 2 steps"),
    "a refined bdia key": (lambda t, m: m.update(refine="4"), "no refinements"),
    "a bdia key in a version 3 file": (lambda t, m: m.update(version="3"), "version 3 file has no bdia key-I"),
    "another inversion": (lambda t, m: m.update(inversion="edict"), "key-I settings"),
}


@pytest.mark.parametrize("case", FORGED_EXACT)
def test_forged_exact_keys_are_refused(case):
    change, message = FORGED_EXACT[case]
    tensors, meta = forged_exact(change)
    with pytest.raises(KeyFileError, match=message):
        load_key_bytes(forge(tensors, **meta))


@pytest.mark.parametrize("case", ["no second latent", "a second latent on a fixed_point key",
                                  "a second latent of another shape", "a second latent holding NaN"])
def test_forged_exact_keys_are_refused_inside_an_encrypted_file(case, monkeypatch):
    """The same checks on the payload an encrypted file opens to (whoever knows the
    passphrase can seal anything)."""
    from diffpriv_core import key_crypto

    monkeypatch.setitem(fmt.SCRYPT, fmt.VERSION, {"n": 2, "r": 1, "p": 1})
    change, message = FORGED_EXACT[case]
    tensors, meta = forged_exact(change)
    data = key_crypto.seal_with_passphrase(meta, keys._encode(None, tensors), PASSPHRASE)
    with pytest.raises(KeyFileError, match=message):
        load_key_bytes(data, PASSPHRASE)


def test_version_3_files_with_a_single_latent_key_i_stay_readable(monkeypatch):
    """Key files the pack wrote before bdia (version 3, a fixed_point key-I, no second
    latent) load as they did, plain and encrypted."""
    from diffpriv_core import key_crypto

    monkeypatch.setitem(fmt.SCRYPT, "3", {"n": 2, "r": 1, "p": 1})
    key_e, key_i = make_keys()
    tensors, meta = keys._tensors(key_e, key_i), dict(keys._metadata(key_e, key_i, {}), version="3")
    plain = forge(tensors, **meta)
    sealed = key_crypto.seal_with_passphrase(meta, keys._encode(None, tensors), PASSPHRASE)
    for data, passphrase in ((plain, None), (sealed, PASSPHRASE)):
        _, i2, meta2 = load_key_bytes(data, passphrase)
        assert meta2["version"] == "3" and (i2.inversion, i2.refine, i2.below) == ("fixed_point", 3, None)
        assert torch.equal(i2.latent, key_i.latent)


def test_an_exact_key_i_needs_exactly_its_second_latent():
    key_e, key_i = exact_keys()
    with pytest.raises(ValueError, match="lacks it"):
        KeyI(key_i.latent, 50, "bdia", 0, key_i.meta)
    with pytest.raises(ValueError, match="has it"):
        key_i_for(key_e, 50, key_i.latent, "fixed_point", 3, below=key_i.below)
    with pytest.raises(ValueError, match="one shape"):
        key_i_for(key_e, 50, key_i.latent, "bdia", below=torch.zeros(4, 8, 9))
    with pytest.raises(ValueError, match="NaN"):
        key_i_for(key_e, 50, key_i.latent, "bdia", below=torch.full((4, 8, 8), float("inf")))


def test_unencrypted_bytes_are_deterministic():
    assert plain_file(0) == plain_file(0) != plain_file(1)


def test_key_e_only_file():
    key_e, _ = make_keys()
    e2, i2, _ = load_key_bytes(key_bytes(key_e))
    assert i2 is None and torch.equal(e2.stages, key_e.stages)


def test_encrypted_round_trip_secrecy_and_passphrases(encrypted):
    key_e, key_i = make_keys()
    assert key_e.stages.numpy().tobytes()[:64] not in encrypted
    e2, i2, _ = load_key_bytes(encrypted, PASSPHRASE)
    assert torch.equal(e2.stages, key_e.stages) and torch.equal(i2.latent, key_i.latent)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_key_bytes(encrypted, "wrong")
    with pytest.raises(KeyFileError, match="passphrase is required"):
        load_key_bytes(encrypted)


def test_passphrases_are_normalised():
    """'é' typed as one code point or as e + combining accent opens the same file."""
    composed, decomposed = "caf\u00e9 key", unicodedata.normalize("NFD", "caf\u00e9 key")
    assert composed != decomposed
    data = key_bytes(*make_keys(), passphrase=decomposed)
    assert torch.equal(load_key_bytes(data, composed)[0].stages, make_keys()[0].stages)


def test_a_passphrase_for_an_unencrypted_file_is_refused():
    """A forged unencrypted copy (any digest can be recomputed) must not load silently
    when the owner expects an encrypted key."""
    with pytest.raises(KeyFileError, match="this key file is not encrypted"):
        load_key_bytes(plain_file(), PASSPHRASE)


# --- one encoding: any changed byte is refused ----------------------------------------
def test_every_header_change_of_an_encrypted_file_is_refused(encrypted):
    header, meta = header_of(encrypted)
    steps_changed = dict(header, __metadata__={fmt.META_KEY: fmt.canonical_json(dict(meta, steps="99"))})
    extra_meta = dict(header, __metadata__={fmt.META_KEY: header["__metadata__"][fmt.META_KEY], "x": "y"})
    n = header["ciphertext"]["shape"][0]
    reshaped = dict(header, ciphertext=dict(header["ciphertext"], shape=[n // 4, 4]))
    wrong_mode = dict(header, __metadata__={fmt.META_KEY: fmt.canonical_json(dict(meta, encryption="none"))})
    cases = {
        "whitespace": reheader(encrypted, header, separators=(", ", ": ")),
        "steps": reheader(encrypted, steps_changed, separators=(",", ":")),
        "extra metadata": reheader(encrypted, extra_meta, separators=(",", ":")),
        "reshaped ciphertext": reheader(encrypted, reshaped, separators=(",", ":")),
        "encryption field": reheader(encrypted, wrong_mode, separators=(",", ":")),
        "duplicate field": encrypted[:8] + encrypted[8:].replace(b'{"__metadata__"', b'{"__metadata__":{},"__metadata__"', 1),
        "trailing bytes": encrypted + b"\0" * 8,
    }
    for case, data in cases.items():
        if case == "duplicate field":  # keep the length prefix true so the JSON itself is what is judged
            hl = int.from_bytes(encrypted[:8], "little") + len(b'"__metadata__":{},')
            data = hl.to_bytes(8, "little") + data[8:]
        with pytest.raises(KeyFileError) as err:
            load_key_bytes(data, PASSPHRASE)
        assert "Expecting" not in str(err.value), case
    assert header_of(encrypted)[0] == header  # nothing above changed the original


def test_plain_files_have_one_encoding():
    data = plain_file()
    header, meta = header_of(data)
    for changed in (reheader(data, header, separators=(", ", ": ")),  # whitespace
                    reheader(data, dict(header, __metadata__={fmt.META_KEY: json.dumps(meta)})),  # non-canonical
                    data + b" "):  # trailing byte
        with pytest.raises(KeyFileError, match="modified"):
            load_key_bytes(changed)


def test_one_byte_changes_get_plain_messages():
    """A changed byte says what is wrong in the user's words, never a parser's internals."""
    data = plain_file()
    header_start = 8

    def flipped(i, value=None):
        out = bytearray(data)
        out[i] = value if value is not None else out[i] ^ 0x20
        return bytes(out)

    name_at = data.index(b'"key_e.uc"') + 2
    cases = {flipped(0): "header", flipped(header_start, ord("x")): "header is not readable",
             flipped(name_at): "a tensor named 'kEy_e.uc', which no key file has", flipped(len(data) - 3): "integrity check failed",
             data[:5]: "cut off before its header", b"": "empty"}
    for damaged, message in cases.items():
        with pytest.raises(KeyFileError, match=message) as err:
            load_key_bytes(damaged)
        assert not any(word in str(err.value) for word in ("Expecting", "char ", "line 1", "Safetensor")), err.value


@pytest.mark.parametrize("cut", [0, 4, 8, 50, 500, -10])
def test_truncated_files_are_refused(cut):
    with pytest.raises(KeyFileError):
        load_key_bytes(plain_file()[:cut])


# --- what a file holds ---------------------------------------------------------------
def test_other_safetensors_and_wrong_shapes_are_refused():
    with pytest.raises(KeyFileError, match="not a Diff-Privacy key"):
        load_key_bytes(save_bytes({"w": torch.zeros(3)}))
    forged = {"key_e.stages": torch.zeros(9, 77, 768), "key_e.uc": torch.zeros(1, 77, 768)}
    with pytest.raises(KeyFileError, match=r"key_e.stages is F32 \[9, 77, 768\]"):
        load_key_bytes(forge(forged, **{"key_e.checkpoint": "abc"}))


def test_an_extra_tensor_is_a_key_error():
    key_e, key_i = make_keys()
    tensors = dict(keys._tensors(key_e, key_i), extra=torch.tensor(1.0))
    with pytest.raises(KeyFileError, match="a tensor named 'extra'"):
        load_key_bytes(forge(tensors, **keys._metadata(key_e, key_i, {})))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int32, torch.uint8])
@pytest.mark.parametrize("name", ["key_e.stages", "key_e.uc", "key_i.latent"])
def test_wrong_dtypes_are_refused_even_with_a_valid_digest(name, dtype):
    key_e, key_i = make_keys()
    tensors = keys._tensors(key_e, key_i)
    tensors[name] = tensors[name].to(dtype)
    with pytest.raises(KeyFileError):
        load_key_bytes(forge(tensors, **keys._metadata(key_e, key_i, {})))


def test_keys_that_do_not_belong_together_are_refused():
    """key-I is bound to the key-E it was inverted under: saving or loading a mixed pair fails."""
    key_e, key_i = make_keys(0)
    other_e, _ = make_keys(1)
    with pytest.raises(KeyFileError, match="do not belong together"):
        key_bytes(other_e, key_i)
    mixed = keys._metadata(other_e, key_i, {})
    with pytest.raises(KeyFileError, match="do not belong together"):
        load_key_bytes(forge(keys._tensors(other_e, key_i), **mixed))
    unbound = {k: v for k, v in keys._metadata(key_e, key_i, {}).items() if k != "key_i.pair"}
    with pytest.raises(KeyFileError, match="does not say which key-E"):
        load_key_bytes(forge(keys._tensors(key_e, key_i), **unbound))


@pytest.mark.parametrize("missing, message", [("key_e.checkpoint", "key-E has no checkpoint"),
                                              ("key_i.checkpoint", "key-I has no checkpoint"),
                                              ("key_i.grid", "key-I has no checkpoint fingerprint or timestep grid")])
def test_keys_without_their_checks_metadata_are_refused(missing, message):
    key_e, key_i = make_keys()
    meta = {k: v for k, v in keys._metadata(key_e, key_i, {}).items() if k != missing}
    with pytest.raises(KeyFileError, match=message):
        load_key_bytes(forge(keys._tensors(key_e, key_i), **meta))


def test_key_i_latent_size_is_bounded():
    key_e = make_keys()[0]
    side = keys.MAX_LATENT_SIDE + 1
    key_i = key_i_for(key_e, 50, torch.zeros(4, side, 8))
    with pytest.raises(KeyFileError, match="at most"):
        load_key_bytes(forge(keys._tensors(key_e, key_i), **keys._metadata(key_e, key_i, {})))


def test_random_bytes_are_refused():
    g = torch.Generator().manual_seed(3)
    for n in (1, 16, 4096):
        with pytest.raises(KeyFileError):
            load_key_bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes())


def test_hostile_headers_are_refused_quickly():
    body = plain_file()
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


# --- versions and scrypt -------------------------------------------------------------
def test_version_1_files_stay_readable():
    key_e, key_i = make_keys()
    for passphrase in (None, PASSPHRASE):
        e2, i2, meta = load_key_bytes(v1_file(key_e, key_i, passphrase), passphrase)
        assert meta["version"] == "1" and torch.equal(e2.stages, key_e.stages) and torch.equal(i2.latent, key_i.latent)
        assert i2.meta["pair"] == key_i.meta["pair"]  # a version 1 file binds its pair by holding it
    assert header_of(key_bytes(key_e, key_i, passphrase=PASSPHRASE))[1]["kdf.params"] == json.dumps(fmt.SCRYPT["2"])
    assert fmt.SCRYPT["2"]["n"] >= 2**17


def test_scrypt_settings_a_file_asks_for_are_refused_before_deriving(encrypted):
    """The public metadata is only authenticated after the key is derived, so a file must
    not choose the cost of deriving, nor downgrade to an older version's settings."""
    header, meta = header_of(encrypted)
    for params in ({"n": 2**20, "r": 16, "p": 4}, fmt.SCRYPT["1"]):
        hostile = dict(header, __metadata__={fmt.META_KEY: fmt.canonical_json(dict(meta, **{"kdf.params": json.dumps(params)}))})
        started = time.monotonic()
        with pytest.raises(KeyFileError, match="scrypt settings"):
            load_key_bytes(reheader(encrypted, hostile, separators=(",", ":")), PASSPHRASE)
        assert time.monotonic() - started < 0.5


# --- writing -------------------------------------------------------------------------
def test_an_existing_file_is_never_replaced(tmp_path):
    key_e, key_i = make_keys()
    path = save_key(tmp_path / "k.dpkey.safetensors", key_e, key_i)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_key(path, *make_keys(1))
    assert path.read_bytes() == before
    target = tmp_path / "elsewhere"
    (tmp_path / "link.dpkey.safetensors").symlink_to(target)
    with pytest.raises(FileExistsError):
        save_key(tmp_path / "link.dpkey.safetensors", key_e)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial file left


@pytest.mark.parametrize("prefix", ["photo[1]", "a*b?", "x[!y]"])
def test_numbered_names_never_repeat_whatever_the_prefix(tmp_path, prefix):
    paths = [keys.save_next_key(tmp_path, prefix, make_keys(n)[0]) for n in range(3)]
    assert len({p.name for p in paths}) == 3 and all(p.parent == tmp_path.resolve() for p in paths)
    assert [load_key(p)[0].stages[0, 0, 0] for p in paths] == [make_keys(n)[0].stages[0, 0, 0] for n in range(3)]


@pytest.mark.parametrize("prefix", [".", "sub/.", "sub/", "..", "sub/..", ".hidden", "../x", "/abs", "a\nb",
                                    "photo\u202egnp.exe", "zero\u200bwidth", "~/x", "sub/~x", "tab\tname"])
def test_prefixes_that_name_no_file_inside_the_folder_are_refused(tmp_path, prefix):
    with pytest.raises(ValueError):
        next_key_path(tmp_path / "keys", prefix)
    assert not list(tmp_path.glob("*.safetensors"))


def test_partial_files_are_private_from_the_first_byte_and_never_keys(tmp_path, monkeypatch):
    seen = []
    real_write = os.write

    def write(fd, data):
        seen.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, stat.S_IMODE(os.fstat(fd).st_mode)))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    save_key(tmp_path / "k.dpkey.safetensors", make_keys()[0])
    monkeypatch.undo()
    assert seen and all(name.startswith(".k.dpkey.safetensors.") and name.endswith(PARTIAL_SUFFIX)
                        and mode == 0o600 for name, mode in seen), seen

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_key(tmp_path / "crashed.dpkey.safetensors", make_keys()[0])
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.dpkey.safetensors"]  # no key, no partial

    stale, fresh = tmp_path / ".old.dpkey.safetensors.1a2b.partial", tmp_path / ".new.dpkey.safetensors.3c.partial"
    for partial in (stale, fresh):
        partial.write_bytes(plain_file()[:1000])
    os.utime(stale, (time.time() - 2 * STALE_PARTIAL_S,) * 2)
    with pytest.raises(KeyFileError, match="partial file"):
        load_key(fresh)
    assert next_key_path(tmp_path, "new").name == "new_00001.dpkey.safetensors"
    save_key(tmp_path / "later.dpkey.safetensors", make_keys()[0])
    assert not stale.exists() and fresh.exists()  # a crash's leftover is cleaned, a save in progress is not


def test_file_names_never_leave_the_folder(tmp_path):
    for bad in ("../x", "/etc/passwd", "a/../../x", "..", "", "a\\..\\x", "x\x00y"):
        with pytest.raises(ValueError):
            keys.safe_join(tmp_path, bad)
    (tmp_path / "link").symlink_to("/tmp")
    with pytest.raises(ValueError):
        keys.safe_join(tmp_path, "link/x")
    assert keys.safe_join(tmp_path, "sub/k.dpkey.safetensors") == tmp_path.resolve() / "sub" / "k.dpkey.safetensors"
    assert next_key_path(tmp_path, "sub/k").name == "k_00001.dpkey.safetensors"


def test_the_public_metadata_reader_needs_no_tensors(tmp_path):
    from diffpriv_core.faces.crop import FaceCrop

    crop = FaceCrop(0, 3, (443, 640), (10, 20, 96), 64, (30.0, 40.0, 78.5, 90.25))
    path = save_key(tmp_path / "k.dpkey.safetensors", make_keys()[0], extra={fmt.CROP_META: crop.to_json()})
    assert fmt.face_crop_summary(fmt.read_public_metadata(path)) == {"face": 3, "box": [30.0, 40.0, 78.5, 90.2],
                                                                   "crop": [10, 20, 96], "protection": "msi"}
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(KeyFileError):
        fmt.read_public_metadata(path)
    with pytest.raises(KeyFileError, match="face crop"):
        fmt.face_crop_summary({fmt.CROP_META: '{"face_index": "3", "face_box": [1]}'})


def test_key_e_without_fingerprint_is_not_written():
    with pytest.raises(KeyFileError, match="no checkpoint fingerprint"):
        key_bytes(KeyE(torch.zeros(10, 77, 768), torch.zeros(1, 77, 768)))
