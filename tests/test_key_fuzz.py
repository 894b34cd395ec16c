"""Structure-aware fuzzing of the key file reader: thousands of mutations of real key files
(plain and encrypted) aimed at each part of the format. Every outcome must be the
documented KeyFileError or a load identical to the original; anything else (another
exception, a different key loading) fails with the seed and the mutation to replay it.

The seed changes every run (DP_FUZZ_SEED replays one). Encrypted files cost a scrypt
derivation per load (about a second): the derivation is memoised per (passphrase, salt,
version) here, which the format allows honestly (it is a pure function of them; a
mutated salt or version still derives anew), so mutations of the ciphertext and header
run at the speed of AES-GCM.
"""
from __future__ import annotations

import functools
import json
import os
import random

import pytest
import torch

from diffpriv_core import key_format as fmt
from diffpriv_core import key_crypto, keys
from diffpriv_core.keys import KeyFileError, key_bytes, load_key_bytes
from diffpriv_core.faces.crop import FaceCrop
from key_helpers import forge, key_i_for, random_key_e

PASSPHRASE = "fuzz passphrase"
PLAIN_MUTATIONS = 1600
ENCRYPTED_MUTATIONS = 500
RECIPIENT_MUTATIONS = 500
IDENTITY = key_crypto.new_identity()
# A face key's geometry (Face Crop's JSON), for the key-I's 8 x 8 latent (64 px).
CROP = json.dumps({"image_index": 0, "face_index": 0, "source_size": [96, 128], "box": [20, 10, 64], "size": 64,
                   "face_box": [36.0, 26.0, 68.0, 58.0], "landmarks": [[40.0, 30.0], [60.0, 30.0], [50.0, 40.0],
                                                                     [42.0, 50.0], [58.0, 50.0]],
                   "protection": "msi", "region_digests": ["0" * 64]}, separators=(",", ":"))
SEED = int(os.environ.get("DP_FUZZ_SEED", random.randrange(2**32)))


def small_keys(seed: int):
    """Seed 0 a single-latent (ddim) key-I, seed 1 a bdia one (two latents)."""
    key_e = random_key_e(seed, checkpoint="fuzz")
    return key_e, key_i_for(key_e, 10, torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed)),
                            mode="bdia" if seed else "ddim")


@pytest.fixture(scope="module")
def files():
    recipient = str(IDENTITY.to_public())
    return {"plain": [key_bytes(*small_keys(0), extra={fmt.CROP_META: CROP}), key_bytes(*small_keys(1))],
            "encrypted": [key_bytes(*small_keys(0), passphrase=PASSPHRASE),
                          key_bytes(*small_keys(1), passphrase=PASSPHRASE)],
            "recipient": [key_bytes(*small_keys(0), recipient=recipient, extra={fmt.CROP_META: CROP}),
                          key_bytes(*small_keys(1), recipient=recipient)]}


@pytest.fixture
def memoised_scrypt(monkeypatch):
    derive = functools.lru_cache(maxsize=None)(key_crypto.derive)
    monkeypatch.setattr(key_crypto, "derive", derive)
    return derive


# --- the parts of a file -------------------------------------------------------------
def split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes, **dumps) -> bytes:
    raw = json.dumps(header, **(dumps or {"separators": (",", ":")})).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


def meta_of(header: dict) -> dict:
    return json.loads(header["__metadata__"][fmt.META_KEY])


def with_meta(header: dict, meta: dict) -> dict:
    return dict(header, __metadata__={fmt.META_KEY: fmt.canonical_json(meta)})


def tensor_names(header: dict) -> list[str]:
    return [n for n in header if n != "__metadata__"]


def junk_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 40 else 4)
    if kind == 0:
        return rng.choice([None, True, False, 0, -1, 2**64, 1e308, float("nan")])
    if kind == 1:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 2:
        return rng.randrange(-10, 10**6)
    if kind == 3:
        return rng.random()
    if kind == 4:
        return [junk_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    if kind == 5:
        return {str(junk_json(rng, depth + 1)): junk_json(rng, depth + 1) for _ in range(rng.randrange(3))}
    return [[[junk_json(rng, depth + 10)]]]


# --- mutations: each takes (rng, file, other file) and returns new bytes and a label --
def length_field(rng, data, other):
    n = int.from_bytes(data[:8], "little")
    value = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, n - 8, len(data), len(data) - 8, 2**63, 2**64 - 1,
                        rng.randrange(2**20), rng.randrange(2**64)])
    return value.to_bytes(8, "little") + data[8:], f"header length {value}"


def header_bytes(rng, data, other):
    n = int.from_bytes(data[:8], "little")
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        i = 8 + rng.randrange(n)
        out[i] = rng.choice([out[i] ^ (1 << rng.randrange(8)), rng.randrange(256), ord(rng.choice(' {}[]",:\\0'))])
    return bytes(out), "header bytes"


