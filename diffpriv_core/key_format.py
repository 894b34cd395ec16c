"""The key file format: its names, its limits and a strict reader of its container.

A key file is a safetensors file (an 8-byte little-endian header length, a JSON header,
then the tensor bytes) whose header holds ONE metadata entry, ``diffprivacy``: a JSON
object of strings, written in one canonical form. Everything here is torch-free, so the
HTTP client reads a key's public metadata (its face crop, its task) with this module too.

Every byte is hostile until checked. The reader accepts only the exact bytes this pack
writes: a header that is not in the canonical form (whitespace, field order, duplicate
fields, extra entries, tensor data that does not tile the body exactly) is refused, so
that a key file has one encoding and any changed byte is detected.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import unicodedata
from dataclasses import dataclass

FORMAT = "diffprivacy-key"
# 1: scrypt N = 2^15, the metadata authenticated as canonical JSON.
# 2: scrypt N = 2^17, the exact header bytes authenticated, key-I bound to its key-E,
#    passphrases normalised to Unicode NFC.
# 3: keys sealed to age recipients (key_crypto.py), a face key bound to its protected
#    photo (PROTECTED_META), every number of the face crop bounded.
# 4: key-I by BDIA (inversion "bdia"): a second latent, the tensor key_i.below. A pack that
#    reads versions up to 3 refuses these files as written by a newer pack, rather than
#    recovering from the first latent alone.
VERSION = "4"
VERSIONS = ("1", "2", "3", "4")
# scrypt settings by the version that wrote the file. They are public metadata, which can
# only be authenticated after the key is derived, so a file never chooses them.
SCRYPT = {"1": {"n": 2**15, "r": 8, "p": 1},  # 32 MiB, about 0.1 s
          "2": {"n": 2**17, "r": 8, "p": 1},  # 128 MiB, about 0.5-1 s: as age does
          "3": {"n": 2**17, "r": 8, "p": 1},
          "4": {"n": 2**17, "r": 8, "p": 1}}
ENCRYPTION = "aes-256-gcm"
KDF = "scrypt"
KEY_SUFFIX = ".dpkey.safetensors"
MAX_FILE_BYTES = 64 * 2**20  # a key is ~2.4 MB (key-E) + key-I's latents; refuse anything absurd
MAX_HEADER_BYTES = 2**20

# The one safetensors metadata entry: the container stores its entries in an unordered
# map, so several entries would make the bytes differ from run to run.
META_KEY = "diffprivacy"
# Names inside the diffprivacy metadata.
KEY_E_PREFIX, KEY_I_PREFIX = "key_e.", "key_i."
CHECKPOINT = "checkpoint"  # key-E and key-I: fingerprint of the UNet they were made with
GRID = "grid"  # key-I: the timestep grid it was inverted on
PAIR = "pair"  # key-I: the id of the key-E it was inverted under (key_types.key_e_id)
CROP_META = "face_crop"  # where the key's face sits in its photo (Face Crop), as JSON
# Fields a version wrote first: an older version's file that holds one was not written by a pack.
NEWER_FIELDS = {"2": ("key_i.pair",), "3": ("age.recipient", "age.wrapped")}
# key-I's inversions (recovery.MODES) and the version that wrote each first; a bdia key-I
# holds a second latent (KEY_I_BELOW), the state one grid level below key_i.latent.
BDIA = "bdia"
INVERSIONS = (BDIA, "fixed_point", "ddim")
NEWER_INVERSIONS = {BDIA: "4"}
# Bounds of a face crop's numbers (Face Crop never makes larger ones).
MAX_PHOTO_SIDE = 16384
MAX_CROP_SIZE = 2048  # the working resolution: what MSI trains on at most
MAX_FACES = 4096  # photo and face indices
MAX_MARGIN_GROWTH = 5  # the square is at most the face box grown by a margin of 2 on each side
PROTECTIONS = ("msi", "unconditional")
CROP_FIELDS = ("image_index", "face_index", "source_size", "box", "size", "face_box", "landmarks", "protection",
               "region_digests")
DIGEST = "digest"  # unencrypted files: SHA-256 over metadata and tensors
ENCRYPTED_FIELDS = ("encryption", "kdf", "kdf.params", "kdf.salt", "nonce")
# Tensor names: the keys, or the sealed payload of an encrypted file.
KEY_E_STAGES, KEY_E_UC, KEY_I_LATENT, CIPHERTEXT = "key_e.stages", "key_e.uc", "key_i.latent", "ciphertext"
KEY_I_BELOW = "key_i.below"  # bdia key-Is only; the same shape as key_i.latent
KEY_TENSORS = (KEY_E_STAGES, KEY_E_UC, KEY_I_LATENT, KEY_I_BELOW)
# Every dtype safetensors names, so a key with the wrong one is told so in plain words.
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
            "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class KeyFileError(ValueError):
    """A key file that cannot be used: damaged, tampered, wrong passphrase, not a key."""


@dataclass(frozen=True)
class TensorRecord:
    """One tensor as the header describes it; ``start``/``end`` are offsets into the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Container:
    meta: dict[str, str] | None  # the diffprivacy metadata (None: a payload without metadata)
    tensors: dict[str, TensorRecord]
    header: bytes  # the exact bytes before the tensor data: length prefix and JSON header


