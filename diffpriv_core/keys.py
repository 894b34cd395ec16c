"""Key files: key-E, key-I and their metadata in one safetensors file.

No pickle anywhere. Unencrypted files carry a SHA-256 digest over metadata and tensors, so
damage or tampering is refused before any compute. With a passphrase the tensors are
serialised, then encrypted with AES-256-GCM under a key derived by scrypt (memory-hard);
the public metadata is the AEAD's associated data, so it cannot be altered either. A
stolen encrypted key file reveals only its metadata (task, step count, image size).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .key_types import EMBED_SHAPE, KeyE, KeyI
from .schedule import STAGES

FORMAT = "diffprivacy-key"
VERSION = "1"
SCRYPT = {"n": 2**15, "r": 8, "p": 1}  # 32 MiB, about 0.1 s: cheap once, costly to brute-force
MAX_FILE_BYTES = 64 * 2**20  # a key is ~2.4 MB (key-E) + the latent; refuse anything absurd
# All metadata goes in ONE safetensors metadata entry: the container stores its entries in
# an unordered map, so several entries would make the bytes differ from run to run.
META_KEY = "diffprivacy"


class KeyFileError(ValueError):
    """A key file that cannot be used: damaged, tampered, wrong passphrase, not a key."""


def _canonical(meta: dict[str, str]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(_canonical(meta))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _derive(passphrase: str, salt: bytes, params: dict) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, **params).derive(passphrase.encode("utf-8"))


def _tensors(key_e: KeyE, key_i: KeyI | None) -> dict[str, torch.Tensor]:
    tensors = {"key_e.stages": key_e.stages.detach().float().cpu().contiguous(),
               "key_e.uc": key_e.uc.detach().float().cpu().contiguous()}
    if key_i is not None:
        tensors["key_i.latent"] = key_i.latent.detach().float().cpu().contiguous()
    return tensors


def _metadata(key_e: KeyE, key_i: KeyI | None, extra: dict[str, str]) -> dict[str, str]:
    meta = {f"key_e.{k}": str(v) for k, v in key_e.meta.items()}
    if key_i is not None:
        meta.update({f"key_i.{k}": str(v) for k, v in key_i.meta.items()})
        meta.update({"steps": str(key_i.steps), "inversion": key_i.inversion, "refine": str(key_i.refine)})
    meta.update({k: str(v) for k, v in extra.items()})
    meta.update({"format": FORMAT, "version": VERSION})
    return meta


def key_bytes(key_e: KeyE, key_i: KeyI | None = None, passphrase: str | None = None,
              extra: dict[str, str] | None = None) -> bytes:
    """Serialise keys to the file format (deterministic when unencrypted)."""
    tensors = _tensors(key_e, key_i)
    meta = _metadata(key_e, key_i, extra or {})
    if not passphrase:
        meta["digest"] = _digest(meta, tensors)
        return save_bytes(tensors, metadata={META_KEY: _canonical(meta).decode()})
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt, nonce = os.urandom(16), os.urandom(12)
    meta.update({"encryption": "aes-256-gcm", "kdf": "scrypt", "kdf.params": json.dumps(SCRYPT),
                 "kdf.salt": salt.hex(), "nonce": nonce.hex()})
    sealed = AESGCM(_derive(passphrase, salt, SCRYPT)).encrypt(nonce, save_bytes(tensors), _canonical(meta))
    return save_bytes({"ciphertext": torch.frombuffer(bytearray(sealed), dtype=torch.uint8)},
                      metadata={META_KEY: _canonical(meta).decode()})


def save_key(path: str | os.PathLike, key_e: KeyE, key_i: KeyI | None = None, passphrase: str | None = None,
             extra: dict[str, str] | None = None) -> Path:
    """Write a key file atomically, readable by its owner only."""
    path = Path(path)
    data = key_bytes(key_e, key_i, passphrase, extra)
    tmp = path.with_name(f".{path.name}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _read(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse the safetensors container; any malformed input becomes a KeyFileError."""
    if len(data) < 8:
        raise KeyFileError("not a key file: it is truncated or empty")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8 or header_len > 1 << 20:
        raise KeyFileError("not a key file: its header is damaged or truncated")
    try:
        meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"][META_KEY])
        tensors = load_bytes(data)
    except (KeyError, TypeError):
        raise KeyFileError("not a Diff-Privacy key file (no 'diffprivacy-key' format tag)") from None
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError, RuntimeError) as exc:
        raise KeyFileError(f"not a key file: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not all(isinstance(v, str) for v in meta.values()):
        raise KeyFileError("not a Diff-Privacy key file (no 'diffprivacy-key' format tag)")
    if meta.get("version") != VERSION:
        raise KeyFileError(f"key file version {meta.get('version')!r} is not supported (this pack reads {VERSION})")
    return tensors, meta


def _decrypt(tensors: dict[str, torch.Tensor], meta: dict[str, str], passphrase: str | None) -> dict[str, torch.Tensor]:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not passphrase:
        raise KeyFileError("this key file is encrypted: a passphrase is required")
    sealed = tensors.get("ciphertext")
    if sealed is None or sealed.dtype != torch.uint8 or meta.get("kdf") != "scrypt":
        raise KeyFileError("the encrypted key file is damaged (no ciphertext)")
    try:
        params = json.loads(meta["kdf.params"])
        # The metadata is only authenticated after derivation, so a file must not choose
        # the cost of deriving: only the parameters this pack writes are accepted.
        if params != SCRYPT:
            raise ValueError(f"scrypt parameters {params} are not the ones this pack writes ({SCRYPT})")
        key = _derive(passphrase, bytes.fromhex(meta["kdf.salt"]), params)
        plain = AESGCM(key).decrypt(bytes.fromhex(meta["nonce"]), sealed.numpy().tobytes(), _canonical(meta))
    except InvalidTag:
        raise KeyFileError("wrong passphrase, or the key file was modified") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise KeyFileError(f"the encrypted key file is damaged: {exc}") from None
    try:
        return load_bytes(plain)
    except (SafetensorError, ValueError) as exc:
        raise KeyFileError(f"the decrypted payload is damaged: {exc}") from None


def _checked(tensors: dict[str, torch.Tensor], name: str, shape: tuple | None, ndim: int | None = None) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise KeyFileError(f"the key file has no {name}")
    if t.dtype != torch.float32 or (shape is not None and tuple(t.shape) != shape) or (ndim is not None and t.ndim != ndim):
        expected = f"float32 {shape}" if shape is not None else f"float32 with {ndim} dimensions"
        raise KeyFileError(f"{name} has dtype {t.dtype} and shape {tuple(t.shape)}; a Diff-Privacy key has {expected}")
    if not torch.isfinite(t).all():
        raise KeyFileError(f"{name} holds NaN or infinite values")
    return t


def _sub(meta: dict[str, str], prefix: str) -> dict[str, str]:
    return {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}


def load_key_bytes(data: bytes, passphrase: str | None = None) -> tuple[KeyE, KeyI | None, dict[str, str]]:
    """Parse and verify a key file: (key-E, key-I or None, metadata)."""
    if len(data) > MAX_FILE_BYTES:
        raise KeyFileError(f"not a key file: {len(data)} bytes is far larger than any key")
    tensors, meta = _read(data)
    if "encryption" in meta:
        tensors = _decrypt(tensors, meta, passphrase)
    else:
        body = {k: v for k, v in meta.items() if k != "digest"}
        if meta.get("digest") != _digest(body, tensors):
            raise KeyFileError("the key file was modified or damaged (integrity check failed)")
    key_e = KeyE(_checked(tensors, "key_e.stages", (STAGES, *EMBED_SHAPE)),
                 _checked(tensors, "key_e.uc", (1, *EMBED_SHAPE)), _sub(meta, "key_e."))
    key_i = None
    if "key_i.latent" in tensors:
        latent = _checked(tensors, "key_i.latent", None, ndim=3)
        try:
            key_i = KeyI(latent, int(meta["steps"]), meta["inversion"], int(meta["refine"]), _sub(meta, "key_i."))
        except (KeyError, ValueError) as exc:
            raise KeyFileError(f"the key file's key-I is unusable: {exc}") from None
    return key_e, key_i, meta


def load_key(path: str | os.PathLike, passphrase: str | None = None) -> tuple[KeyE, KeyI | None, dict[str, str]]:
    path = Path(path)
    if path.stat().st_size > MAX_FILE_BYTES:
        raise KeyFileError(f"{path.name} is not a key file: far larger than any key")
    return load_key_bytes(path.read_bytes(), passphrase)


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


KEY_SUFFIX = ".dpkey.safetensors"


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
    """The next free ``prefix_00001.dpkey.safetensors`` (numbered like ComfyUI's images)."""
    base = safe_join(folder, prefix)
    base.parent.mkdir(parents=True, exist_ok=True)
    taken = {p.name for p in base.parent.glob(f"{base.name}_*{KEY_SUFFIX}")}
    counter = 1
    while f"{base.name}_{counter:05d}{KEY_SUFFIX}" in taken:
        counter += 1
    return base.parent / f"{base.name}_{counter:05d}{KEY_SUFFIX}"