def json_garbage(rng, data, other):
    header, body = split(data)
    choice = rng.randrange(6)
    if choice == 0:
        header[rng.choice(tensor_names(header) + ["__metadata__"])] = junk_json(rng)
    elif choice == 1:
        header[str(junk_json(rng))] = junk_json(rng)
    elif choice == 2:
        return join(header, body, separators=(", ", ": ")), "whitespace"
    elif choice == 3:
        raw = json.dumps(header, separators=(",", ":"))
        name = rng.choice(tensor_names(header))
        dup = raw[:-1] + "," + json.dumps(name) + ":" + json.dumps(header[name], separators=(",", ":")) + "}"
        raw = dup.encode() + b" " * (-len(dup) % 8)
        return len(raw).to_bytes(8, "little") + raw + body, "duplicate field"
    elif choice == 4:
        nesting = rng.choice([100, 10_000, 100_000])
        raw = (b"[" * nesting + b"]" * nesting)
        return len(raw).to_bytes(8, "little") + raw + body, f"nesting {nesting}"
    else:
        header["__metadata__"] = dict(header["__metadata__"], **{str(junk_json(rng)): str(junk_json(rng))})
    return join(header, body), f"json garbage {choice}"


def dtype_shape_offsets(rng, data, other):
    header, body = split(data)
    name = rng.choice(tensor_names(header))
    info = dict(header[name])
    choice = rng.randrange(5)
    if choice == 0:
        info["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "XYZ", "", 4])
    elif choice == 1:
        shape = list(info["shape"])
        if shape and rng.random() < 0.7:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 2**40, -2**40])
        else:
            shape = rng.choice([[], [0], shape + [1], shape[:-1], [2**62, 2**62]])
        info["shape"] = shape
    elif choice == 2:
        begin, end = info["data_offsets"]
        info["data_offsets"] = rng.choice([[begin + 4, end + 4], [begin - 4, end - 4], [0, end - begin],
                                           [begin, end + 4], [end, begin], [begin, 2**63]])
    elif choice == 3:  # another tensor's place: overlapping offsets
        other_name = rng.choice(tensor_names(header))
        info["data_offsets"] = list(header[other_name]["data_offsets"])
    else:
        header[rng.choice(["key_e.stages", "key_e.uc", "key_i.latent", "key_i.below", "ciphertext", "extra"])] = \
            dict(info)
    header[name] = info
    return join(header, body), f"dtype/shape/offsets {choice} of {name}"


def ends(rng, data, other):
    choice = rng.randrange(3)
    if choice == 0:
        return data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), "trailing bytes"
    if choice == 1:
        return data[:rng.randrange(len(data))], "truncated"
    return data + data, "doubled"


def splice(rng, data, other):
    choice = rng.randrange(3)
    if choice == 0:
        header, _ = split(data)
        _, body = split(other)
        return join(header, body), "header of one file, body of another"
    if choice == 1:
        cut = rng.randrange(8, min(len(data), len(other)))
        return data[:cut] + other[cut:], f"splice at {cut}"
    start, end = sorted(rng.sample(range(len(data)), 2))
    return data[:start] + other[start:end] + data[end:], f"segment {start}:{end} of another file"


def body_bytes(rng, data, other):
    n = int.from_bytes(data[:8], "little")
    out = bytearray(data)
    i = 8 + n + rng.randrange(len(data) - 8 - n)
    out[i] ^= 1 << rng.randrange(8)
    return bytes(out), f"body byte {i}"


def crop_lie(rng) -> str:
    """Face Crop's JSON with one field a forger set to a value no field may hold."""
    crop = json.loads(CROP)
    field = rng.choice(sorted(crop) + ["extra"])
    value = rng.choice([-5, 40000, 10**9, 2**63, 1.5, float("nan"), float("inf"), True, "x", [1, 2],
                        [float("nan")] * 4, [[1e308, 1e308]] * 5, ["x" * 64]])
    crop[field] = value
    return json.dumps(crop) if rng.random() < 0.9 else json.dumps(crop)[:rng.randrange(1, 40)]


def resigned_lies(rng, data, other):
    """A plain file re-encoded canonically with a recomputed digest (what anyone can
    forge) that lies about a field the loader checks."""
    header, body = split(data)
    meta = meta_of(header)
    tensors = {n: keys._tensor(data, r) for n, r in fmt.read_container(data).tensors.items()}
    del meta[fmt.DIGEST]
    field, value = rng.choice([
        ("format", "other"), ("version", rng.choice(["0", "5", "", "1.0", "\uff12"])), ("encryption", "none"),
        ("steps", rng.choice(["0", "1001", "abc", " 10", "010", "9" * 5000, "-1", "5"])),
        ("inversion", rng.choice(["magic", "bdia", "BDIA"])), ("refine", rng.choice(["-1", "x", "1e3"])),
        ("key_i.grid", "1,2,3"),
        ("key_i.pair", "0" * 32), ("key_e.checkpoint", None), ("key_i.checkpoint", None), ("key_i.grid", None),
        ("key_i.pair", None), ("steps", None), (fmt.CROP_META, crop_lie(rng)), (fmt.CROP_META, crop_lie(rng)),
        ("refine", "1001"), ("age.recipient", str(IDENTITY.to_public()))])
    if value is None:
        meta.pop(field, None)
    else:
        meta[field] = value
    if rng.random() < 0.3:  # and a tensor of another dtype or shape
        name = rng.choice(sorted(tensors))
        tensors[name] = rng.choice([tensors[name].half(), tensors[name].double(), tensors[name][..., :-1].contiguous(),
                                    tensors[name].reshape(-1)])
    return forge(tensors, **meta), f"re-signed {field}={value!r:.20}"


