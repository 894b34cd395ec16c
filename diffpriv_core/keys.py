"""Key files: key-E, key-I and their metadata in one safetensors file (key_format.py).

No pickle anywhere. A key file has one encoding, and the loader accepts only that
encoding, so any changed byte is detected. Unencrypted files carry a SHA-256 digest over
metadata and tensors (damage, not forgery); encrypted files (key_crypto.py: under a
passphrase, or sealed to an age recipient) hold the serialised tensors under AES-256-GCM
with the exact header bytes as the associated data, so the public metadata cannot be
altered either. A stolen encrypted key file reveals only its metadata (task, step count,
image size).

key-I is bound to the key-E it was inverted under (its ``pair`` metadata is key-E's id),
so keys of two photos never run together silently.
"""
from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import Path

import numpy as np
import torch

from . import key_crypto
from . import key_format as fmt
from .key_format import KEY_SUFFIX, KeyFileError  # noqa: F401  (public names of this module)
from .files import PARTIAL_SUFFIX, write_new_file
from .key_types import EMBED_SHAPE, PAIR_MISMATCH, KeyE, KeyI, belong_together, key_e_id
from .frame import MSI_MAX_SIDE, VAE_FACTOR
from .schedule import STAGES, T, ddim_grid

FORMAT, VERSION = fmt.FORMAT, fmt.VERSION
# key-I's latent is at most what the nodes make: MSI takes images up to MSI_MAX_SIDE pixels.
MAX_LATENT_SIDE = MSI_MAX_SIDE // VAE_FACTOR
MAX_REFINE = 1000  # fixed-point refinements per inversion step (the node allows 50)


def check_metadata(key_e: KeyE, key_i: KeyI | None) -> None:
    """Refuse keys whose checks would be skipped: no checkpoint fingerprint, no grid."""
    if not key_e.meta.get(fmt.CHECKPOINT):
        raise KeyFileError("this key-E has no checkpoint fingerprint, so it cannot be checked against the model")
    if key_i is None:
        return
    if not key_i.meta.get(fmt.CHECKPOINT) or not key_i.meta.get(fmt.GRID):
        raise KeyFileError("this key-I has no checkpoint fingerprint or timestep grid, so it cannot be checked "
                           "against the model")
    h, w = key_i.latent.shape[-2:]
    if not (1 <= h <= MAX_LATENT_SIDE and 1 <= w <= MAX_LATENT_SIDE):
        raise KeyFileError(f"key-I's latent is {w} x {h}; the nodes make latents of at most "
                           f"{MAX_LATENT_SIDE} x {MAX_LATENT_SIDE} (images of {MSI_MAX_SIDE} pixels)")
    if not belong_together(key_e, key_i):
        raise KeyFileError(PAIR_MISMATCH if fmt.PAIR in key_i.meta else
                           "this key-I does not say which key-E it belongs to: make it with DDIM Inversion Key")


# --- writing -------------------------------------------------------------------------
def _tensors(key_e: KeyE, key_i: KeyI | None) -> dict[str, torch.Tensor]:
    tensors = {fmt.KEY_E_STAGES: key_e.stages.detach().float().cpu().contiguous(),
               fmt.KEY_E_UC: key_e.uc.detach().float().cpu().contiguous()}
    if key_i is not None:
        tensors[fmt.KEY_I_LATENT] = key_i.latent.detach().float().cpu().contiguous()
        if key_i.below is not None:
            tensors[fmt.KEY_I_BELOW] = key_i.below.detach().float().cpu().contiguous()
    return tensors


def _metadata(key_e: KeyE, key_i: KeyI | None, extra: dict[str, str]) -> dict[str, str]:
    meta = {f"{fmt.KEY_E_PREFIX}{k}": str(v) for k, v in key_e.meta.items()}
    if key_i is not None:
        meta.update({f"{fmt.KEY_I_PREFIX}{k}": str(v) for k, v in key_i.meta.items()})
        meta.update({"steps": str(key_i.steps), "inversion": key_i.inversion, "refine": str(key_i.refine)})
    meta.update({k: str(v) for k, v in extra.items()})
    meta.update({"format": fmt.FORMAT, "version": fmt.VERSION})
    return meta


