"""Face model files (recognisers, detectors) in ComfyUI's model folders."""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from diffpriv_core.faces.model_files import KnownModel, find_face_model
from diffpriv_core.faces.wheel_models import CENTERFACE

FACE_MODEL_FOLDERS = ("sface", "arcface", "insightface", "facenet")
# The setup installs the recognisers that ship in PyPI wheels into the models folder of the
# ComfyUI installation; a server started with --base-directory elsewhere looks there too.
INSTALL_MODELS_DIR = os.path.join(os.path.dirname(os.path.realpath(folder_paths.__file__)), "models")

for _folder in FACE_MODEL_FOLDERS:
    # add_model_folder_path merges with folders other packs or extra_model_paths.yaml added.
    for _models_dir in dict.fromkeys((folder_paths.models_dir, INSTALL_MODELS_DIR)):
        folder_paths.add_model_folder_path(_folder, os.path.join(_models_dir, _folder))
# CenterFace, the face detector the setup installs, lives where face detectors of other
# packs (facexlib's) do; it is looked for there only, never offered as a recogniser.
for _models_dir in dict.fromkeys((folder_paths.models_dir, INSTALL_MODELS_DIR)):
    folder_paths.add_model_folder_path(CENTERFACE.folder, os.path.join(_models_dir, CENTERFACE.folder))


def model_options(accepts, known: tuple[KnownModel, ...]) -> list[str]:
    """"<folder>/<file>" for every file ``accepts`` found, plus the usual files (picking a
    missing one runs into the error that says where to get it)."""
    found = {f"{key}/{name}" for key in FACE_MODEL_FOLDERS for name in folder_paths.get_filename_list(key)
             if accepts(Path(name))}
    return sorted(found | {f"{m.folder}/{m.path}" for m in known})


def resolve_model(option: str, find) -> Path:
    """The file an option names; else the file name searched for (``find(name, folders)``)
    in every face model folder, in all the layouts users end up with."""
    key, _, name = option.partition("/")
    if key in FACE_MODEL_FOLDERS:
        path = folder_paths.get_full_path(key, name)
        if path is not None:
            return Path(path)
    folders = [f for k in FACE_MODEL_FOLDERS for f in folder_paths.get_folder_paths(k)]
    return find(Path(option).name, folders)


def find_centerface() -> Path:
    """The CenterFace file in models/facedetection, or the error that says the setup installs it."""
    known = (KnownModel(CENTERFACE.folder, CENTERFACE.file, CENTERFACE.what, CENTERFACE.source, CENTERFACE.licence),)
    return find_face_model(CENTERFACE.file, folder_paths.get_folder_paths(CENTERFACE.folder), known, "face detector")
