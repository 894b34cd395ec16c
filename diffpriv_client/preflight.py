"""Checks made before anything is queued: the photos (read here) and the model files a
workflow loads.

The server checks read a loader's file list from ``/object_info/<class_type>``: the server
lists exactly the files its loaders accept (extra_model_paths.yaml included).

Whether a photo shows a face is left to the server: finding faces needs the detector
(torch), which this client does not import. In the default every-face workflows all the
costly work (MSI, sampling) waits for Face Detect, so a photo without a face fails within
seconds of its turn.
"""
from __future__ import annotations

from pathlib import Path

from diffpriv_core.frame import msi_size_problem

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


def refused_photos(photos: dict[str, Path], whole_image: bool) -> dict[str, str]:
    """{name: reason} for every photo of the batch the server could not protect."""
    return {name: problem for name, path in photos.items() if (problem := photo_problem(path, whole_image))}


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
