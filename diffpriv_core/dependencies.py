"""The Python packages the pack needs beyond the host's, and the words for a missing one.

Import-free on purpose: ``install.py`` reads it before anything else is installed.
"""
from __future__ import annotations

import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
# Its metadata pins torch<2.3 and numpy<2: installed without its dependencies (it needs torch only).
FACENET_PYTORCH = "facenet-pytorch==2.6.0"
# Import name -> what pip installs; the lazily imported ones a run can miss.
PACKAGES = {
    "facenet_pytorch": f"--no-deps {FACENET_PYTORCH}",
    "onnx": "onnx", "onnx2torch": "onnx2torch", "skimage": "scikit-image", "cryptography": "cryptography",
    "google": "protobuf", "kornia": "kornia", "safetensors": "safetensors",
}


class MissingDependencyError(ImportError):
    pass


def missing_dependency(module: str) -> MissingDependencyError | None:
    """The error that says what to install for a missing top-level ``module`` (None if it is
    not one of the pack's dependencies)."""
    package = PACKAGES.get(module.split(".")[0])
    if package is None:
        return None
    return MissingDependencyError(
        f"Diff-Privacy needs the Python package {package.split()[-1]}, which is not installed in ComfyUI's "
        f"Python ({sys.executable}). Install the pack's dependencies with `{sys.executable} install.py` in "
        f"{PACK_DIR} (what ComfyUI-Manager runs when it installs the pack), or this one with "
        f"`{sys.executable} -m pip install {package}`; then restart ComfyUI.")
