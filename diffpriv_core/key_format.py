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

import json
import os
import unicodedata
from dataclasses import dataclass

FORMAT = "diffprivacy-key"
# 1: scrypt N = 2^15, the metadata authenticated as canonical JSON.
# 2: scrypt N = 2^17, the exact header bytes authenticated, key-I bound to its key-E,
#    passphrases normalised to Unicode NFC.
VERSION = "2"
VERSIONS = ("1", "2")
# scrypt settings by the version that wrote the file. They are public metadata, which can
# only be authenticated after the key is derived, so a file never chooses them.
SCRYPT = {"1": {"n": 2**15, "r": 8, "p": 1},  # 32 MiB, about 0.1 s
          "2": {"n": 2**17, "r": 8, "p": 1}}  # 128 MiB, about 0.5-1 s: as age does
ENCRYPTION = "aes-256-gcm"
KDF = "scrypt"
KEY_SUFFIX = ".dpkey.safetensors"
MAX_FILE_BYTES = 64 * 2**20  # a key is ~2.4 MB (key-E) + the latent; refuse anything absurd
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
DIGEST = "digest"  # unencrypted files: SHA-256 over metadata and tensors
ENCRYPTED_FIELDS = ("encryption", "kdf", "kdf.params", "kdf.salt", "nonce")
# Tensor names: the keys, or the sealed payload of an encrypted file.
KEY_E_STAGES, KEY_E_UC, KEY_I_LATENT, CIPHERTEXT = "key_e.stages", "key_e.uc", "key_i.latent", "ciphertext"
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
    known = (KEY_E_STAGES, KEY_E_UC, KEY_I_LATENT) + ((CIPHERTEXT,) if with_metadata else ())
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
    """{"face": index, "box": [x1, y1, x2, y2], "crop": [x, y, side]} of a per-face key's
    metadata (the face, and the square cut around it, in photo pixels); None for a
    whole-image key. Refuses geometry that is not the numbers Face Crop writes."""
    text = meta.get(CROP_META)
    if text is None:
        return None
    try:
        crop = json.loads(text)
        face, box, square = crop["face_index"], crop["face_box"], crop["box"]
        if not isinstance(face, int) or isinstance(face, bool) or len(box) != 4 or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise TypeError("face_index must be an integer and face_box four numbers")
        if len(square) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in square) \
                or square[2] < 1:
            raise TypeError("box must be three integers, the square's x, y and side")
        return {"face": face, "box": [round(float(v), 1) for v in box], "crop": list(square)}
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"the key file's face crop metadata is damaged ({exc})") from None


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