def _encode(meta: dict[str, str] | None, tensors: dict[str, torch.Tensor]) -> bytes:
    """The container: canonical header, then the tensors' bytes in the header's order."""
    dtypes = {name: "U8" if t.dtype == torch.uint8 else "F32" for name, t in tensors.items()}
    order = fmt.tensor_order(dtypes)
    header = fmt.encode_header(meta, [(n, dtypes[n], tuple(tensors[n].shape)) for n in order])
    return header + b"".join(tensors[n].numpy().tobytes() for n in order)


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    return fmt.tensors_digest(meta, [(name, str(t.dtype), tuple(t.shape),
                                      t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                                     for name, t in tensors.items()])


def key_bytes(key_e: KeyE, key_i: KeyI | None = None, passphrase: str | None = None,
              extra: dict[str, str] | None = None, recipient: str | None = None) -> bytes:
    """Serialise keys to the file format (deterministic when unencrypted): encrypted under
    ``passphrase``, or sealed to the age ``recipient`` (key_crypto.py), or neither."""
    if passphrase and recipient:
        raise ValueError("give a passphrase or a recipient, not both: a key file is encrypted one way")
    check_metadata(key_e, key_i)
    tensors = _tensors(key_e, key_i)
    meta = _metadata(key_e, key_i, extra or {})
    if passphrase:
        return key_crypto.seal_with_passphrase(meta, _encode(None, tensors), passphrase)
    if recipient:
        return key_crypto.seal_for_recipient(meta, _encode(None, tensors), recipient)
    meta[fmt.DIGEST] = _digest(meta, tensors)
    return _encode(meta, tensors)


def save_key(path: str | os.PathLike, key_e: KeyE, key_i: KeyI | None = None, passphrase: str | None = None,
             extra: dict[str, str] | None = None, recipient: str | None = None) -> Path:
    """Write a new key file, readable by its owner only, never replacing an existing file
    (FileExistsError); it appears complete or not at all (files.write_new_file)."""
    return write_new_file(path, key_bytes(key_e, key_i, passphrase, extra, recipient))


def save_next_key(folder: str | os.PathLike, prefix: str, key_e: KeyE, key_i: KeyI | None = None,
                  passphrase: str | None = None, extra: dict[str, str] | None = None,
                  recipient: str | None = None) -> Path:
    """Save under the next free ``prefix_NNNNN`` name; a name taken meanwhile (another
    process saving into the same folder) moves on to the next number."""
    data = key_bytes(key_e, key_i, passphrase, extra, recipient)
    while True:
        try:
            return write_new_file(next_key_path(folder, prefix), data)
        except FileExistsError:
            continue


# --- reading -------------------------------------------------------------------------
def _tensor(data: bytes, record: fmt.TensorRecord) -> torch.Tensor:
    dtype = torch.uint8 if record.dtype == "U8" else torch.float32
    return torch.frombuffer(bytearray(data[record.start:record.end]), dtype=dtype).reshape(record.shape)


def _checked(data: bytes, records: dict[str, fmt.TensorRecord], name: str, shape: tuple | None) -> torch.Tensor:
    record = records[name]
    latent_shape = len(record.shape) == 3 and record.shape[0] == 4
    if record.dtype != "F32" or (shape is not None and record.shape != shape) or (shape is None and not latent_shape):
        expected = f"float32 {shape}" if shape is not None else "float32 [4, height, width]"
        raise KeyFileError(f"the key file is damaged: its {name} is {record.dtype} {list(record.shape)}; "
                           f"a Diff-Privacy key has {expected}")
    if record.start == record.end:
        raise KeyFileError(f"the key file is damaged: its {name} is empty ({list(record.shape)})")
    t = _tensor(data, record)
    if not np.isfinite(t.numpy()).all():  # numpy: one thread, no pool to wake for a check
        raise KeyFileError(f"the key file is damaged: its {name} holds NaN or infinite values")
    return t


def _key_tensors(data: bytes, records: dict[str, fmt.TensorRecord]) -> dict[str, torch.Tensor]:
    names = set(records)
    key_e_names = {fmt.KEY_E_STAGES, fmt.KEY_E_UC}
    if not (names in (key_e_names, key_e_names | {fmt.KEY_I_LATENT})
            or names == key_e_names | {fmt.KEY_I_LATENT, fmt.KEY_I_BELOW}):
        raise KeyFileError(f"the key file is damaged: it holds the tensors {sorted(names)}; a key file holds "
                           f"{fmt.KEY_E_STAGES}, {fmt.KEY_E_UC} and, with key-I, {fmt.KEY_I_LATENT} (and "
                           f"{fmt.KEY_I_BELOW} for a bdia key-I)")
    tensors = {fmt.KEY_E_STAGES: _checked(data, records, fmt.KEY_E_STAGES, (STAGES, *EMBED_SHAPE)),
               fmt.KEY_E_UC: _checked(data, records, fmt.KEY_E_UC, (1, *EMBED_SHAPE))}
    if fmt.KEY_I_LATENT in records:
        tensors[fmt.KEY_I_LATENT] = _checked(data, records, fmt.KEY_I_LATENT, None)
    if fmt.KEY_I_BELOW in records:  # the same shape as the latent it lies below
        tensors[fmt.KEY_I_BELOW] = _checked(data, records, fmt.KEY_I_BELOW, records[fmt.KEY_I_LATENT].shape)
    return tensors


def _sub(meta: dict[str, str], prefix: str) -> dict[str, str]:
    return {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}


def _number(meta: dict[str, str], name: str) -> int | None:
    """A whole number written as the pack writes it ("50", never " 50" or "050")."""
    text = meta.get(name, "")
    return int(text) if 0 < len(text) <= 6 and text.isascii() and text.isdigit() and text == str(int(text)) else None


def _keys(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> tuple[KeyE, KeyI | None]:
    key_e = KeyE(tensors[fmt.KEY_E_STAGES], tensors[fmt.KEY_E_UC], _sub(meta, fmt.KEY_E_PREFIX))
    if fmt.KEY_I_LATENT not in tensors:
        return key_e, None
    latent = tensors[fmt.KEY_I_LATENT]
    key_i_meta = _sub(meta, fmt.KEY_I_PREFIX)
    if meta["version"] == "1":
        key_i_meta[fmt.PAIR] = key_e_id(key_e)  # version 1 bound the pair by holding it in one verified file
    steps, inversion, refine = _number(meta, "steps"), meta.get("inversion"), _number(meta, "refine")
    if steps is None or refine is None or not 1 <= steps <= T or not 0 <= refine <= MAX_REFINE \
            or inversion not in fmt.INVERSIONS:
        raise KeyFileError("the key file is damaged: its key-I settings (steps, inversion, refine) are missing "
                           "or unreadable")
    below = tensors.get(fmt.KEY_I_BELOW)
    if (below is not None) != (inversion == fmt.BDIA):
        raise KeyFileError(f"the key file is damaged: a bdia key-I holds {fmt.KEY_I_BELOW} and no other key-I does, "
                           f"but this {inversion} key-I {'holds' if below is not None else 'lacks'} it")
    if inversion == fmt.BDIA and (steps < 2 or refine != 0):
        raise KeyFileError("the key file is damaged: a bdia key-I has at least 2 steps and no refinements "
                           f"(this one: {steps} steps, refine {refine})")
    if key_i_meta.get(fmt.GRID) not in (None, ddim_grid(steps).describe()):
        raise KeyFileError(f"this key-I was made on another timestep grid ({steps} steps); it cannot be "
                           "recovered with this version of the pack")
    key_i = KeyI(latent, steps, inversion, refine, key_i_meta, below=below)
    return key_e, key_i


def load_key_bytes(data: bytes, passphrase: str | None = None,
                   identities: list | None = None) -> tuple[KeyE, KeyI | None, dict[str, str]]:
    """Parse and verify a key file: (key-E, key-I or None, metadata), opened with the
    passphrase or an age identity when it is encrypted. Every failure is a KeyFileError
    whose message says what is wrong."""
    container = fmt.read_container(data)
    meta = container.meta
    if key_crypto.is_encrypted(meta):
        plain, inner = key_crypto.decrypt_payload(data, container, passphrase, identities)
        tensors = _key_tensors(plain, inner.tensors)
    else:
        if passphrase:
            raise KeyFileError("this key file is not encrypted, but a passphrase was given: leave the passphrase "
                               "empty for it (or it was tampered with to drop its encryption)")
        if key_crypto.PUBLIC_ENCRYPTION_FIELDS & set(meta):
            raise KeyFileError("the key file was modified: it holds encryption fields but is not encrypted")
        tensors = _key_tensors(data, container.tensors)
        if meta.get(fmt.DIGEST) != _digest({k: v for k, v in meta.items() if k != fmt.DIGEST}, tensors):
            raise KeyFileError("the key file was modified or damaged (integrity check failed)")
    key_e, key_i = _keys(meta, tensors)
    check_metadata(key_e, key_i)
    if fmt.CROP_META in meta:
        _check_crop(meta[fmt.CROP_META], key_i)
    return key_e, key_i, meta


def _check_crop(text: str, key_i: KeyI | None) -> None:
    """A face key's geometry is bounded, and its key-I is a latent of the crop's size."""
    crop = fmt.checked_face_crop(text)
    side = crop["size"] // VAE_FACTOR
    if key_i is not None and tuple(key_i.latent.shape[-2:]) != (side, side):
        raise KeyFileError(f"the key file is damaged: its key-I is {key_i.latent.shape[-1]} x "
                           f"{key_i.latent.shape[-2]}, but its face crop works at {crop['size']} px ({side} x {side})")


def load_key(path: str | os.PathLike, passphrase: str | None = None,
             identities: list | None = None) -> tuple[KeyE, KeyI | None, dict[str, str]]:
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise KeyFileError(f"{path.name} is a partial file left by an interrupted save, not a key file")
    if path.stat().st_size > fmt.MAX_FILE_BYTES:
        raise KeyFileError(f"{path.name} is not a key file: far larger than any key")
    return load_key_bytes(path.read_bytes(), passphrase, identities)


def model_fingerprint(named_tensors, samples_per_tensor: int = 64) -> str:
    """A short, dtype-independent fingerprint of a network's weights.

    Recovery needs the exact UNet the keys were made with. Hashing every weight of a real
    checkpoint would cost seconds, so each tensor contributes its name, shape and a fixed,
    evenly spaced sample of its values rounded to float16 (the same whether the checkpoint
    is loaded in fp16 or fp32).
    """
    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, max(flat.numel() - 1, 0), min(samples_per_tensor, flat.numel())).long()
        sample = flat[idx.to(flat.device)].float().cpu().to(torch.float16)
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# --- names ---------------------------------------------------------------------------
def safe_join(folder: str | os.PathLike, name: str) -> Path:
    """``folder/name``, refusing any name that could leave the folder (absolute paths,
    '..', backslashes, NUL, links pointing outside)."""
    if not name or "\x00" in name or "\\" in name or os.path.isabs(name) or ".." in Path(name).parts:
        raise ValueError(f"invalid key file name {name!r}: use a plain name or sub/folder/name inside the key folder")
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if root != path and root not in path.parents:
        raise ValueError(f"invalid key file name {name!r}: it points outside {root}")
    return path


def next_key_path(folder: str | os.PathLike, prefix: str) -> Path:
    """The next free ``prefix_00001.dpkey.safetensors`` (numbered like ComfyUI's images).

    Taken names are compared as plain strings (no glob: a prefix with '[' or '*' is just a
    name). The prefix must end in a file name inside the folder: '.', 'sub/' or 'sub/..'
    do not."""
    parts = prefix.replace("\\", "/").split("/")
    if not parts[-1] or parts[-1] in (".", "..") or parts[-1].startswith("."):
        raise ValueError(f"invalid key file prefix {prefix!r}: it must end in a file name (not '.', '..', a "
                         "hidden name or a folder), e.g. diffprivacy/key")
    hidden = [c for c in prefix if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    if hidden or any(part.startswith("~") for part in parts):
        raise ValueError(f"invalid key file prefix {prefix!r}: " + (
            f"it holds the invisible or control character U+{ord(hidden[0]):04X}, which would disguise the name"
            if hidden else "a name starting with '~' reads as a home folder"))
    base = safe_join(folder, prefix)
    base.parent.mkdir(parents=True, exist_ok=True)
    start, end = f"{base.name}_", KEY_SUFFIX
    taken = set()
    for name in os.listdir(base.parent):
        number = name[len(start):-len(end)]
        if name.startswith(start) and name.endswith(end) and number.isascii() and number.isdigit():
            taken.add(int(number))
    counter = 1
    while counter in taken:
        counter += 1
    return base.parent / f"{base.name}_{counter:05d}{KEY_SUFFIX}"