PLAIN = [length_field, header_bytes, json_garbage, dtype_shape_offsets, ends, splice, body_bytes, resigned_lies]
ENCRYPTED = [length_field, header_bytes, json_garbage, dtype_shape_offsets, ends, splice, body_bytes]


def outcome(data: bytes, passphrase: str | None, original, identities=None) -> str | None:
    """None when the outcome is allowed; else what went wrong."""
    try:
        key_e, key_i, meta = load_key_bytes(data, passphrase, identities)
        if fmt.CROP_META in meta:  # what the nodes do with a face key's geometry
            FaceCrop.from_json(meta[fmt.CROP_META])
    except KeyFileError as exc:
        text = str(exc)
        return None if text and not any(w in text for w in ("Expecting", "line 1 column", "Traceback")) else \
            f"a KeyFileError with a parser's message: {text!r}"
    except Exception as exc:  # noqa: BLE001 - any other exception is the failure being looked for
        return f"{type(exc).__name__}: {exc}"
    e0, i0, m0 = original
    same = (torch.equal(key_e.stages, e0.stages) and torch.equal(key_e.uc, e0.uc) and meta == m0
            and torch.equal(key_i.latent, i0.latent) and key_i.meta == i0.meta
            and (key_i.below is None if i0.below is None else torch.equal(key_i.below, i0.below)))
    return None if same else "a different key loaded"


def fuzz(files: list[bytes], passphrase: str | None, mutations, count: int, identities=None) -> dict[str, int]:
    rng = random.Random(SEED)
    originals = [load_key_bytes(f, passphrase, identities) for f in files]
    seen: dict[str, int] = {}
    for n in range(count):
        which = rng.randrange(2)
        mutate = mutations[n % len(mutations)]
        data, label = mutate(rng, files[which], files[1 - which])
        # A splice can give back the other file whole (their first bytes agree): then that
        # file's own key is the right load.
        expected = originals[files.index(data)] if data in files else originals[which]
        problem = outcome(data, passphrase, expected, identities)
        assert problem is None, f"DP_FUZZ_SEED={SEED} mutation {n} ({mutate.__name__}: {label}): {problem}"
        seen[mutate.__name__] = seen.get(mutate.__name__, 0) + 1
    return seen


def test_plain_key_files_survive_structure_aware_mutations(files):
    seen = fuzz(files["plain"], None, PLAIN, PLAIN_MUTATIONS)
    assert sum(seen.values()) == PLAIN_MUTATIONS and set(seen) == {m.__name__ for m in PLAIN}


def test_encrypted_key_files_survive_structure_aware_mutations(files, memoised_scrypt):
    seen = fuzz(files["encrypted"], PASSPHRASE, ENCRYPTED, ENCRYPTED_MUTATIONS)
    assert sum(seen.values()) == ENCRYPTED_MUTATIONS
    # Wrong, missing and decomposed-wrong passphrases, on the original and mutated files.
    rng = random.Random(SEED)
    for passphrase in ("wrong", None, "", PASSPHRASE + " ", PASSPHRASE.upper()):
        for data in (files["encrypted"][0], header_bytes(rng, files["encrypted"][1], None)[0]):
            with pytest.raises(KeyFileError):
                load_key_bytes(data, passphrase)
    assert memoised_scrypt.cache_info().currsize >= 2, "each file's salt was derived for real"


def test_key_files_sealed_to_a_recipient_survive_structure_aware_mutations(files):
    seen = fuzz(files["recipient"], None, [length_field, header_bytes, json_garbage, dtype_shape_offsets, ends,
                                             splice, body_bytes], RECIPIENT_MUTATIONS, identities=[IDENTITY])
    assert sum(seen.values()) == RECIPIENT_MUTATIONS
    for identities in (None, [key_crypto.new_identity()]):  # no identity, another one
        with pytest.raises(KeyFileError):
            load_key_bytes(files["recipient"][0], None, identities)
    # A passphrase file told it is sealed to a recipient, and the reverse, re-signed.
    for data, passphrase, identities in ((files["encrypted"][0], None, [IDENTITY]),
                                         (files["recipient"][0], PASSPHRASE, None)):
        with pytest.raises(KeyFileError):
            load_key_bytes(data, passphrase, identities)