def canonical_json(meta: dict[str, str]) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def normalise_passphrase(passphrase: str) -> bytes:
    """The bytes a passphrase is derived from: Unicode NFC, so that the same characters
    typed on another system (which may compose accents differently) open the file."""
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def encode_header(meta: dict[str, str] | None, tensors: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """The canonical header (length prefix included) for tensors laid out in the given order.

    The layout is the one the safetensors library writes, so key files stay readable by
    any safetensors reader: metadata first, compact JSON, padding with spaces to 8 bytes.
    """
    header: dict = {} if meta is None else {"__metadata__": {META_KEY: canonical_json(meta)}}
    offset = 0
    for name, dtype, shape in tensors:
        size = ITEMSIZE[dtype]
        for n in shape:
            size *= n
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


# How torch names each dtype: the digest of an unencrypted file hashes these names.
TORCH_DTYPES = {"F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16",
                "I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8",
                "U8": "torch.uint8", "BOOL": "torch.bool"}


def tensors_digest(meta: dict[str, str], tensors: list[tuple[str, str, tuple[int, ...], bytes]]) -> str:
    """The SHA-256 an unencrypted file carries: over the metadata (without the digest) and
    each tensor's name, torch dtype name, shape and bytes, by name."""
    h = hashlib.sha256(canonical_json(meta).encode())
    for name, dtype, shape, data in sorted(tensors):
        h.update(f"{name}|{dtype}|{tuple(shape)}".encode())
        h.update(data)
    return h.hexdigest()


def plain_file(meta: dict[str, str], payload: bytes, inner: Container) -> bytes:
    """An unencrypted key file of ``meta`` and the tensors of a decrypted payload."""
    records = inner.tensors
    meta = {k: v for k, v in meta.items() if k != DIGEST}
    meta[DIGEST] = tensors_digest(meta, [(n, TORCH_DTYPES.get(r.dtype, r.dtype), r.shape, payload[r.start:r.end])
                                         for n, r in records.items()])
    order = tensor_order({n: r.dtype for n, r in records.items()})
    header = encode_header(meta, [(n, records[n].dtype, records[n].shape) for n in order])
    return header + b"".join(payload[records[n].start:records[n].end] for n in order)


def tensor_order(names_and_dtypes: dict[str, str]) -> list[str]:
    """The order safetensors lays tensors out in: wider dtypes first, then by name."""
    return sorted(names_and_dtypes, key=lambda n: (-ITEMSIZE[names_and_dtypes[n]], n))


def read_container(data: bytes, with_metadata: bool = True) -> Container:
    """Parse and check a key file's container (or, ``with_metadata=False``, an encrypted
    file's decrypted payload). Refuses anything but the exact canonical bytes."""
    if len(data) > MAX_FILE_BYTES:
        raise KeyFileError(f"not a key file: {len(data)} bytes is far larger than any key")
    header_len = _header_length(data[:8], len(data))
    header = _parse_json(data[8:8 + header_len])
    meta = _diffprivacy_metadata(header) if with_metadata else None
    if not with_metadata and "__metadata__" in header:
        raise KeyFileError("the key file is damaged: its encrypted part holds unexpected metadata")
    body_start = 8 + header_len
    known = KEY_TENSORS + ((CIPHERTEXT,) if with_metadata else ())
    unknown = sorted(name for name in header if name not in known and name != "__metadata__")
    if unknown:
        raise KeyFileError(f"the key file is damaged: it holds a tensor named {unknown[0]!r}, which no key file has")
    tensors = {name: _tensor_record(name, info, body_start) for name, info in header.items() if name != "__metadata__"}
    _check_layout(tensors, body_start, len(data))
    order = sorted(tensors, key=lambda n: tensors[n].start)
    if order != tensor_order({n: tensors[n].dtype for n in tensors}):
        raise KeyFileError("the key file is damaged: its tensors are not in the order this pack writes them")
    expected = encode_header(meta, [(n, tensors[n].dtype, tensors[n].shape) for n in order])
    if expected != data[:body_start]:
        raise KeyFileError("the key file was modified: its header is not byte for byte what this pack writes")
    return Container(meta, tensors, bytes(data[:body_start]))


def read_public_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The public metadata of a key file (task, steps, face crop, ...), reading only its
    header: no tensors are loaded and nothing is verified beyond the header's form (an
    encrypted file's metadata is authenticated only when it is opened with its passphrase)."""
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        size = os.fstat(fh.fileno()).st_size
        header_len = _header_length(prefix, size)
        meta = _diffprivacy_metadata(_parse_json(fh.read(header_len)))
    return meta


def face_crop_summary(meta: dict[str, str]) -> dict | None:
    """{"face": index, "box": [x1, y1, x2, y2], "crop": [x, y, side], "protection": name,
    "landmarks": [[x, y] x 5]} of a per-face key's metadata (the face, and the square cut
    around it, in photo pixels; no landmarks in keys made before they were recorded, and
    their protection was MSI's); None for a whole-image key. Refuses geometry that is not
    the numbers Face Crop writes."""
    text = meta.get(CROP_META)
    if text is None:
        return None
    crop = checked_face_crop(text)
    summary = {"face": crop["face_index"], "box": [round(float(v), 1) for v in crop["face_box"]],
               "crop": crop["box"], "protection": crop.get("protection") or PROTECTIONS[0]}
    if crop.get("landmarks"):
        summary["landmarks"] = [[round(float(x), 1), round(float(y), 1)] for x, y in crop["landmarks"]]
    return summary


def checked_face_crop(text) -> dict:
    """A face crop's geometry (Face Crop's JSON), every number checked: whole numbers where
    Face Crop writes them, finite, the photo at most MAX_PHOTO_SIDE a side, the crop square
    overlapping the photo and at most a few times the photo's side, the face box and its
    landmarks inside the square, the working size a multiple of 8 up to MAX_CROP_SIZE.
    KeyFileError (a ValueError) says what is wrong."""
    try:
        crop = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        crop = None
    if not isinstance(crop, dict):
        raise KeyFileError("the key file's face crop metadata is damaged (not a JSON object)")
    unknown = sorted(set(crop) - set(CROP_FIELDS))
    missing = [f for f in CROP_FIELDS[:6] if f not in crop]
    if unknown or missing:
        raise KeyFileError(f"the key file's face crop metadata is damaged (field {(unknown or missing)[0]!r} "
                           f"{'is not one Face Crop writes' if unknown else 'is missing'})")
    _whole(crop["image_index"], "image_index", 0, MAX_FACES)
    _whole(crop["face_index"], "face_index", 0, MAX_FACES)
    h, w = _numbers(crop["source_size"], "source_size", 2, whole=True)
    for side in (h, w):
        _whole(side, "source_size", 1, MAX_PHOTO_SIDE)
    size = _whole(crop["size"], "size", 8, MAX_CROP_SIZE)
    if size % 8:
        raise KeyFileError(f"the key file's face crop is damaged: its working size {size} is not a multiple of 8")
    x0, y0, side = _numbers(crop["box"], "box", 3, whole=True)
    _whole(side, "box side", 8, MAX_MARGIN_GROWTH * max(h, w) + 8)
    if not (x0 < w and y0 < h and x0 + side > 0 and y0 + side > 0):
        raise KeyFileError("the key file's face crop is damaged: its square lies outside the photo")
    x1, y1, x2, y2 = _numbers(crop["face_box"], "face_box", 4)
    if not (x0 - 1 <= x1 < x2 <= x0 + side + 1 and y0 - 1 <= y1 < y2 <= y0 + side + 1):
        raise KeyFileError("the key file's face crop is damaged: its face box is empty or outside its square")
    if crop.get("landmarks") is not None:
        points = crop["landmarks"]
        if not isinstance(points, list) or len(points) != 5:
            raise KeyFileError("the key file's face crop is damaged: landmarks must be 5 points")
        for point in points:
            px, py = _numbers(point, "landmark", 2)
            if not (x0 - 1 <= px <= x0 + side + 1 and y0 - 1 <= py <= y0 + side + 1):
                raise KeyFileError("the key file's face crop is damaged: a landmark lies outside its square")
    if crop.get("protection") is not None and crop["protection"] not in PROTECTIONS:
        raise KeyFileError(f"the key file's face crop is damaged: protection {str(crop['protection'])[:20]!r} is "
                           f"not one of {', '.join(PROTECTIONS)}")
    digests = crop.get("region_digests", [])
    if not isinstance(digests, list) or len(digests) > 64 or not all(
            isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d) for d in digests):
        raise KeyFileError("the key file's face crop is damaged: its region digests are not SHA-256 digests")
    return crop


