"""Checks made before anything is queued: the inputs (folders expanded, missing paths, the
photos and key files read here), the model files a workflow loads, and the fingerprints of
those the command can read.

The server checks read a loader's file list from ``/object_info/<class_type>``: the server
lists exactly the files its loaders accept (extra_model_paths.yaml included).

Whether a photo shows a face is left to the server: finding faces needs the detector
(torch), which this client does not import. In the default every-face workflows all the
costly work (MSI, sampling) waits for Face Detect, so a photo without a face fails within
seconds of its turn.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from diffpriv_core.frame import msi_size_problem
from diffpriv_core import key_crypto
from diffpriv_core.key_format import KeyFileError, read_container, read_public_metadata

from .comfy_http import ComfyClient
from .graphs import MODEL_INPUTS
from .pictures import PhotoError, read_photo

WHERE_TO_GET = {
    "checkpoints": "a Stable Diffusion 1.5 checkpoint, from the SD 1.5 model card: "
                   "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 "
                   "(v1-5-pruned-emaonly.safetensors; CreativeML OpenRAIL-M licence)",
    "clip_vision": "the OpenAI CLIP ViT-L/14 image encoder: https://huggingface.co/openai/clip-vit-large-patch14 "
                   "(model.safetensors, saved under the name the workflow uses; MIT licence)",
}


class PreflightError(RuntimeError):
    """Something the user must fix before the batch can run; the message says what."""


# What a folder given as IMAGE stands for: the pictures inside (ComfyUI's Load Image reads them).
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class Inputs:
    found: list[Path] = field(default_factory=list)  # files to read, in the order given (folders sorted)
    missing: dict[Path, str] = field(default_factory=dict)  # paths refused at once, with the reason


def collect_inputs(paths: list[Path], suffixes: tuple[str, ...], kind: str) -> Inputs:
    """The files the paths name: a file itself, a folder every file inside whose name ends
    with one of ``suffixes`` (sub-folders too, sorted), printed as such. A missing path, or a
    folder with none, is refused alone; a file given twice is taken once."""
    inputs, seen = Inputs(), set()
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.name.lower().endswith(suffixes) and p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            print(f"{path}/: {len(inside)} {kind}{'s' * (len(inside) != 1)} ({', '.join(suffixes)}, sub-folders too)")
            if not inside:
                inputs.missing[path] = f"a folder without any {kind} ({', '.join(suffixes)})"
            files = inside
        elif path.exists() and not path.is_file():
            inputs.missing[path] = "not a file or folder"
            continue
        elif not path.exists():
            inputs.missing[path] = "no such file or folder"
            continue
        else:
            files = [path]
        for file in files:
            if (resolved := file.resolve()) not in seen:
                seen.add(resolved)
                inputs.found.append(file)
    return inputs


def photo_problem(path: Path, whole_image: bool) -> str | None:
    """Why the server could not protect this photo, or None: not a picture the command can
    send (pictures.read_photo: unreadable, cut off, several frames, ...), or (when MSI trains
    on the whole photo) a size MSI cannot take. The limits hold for either orientation, so
    an EXIF rotation changes nothing."""
    try:
        width, height = read_photo(path).size
    except PhotoError as exc:
        return str(exc)
    return msi_size_problem(height, width) if whole_image else None


def refused_photos(photos: list[Path], whole_image: bool) -> dict[Path, str]:
    """{photo: reason} for every photo of the batch the server could not protect."""
    return {path: problem for path in photos if (problem := photo_problem(path, whole_image))}


def key_problem(path: Path, passphrase: bool, identity: bool) -> str | None:
    """Why a key file cannot be recovered with what was given, read from its header alone:
    not a key file, encrypted without its passphrase or identity, or plain with a passphrase."""
    try:
        meta = read_public_metadata(path)
    except (KeyFileError, OSError) as exc:
        return f"not a key file ({exc})"
    if not key_crypto.is_encrypted(meta):
        return ("the key file is not encrypted, but a passphrase was given: recover it without --passphrase-env"
                if passphrase else None)
    if meta.get("kdf") == key_crypto.AGE_KDF:
        return None if identity else ("the key file is sealed to a recipient: give its identity file with "
                                      "--identity FILE")
    return None if passphrase else "the key file is encrypted: give its passphrase with --passphrase-env VAR"


def refused_keys(keys: list[Path], passphrase: bool, identity: bool) -> dict[Path, str]:
    return {path: problem for path in keys if (problem := key_problem(path, passphrase, identity))}


def check_passphrase(keys: list[Path], open_key, passphrase: bool, identity: bool) -> None:
    """Open the first encrypted key that what was given should open (``open_key(data)``, as the
    command will), here, before any server starts: a wrong passphrase or identity stops the
    command at once (each further key costs a second of scrypt, so the others are opened as
    their turn comes, and one that does not open fails alone)."""
    for path in keys:
        if key_problem(path, passphrase, identity) is not None:
            continue  # refused alone, with its reason (refused_keys)
        try:
            data = path.read_bytes()
            if not key_crypto.is_encrypted(read_container(data).meta):
                continue
            open_key(data)
        except KeyFileError as exc:
            raise PreflightError(f"{path}: {exc} (checked here, before starting any server)") from None
        except OSError:
            continue
        return


# Sampled fingerprint of a model file: its size and these blocks (the first and last 4 MiB
# and 16 spread between): cheap on a 4 GB checkpoint, and any other file differs.
EDGE_BYTES = 4 << 20
SAMPLE_BYTES = 64 << 10
SAMPLES = 16


def file_fingerprint(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        offsets = [0, max(size - EDGE_BYTES, 0)] + [size * k // (SAMPLES + 1) for k in range(1, SAMPLES + 1)]
        for offset in offsets:
            fh.seek(offset)
            h.update(fh.read(EDGE_BYTES if offset in offsets[:2] else SAMPLE_BYTES))
    return f"sampled-sha256:{h.hexdigest()[:32]}"


def model_fingerprints(graph: dict, models_dir: Path | None) -> dict[str, str]:
    """{folder/file: fingerprint} of every model file the graph loads (checkpoints, CLIP
    vision, face recognisers); a file this machine cannot read (another server's) is named
    only."""
    wanted = [f"{folder}/{name}" for class_type, (input_name, folder) in MODEL_INPUTS.items()
              for node in graph.values() if node.get("class_type") == class_type
              and isinstance(name := node.get("inputs", {}).get(input_name), str)]
    wanted += [name for node in graph.values() if node.get("class_type") == "DiffPrivacyFaceRecognizerLoader"
               and isinstance(name := node.get("inputs", {}).get("model_name"), str)]
    found = {}
    for rel in sorted(set(wanted)):
        path = models_dir / rel if models_dir is not None else None
        found[rel] = file_fingerprint(path) if path is not None and path.is_file() else "name only"
    return found


def loader_options(client: ComfyClient, class_type: str, input_name: str) -> list[str]:
    """The choices a loader node offers for one input (its file list)."""
    info = client.get(f"/object_info/{class_type}").get(class_type)
    if info is None:
        raise PreflightError(f"{client.base_url} has no {class_type} node: is the Diff-Privacy pack installed there?")
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    spec = inputs[input_name]
    # Classic nodes list the choices first; schema (V3) nodes say "COMBO" and pass them as options.
    return list(spec[0]) if isinstance(spec[0], list) else list(spec[1].get("options", []))


def check_models(client: ComfyClient, wanted: dict[str, set[str]], models_dir: Path | None,
                 demo_hint: str) -> None:
    """Stop with the exact files, folders and sources when the server lacks a model the graph loads."""
    loaders = {folder: (class_type, input_name) for class_type, (input_name, folder) in MODEL_INPUTS.items()}
    missing = {folder: sorted(names - set(loader_options(client, *loaders[folder])))
               for folder, names in wanted.items()}
    missing = {folder: names for folder, names in missing.items() if names}
    if not missing:
        return
    where = str(models_dir) if models_dir else f"the models folder of the server at {client.base_url}"
    lines = [f"Missing model files on {client.base_url}:"]
    for folder, names in missing.items():
        lines += [f"  {folder}/{name}" for name in names]
    lines.append(f"Put them in {where} (sub-folders above, or a folder extra_model_paths.yaml adds), then rerun.")
    lines += [f"  {folder}: {WHERE_TO_GET[folder]}" for folder in missing]
    lines.append(f"To try the pipeline without them: {demo_hint} (random weights: meaningless pictures).")
    raise PreflightError("\n".join(lines))
