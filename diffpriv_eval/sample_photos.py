"""Real face photos that ship inside installed packages, for calibration and tests
without any download: scikit-image's astronaut, and insightface's Tom Hanks crop and
group photo t1.jpg (four of its people, cropped)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

# Boxes (x1, y1, x2, y2) around four people in t1.jpg: their MTCNN boxes plus a margin,
# so callers detect on small crops instead of the whole 1280 px photo.
T1_CROPS = ((15, 223, 205, 437), (228, 110, 415, 312), (868, 22, 1054, 242), (425, 222, 610, 445))


class SamplePhotoMissingError(FileNotFoundError):
    """The package that ships a sample photo is not installed."""


def insightface_image(name: str) -> np.ndarray:
    """One of the photos in insightface's data/images folder, RGB uint8. Found without
    importing insightface, whose import needs onnxruntime."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise SamplePhotoMissingError("insightface is not installed; its sample photos are needed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / name
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def sample_photos() -> dict[str, np.ndarray]:
    """Six photos of six different people, one main face each, RGB uint8."""
    import skimage.data

    group = insightface_image("t1.jpg")
    photos = {f"t1_{i}": np.ascontiguousarray(group[y1:y2, x1:x2]) for i, (x1, y1, x2, y2) in enumerate(T1_CROPS)}
    photos["astronaut"] = np.ascontiguousarray(skimage.data.astronaut()[0:300, 100:350])
    photos["hanks"] = insightface_image("Tom_Hanks_54745.png")
    return photos