def _numbers(value, name: str, count: int, whole: bool = False) -> list:
    if not isinstance(value, list) or len(value) != count:
        raise KeyFileError(f"the key file's face crop is damaged: {name} must be {count} numbers")
    for v in value:
        if whole:
            _whole(v, name, -2**31, 2**31)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 2**31:
            raise KeyFileError(f"the key file's face crop is damaged: {name} holds {str(v)[:20]}, not a finite number")
    return value


def _whole(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise KeyFileError(f"the key file's face crop is damaged: {name} is {str(value)[:20]}, not a whole number "
                           f"from {low} to {high}")
    return value


# --- internals -----------------------------------------------------------------------
def _header_length(prefix: bytes, file_size: int) -> int:
    if len(prefix) < 8:
        raise KeyFileError("not a key file: it is empty or cut off before its header")
    header_len = int.from_bytes(prefix, "little")
    if header_len < 2 or header_len > MAX_HEADER_BYTES or header_len > file_size - 8:
        raise KeyFileError("the key file is damaged or not a key file: its header length is wrong "
                           "(a changed first byte, or a file cut off inside its header)")
    return header_len


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise KeyFileError("the key file was modified: a field of its header appears twice")
    return dict(pairs)


def _parse_json(raw: bytes) -> dict:
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise KeyFileError("the key file is damaged or not a key file: its header is not readable") from None
    if not isinstance(value, dict):
        raise KeyFileError("the key file is damaged or not a key file: its header is not readable")
    return value


def _diffprivacy_metadata(header: dict) -> dict[str, str]:
    extra = header.get("__metadata__")
    if not isinstance(extra, dict) or not isinstance(extra.get(META_KEY), str):
        raise KeyFileError("not a Diff-Privacy key file: it has no Diff-Privacy metadata "
                           "(another safetensors file, or a damaged key)")
    if set(extra) != {META_KEY}:
        raise KeyFileError("the key file was modified: its header holds metadata this pack does not write")
    meta = _parse_json(extra[META_KEY].encode("utf-8"))
    if not all(isinstance(v, str) for v in meta.values()):
        raise KeyFileError("the key file is damaged: its Diff-Privacy metadata holds values that are not text")
    if meta.get("format") != FORMAT:
        raise KeyFileError("not a Diff-Privacy key file: its metadata has no 'diffprivacy-key' format tag")
    if meta.get("version") not in VERSIONS:
        raise KeyFileError(f"key file version {meta.get('version')!r} is not supported (this pack reads versions "
                           f"{', '.join(VERSIONS)}): it was written by a newer pack, or damaged")
    for version, fields in NEWER_FIELDS.items():
        later = [f for f in fields if f in meta]
        if meta["version"] < version and later:
            raise KeyFileError(f"the key file was modified: a version {meta['version']} file has no {later[0]!r} "
                               f"(version {version} added it)")
    inversion = meta.get("inversion")
    if inversion in NEWER_INVERSIONS and meta["version"] < NEWER_INVERSIONS[inversion]:
        raise KeyFileError(f"the key file was modified: a version {meta['version']} file has no {inversion} key-I "
                           f"(version {NEWER_INVERSIONS[inversion]} added it)")
    return meta


def _tensor_record(name: str, info, body_start: int) -> TensorRecord:
    try:
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise TypeError
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ITEMSIZE or not all(_is_size(v) for v in (*shape, begin, end)):
            raise TypeError
    except (TypeError, ValueError):
        raise KeyFileError(f"the key file is damaged: the header's record of tensor {name!r} is unreadable") from None
    size = ITEMSIZE[dtype]
    for n in shape:
        size *= n
    if end - begin != size:
        raise KeyFileError(f"the key file is damaged: tensor {name!r} does not hold as many bytes as its shape says")
    return TensorRecord(dtype, tuple(shape), body_start + begin, body_start + end)


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_FILE_BYTES


def _check_layout(tensors: dict[str, TensorRecord], body_start: int, file_size: int) -> None:
    """The tensors tile the body exactly: no gap, no overlap, nothing after the last."""
    position = body_start
    for record in sorted(tensors.values(), key=lambda r: r.start):
        if record.start != position:
            raise KeyFileError("the key file is damaged: its tensors overlap or leave gaps")
        position = record.end
    if position != file_size:
        raise KeyFileError("the key file is damaged: it is cut off" if position > file_size else
                           "the key file was modified: it has bytes after its last tensor")
