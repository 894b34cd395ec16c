"""Real face photos that ship inside installed packages (nothing is downloaded)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpriv_eval.sample_photos import SamplePhotoMissingError, insightface_image


def as_image(photo: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> ComfyUI IMAGE [H, W, 3] float in [0, 1]."""
    return torch.from_numpy(np.array(photo)).float() / 255.0


def insightface_photo(name: str) -> np.ndarray:
    """One of the photos in insightface's data/images folder, RGB uint8."""
    try:
        return insightface_image(name)
    except SamplePhotoMissingError:
        pytest.skip("insightface (optional) is not installed")


def face_photos() -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Real photos of six different people (scikit-image's astronaut, four people of
    insightface's t1.jpg, its Tom Hanks crop), plus two more views of the astronaut
    (mirrored; shrunk to two thirds), and the same-person pairs among them. The views are
    the same photo, not other photos of her: no package ships those."""
    from PIL import Image

    from diffpriv_eval.sample_photos import sample_photos

    try:
        photos = sample_photos()
    except SamplePhotoMissingError:
        pytest.skip("insightface (optional) is not installed")
    astronaut = photos["astronaut"]
    photos["astronaut_mirrored"] = np.ascontiguousarray(astronaut[:, ::-1])
    height, width = astronaut.shape[:2]
    photos["astronaut_small"] = np.asarray(Image.fromarray(astronaut).resize((width * 2 // 3, height * 2 // 3),
                                                                             Image.BILINEAR))
    views = ("astronaut", "astronaut_mirrored", "astronaut_small")
    same = [(a, b) for i, a in enumerate(views) for b in views[i + 1:]]
    return photos, same


def variations(photo: np.ndarray) -> dict[str, np.ndarray]:
    """Other pictures of the person in ``photo``, as a gallery needs: mirrored, shrunk to two
    thirds, cut 8% off the top-left corner, and 20% brighter. They are the same photo, not
    other photos of the person: no package ships those."""
    from PIL import Image

    height, width = photo.shape[:2]
    small = Image.fromarray(photo).resize((width * 2 // 3, height * 2 // 3), Image.BILINEAR)
    return {"mirrored": np.ascontiguousarray(photo[:, ::-1]), "small": np.asarray(small),
            "shifted": np.ascontiguousarray(photo[height * 8 // 100:, width * 8 // 100:]),
            "brighter": np.clip(photo.astype(np.float32) * 1.2, 0, 255).astype(np.uint8)}


CROWD_SMALL = (16, 20, 24, 30, 36)  # faces under 40 px ...
CROWD_LARGE = 100  # ... and one large, cut by the picture's left edge


def crowd_photo(small: tuple[int, ...] = CROWD_SMALL, seed: int = 0, width: int = 320, height: int = 224,
                large: int = CROWD_LARGE):
    """A crowd made from real photos (diffpriv_eval.crowd), with the true face boxes: by
    default 320 x 224, five faces of 16-36 px (LFW faces and faces of full photos) and the
    astronaut's face of 100 px cut by the left edge, on scikit-image's coffee photo."""
    from diffpriv_eval.crowd import crowd

    return crowd(list(small), seed=seed, width=width, height=height, edge_face=large, distractors=0, rotate=0)
