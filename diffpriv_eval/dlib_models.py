"""The dlib models shipped in face_recognition_models, loaded once and lazily."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path


class DlibUnavailableError(RuntimeError):
    """dlib or its model files are not installed."""


def _models_folder() -> Path:
    # Locate the data without importing face_recognition_models: its __init__ imports
    # pkg_resources, which warns on every import and is gone from setuptools >= 81.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DlibUnavailableError(
            "face_recognition_models is not installed: pip install 'comfyui-diffprivacy[eval]'")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _dlib():
    try:
        import dlib
    except ImportError as exc:
        raise DlibUnavailableError("dlib is not installed: pip install 'comfyui-diffprivacy[eval]'") from exc
    return dlib


@functools.lru_cache(maxsize=1)
def frontal_face_detector():
    """dlib's HOG face detector."""
    return _dlib().get_frontal_face_detector()


@functools.lru_cache(maxsize=1)
def shape_predictor_68():
    """dlib's 68-point iBUG landmark predictor."""
    return _dlib().shape_predictor(str(_models_folder() / "shape_predictor_68_face_landmarks.dat"))


@functools.lru_cache(maxsize=1)
def face_descriptor_model():
    """dlib's ResNet face descriptor (128-d; same person below distance 0.6)."""
    return _dlib().face_recognition_model_v1(str(_models_folder() / "dlib_face_recognition_resnet_model_v1.dat"))


def rectangle(box: tuple[float, float, float, float]):
    """A dlib rectangle from an (x1, y1, x2, y2) pixel box."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return _dlib().rectangle(x1, y1, x2, y2)
