"""Encrypted key files, torch-free: the nodes write them, the `diffpriv` command opens and
seals them on the user's machine, so that nothing that opens a key reaches a server.

Both modes encrypt the serialised tensors with AES-256-GCM, with the exact header bytes
of the file as the associated data (the public metadata cannot be changed either):

- **passphrase** (``kdf`` "scrypt"): the AES key is derived from the passphrase by scrypt
  with the settings of the file's version (key_format.SCRYPT);
- **recipient** (``kdf`` "age-x25519"): the AES key is random, and sealed to an age X25519
  recipient (``age1...``, age's published format through pyrage) in the header's
  ``age.wrapped``; only the matching identity (``AGE-SECRET-KEY-1...``) opens it. A server
  can so write keys it can never open again.

Identity files (``diffpriv keygen``) are age's own: the identity, encrypted with a
passphrase by age's scrypt recipient, so `age -d` opens them too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import key_format as fmt
from .files import write_new_file
from .key_format import KeyFileError

AGE_KDF = "age-x25519"
AGE_FIELDS = ("encryption", "kdf", "age.recipient", "age.wrapped", "nonce")
MAX_WRAPPED_BYTES = 2048  # an AES key sealed to one recipient is about 400 bytes
MAX_RECIPIENT_CHARS = 100  # age1 + 58 bech32 characters
IDENTITY_PREFIX = "AGE-SECRET-KEY-1"
MAX_IDENTITY_FILE_BYTES = 64 * 1024


# --- recipients and identities --------------------------------------------------------
def check_recipient(text: str):
    """The age X25519 recipient ``text`` names; ValueError in plain words otherwise."""
    from pyrage import RecipientError, x25519

    if not isinstance(text, str) or not text.startswith("age1") or len(text) > MAX_RECIPIENT_CHARS:
        raise ValueError(f"{str(text)[:20]!r} is not an age recipient: it starts with age1 (diffpriv keygen prints one)")
    try:
        return x25519.Recipient.from_str(text)
    except RecipientError as exc:
        raise ValueError(f"{text[:20]}... is not a valid age recipient ({exc})") from None


def new_identity():
    from pyrage import x25519

    return x25519.Identity.generate()


def write_identity_file(path: str | os.PathLike, passphrase: str) -> str:
    """A new identity, written encrypted under ``passphrase`` to a NEW owner-only file at
    ``path`` (never replacing one); returns its recipient, for ``--recipient``."""
    from pyrage import passphrase as age_passphrase

    if not passphrase:
        raise ValueError("an identity file needs a passphrase")
    identity = new_identity()
    recipient = str(identity.to_public())
    text = f"# diffpriv identity: opens the key files sealed to it\n# public key: {recipient}\n{identity}\n"
    write_new_file(path, age_passphrase.encrypt(text.encode(), fmt.normalise_passphrase(passphrase).decode()))
    return recipient


def read_identity_file(path: str | os.PathLike, passphrase: str):
    """The identity in an identity file (passphrase-protected, or plain age-keygen output)."""
    from pyrage import DecryptError, IdentityError, x25519
    from pyrage import passphrase as age_passphrase

    path = Path(path)
    data = path.read_bytes()[:MAX_IDENTITY_FILE_BYTES + 1]
    if len(data) > MAX_IDENTITY_FILE_BYTES:
        raise ValueError(f"{path} is not an identity file: far too large")
    if data.startswith(b"age-encryption.org/"):
        if not passphrase:
            raise ValueError(f"{path} is protected by a passphrase: give it with --passphrase-env")
        try:
            data = age_passphrase.decrypt(data, fmt.normalise_passphrase(passphrase).decode())
        except DecryptError:
            raise ValueError(f"wrong passphrase for the identity file {path}, or the file was modified") from None
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines()]
    secrets = [line for line in lines if line.startswith(IDENTITY_PREFIX)]
    if len(secrets) != 1:
        raise ValueError(f"{path} is not an identity file: it holds no {IDENTITY_PREFIX}... line (or several)")
    try:
        return x25519.Identity.from_str(secrets[0])
    except IdentityError:
        raise ValueError(f"{path} holds a damaged identity") from None


# --- sealing ---------------------------------------------------------------------------
def seal_with_passphrase(meta: dict[str, str], payload: bytes, passphrase: str) -> bytes:
    """An encrypted key file: ``meta`` (the public metadata) and the serialised tensors."""
    salt = os.urandom(16)
    meta = dict(meta, encryption=fmt.ENCRYPTION, kdf=fmt.KDF, **{
        "kdf.params": json.dumps(fmt.SCRYPT[meta["version"]]), "kdf.salt": salt.hex()})
    return _seal(meta, payload, derive(passphrase, salt, meta["version"]))


def seal_for_recipient(meta: dict[str, str], payload: bytes, recipient: str) -> bytes:
    """An encrypted key file only the identity of ``recipient`` opens."""
    import pyrage

    data_key = os.urandom(32)
    wrapped = pyrage.encrypt(data_key, [check_recipient(recipient)])
    meta = dict(meta, encryption=fmt.ENCRYPTION, kdf=AGE_KDF, **{"age.recipient": recipient,
                                                                 "age.wrapped": wrapped.hex()})
    return _seal(meta, payload, data_key)


def _seal(meta: dict[str, str], payload: bytes, key: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    meta = dict(meta, nonce=nonce.hex())
    # The header depends only on the ciphertext's length (the payload plus the 16-byte tag),
    # so it is written first and authenticated byte for byte.
    header = fmt.encode_header(meta, [(fmt.CIPHERTEXT, "U8", (len(payload) + 16,))])
    return header + AESGCM(key).encrypt(nonce, payload, header)


def derive(passphrase: str, salt: bytes, version: str) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    # Version 1 derived from the passphrase's UTF-8 as typed; later versions normalise it.
    secret = passphrase.encode("utf-8") if version == "1" else fmt.normalise_passphrase(passphrase)
    return Scrypt(salt=salt, length=32, **fmt.SCRYPT[version]).derive(secret)


# --- opening ---------------------------------------------------------------------------
def is_encrypted(meta: dict[str, str]) -> bool:
    return "encryption" in meta


def decrypt_payload(data: bytes, container: fmt.Container, passphrase: str | None = None,
                    identities: list | None = None) -> tuple[bytes, fmt.Container]:
    """(the serialised tensors, their container) of an encrypted key file, authenticated."""
    return _open(data, container, passphrase, identities)


def _open(data: bytes, container: fmt.Container, passphrase, identities) -> tuple[bytes, fmt.Container]:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    meta = container.meta
    sealed = container.tensors.get(fmt.CIPHERTEXT)
    if set(container.tensors) != {fmt.CIPHERTEXT} or sealed.dtype != "U8" or len(sealed.shape) != 1:
        raise KeyFileError("the encrypted key file is damaged: it has no ciphertext, or more than one")
    key = _recipient_key(meta, identities) if meta.get("kdf") == AGE_KDF else _passphrase_key(meta, passphrase)
    try:
        nonce = bytes.fromhex(meta["nonce"])
    except ValueError:
        raise KeyFileError("the encrypted key file is damaged: its nonce is not hexadecimal") from None
    if len(nonce) != 12:
        raise KeyFileError("the encrypted key file is damaged: its nonce has the wrong length")
    associated = container.header if meta["version"] != "1" else fmt.canonical_json(meta).encode()
    try:
        plain = AESGCM(key).decrypt(nonce, data[sealed.start:sealed.end], associated)
    except InvalidTag:
        raise KeyFileError("wrong passphrase, or the key file was modified" if meta.get("kdf") == fmt.KDF else
                           "the key file was modified (its identity opened, its contents did not)") from None
    try:
        return plain, fmt.read_container(plain, with_metadata=False)
    except KeyFileError as exc:
        raise KeyFileError(f"the encrypted part of the key file is damaged: {exc}") from None


def _fields_are(meta: dict[str, str], fields: tuple[str, ...], kdf: str) -> None:
    present = {k for k in meta if k in fmt.ENCRYPTED_FIELDS or k in AGE_FIELDS}
    if present != set(fields) or meta["encryption"] != fmt.ENCRYPTION:
        raise KeyFileError(f"the key file is damaged: its encryption fields are not those of {fmt.ENCRYPTION} "
                           f"with {kdf}")


def _passphrase_key(meta: dict[str, str], passphrase: str | None) -> bytes:
    _fields_are(meta, fmt.ENCRYPTED_FIELDS, fmt.KDF)
    if not passphrase:
        raise KeyFileError("this key file is encrypted: a passphrase is required")
    version = meta["version"]
    # The file's scrypt settings must be its version's: a file never chooses how costly a
    # derivation is (they are checked before deriving, authenticated after).
    if meta["kdf.params"] != json.dumps(fmt.SCRYPT[version]):
        raise KeyFileError(f"the encrypted key file is damaged: its scrypt settings {meta['kdf.params']} are not "
                           f"the ones version {version} writes ({json.dumps(fmt.SCRYPT[version])})")
    try:
        salt = bytes.fromhex(meta["kdf.salt"])
    except ValueError:
        raise KeyFileError("the encrypted key file is damaged: its salt is not hexadecimal") from None
    if len(salt) != 16:
        raise KeyFileError("the encrypted key file is damaged: its salt has the wrong length")
    return derive(passphrase, salt, version)


def _recipient_key(meta: dict[str, str], identities: list | None) -> bytes:
    import pyrage

    _fields_are(meta, AGE_FIELDS, AGE_KDF)
    if meta["version"] in ("1", "2"):
        raise KeyFileError(f"the key file is damaged: version {meta['version']} files have no recipients")
    recipient = meta["age.recipient"]
    if not identities:
        raise KeyFileError(f"this key file is sealed to the recipient {recipient[:16]}...: only its identity file "
                           "opens it, on your own machine (diffpriv recover --identity FILE)")
    text = meta["age.wrapped"]
    if len(text) > 2 * MAX_WRAPPED_BYTES:
        raise KeyFileError("the encrypted key file is damaged: its sealed key is far too long")
    try:
        wrapped = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError("the encrypted key file is damaged: its sealed key is not hexadecimal") from None
    try:
        key = pyrage.decrypt(wrapped, list(identities))
    except pyrage.DecryptError:
        raise KeyFileError(f"this key file is encrypted to {recipient[:16]}..., which the identity given does not "
                           "open (another identity), or the key file was modified") from None
    if len(key) != 32:
        raise KeyFileError("the encrypted key file is damaged: its sealed key is not an AES-256 key")
    return key


# --- what the command does with them ---------------------------------------------------
PUBLIC_ENCRYPTION_FIELDS = set(fmt.ENCRYPTED_FIELDS) | set(AGE_FIELDS)


def decrypted_file(data: bytes, passphrase: str | None = None, identities: list | None = None) -> bytes:
    """An encrypted key file as the unencrypted key file it holds (same metadata, a digest);
    an unencrypted file unchanged. For the one server trusted with it: the embedded one."""
    container = fmt.read_container(data)
    if not is_encrypted(container.meta):
        return data
    payload, inner = decrypt_payload(data, container, passphrase, identities)
    meta = {k: v for k, v in container.meta.items() if k not in PUBLIC_ENCRYPTION_FIELDS}
    return fmt.plain_file(meta, payload, inner)


def resealed_with_passphrase(data: bytes, identities: list, passphrase: str) -> bytes:
    """A key file sealed (by a server) to a recipient of ours, sealed anew under the
    passphrase on this machine: the server never saw the passphrase."""
    container = fmt.read_container(data)
    if container.meta.get("kdf") != AGE_KDF:
        raise KeyFileError("the server sent a key file that is not sealed to this run's recipient")
    payload, _inner = decrypt_payload(data, container, None, identities)
    meta = {k: v for k, v in container.meta.items() if k not in PUBLIC_ENCRYPTION_FIELDS}
    return seal_with_passphrase(meta, payload, passphrase)
