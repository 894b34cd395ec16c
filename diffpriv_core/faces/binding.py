"""A face key bound to the protected pictures it was made with: the key's crop records the
SHA-256 of the face's region (its crop square, inside the photo) in each protected
picture, and recovery refuses to put the face back into any other picture.

The digests hash the 8-bit pixels ComfyUI writes and reads: SaveImage stores
``clip(255 x)`` truncated to uint8, and Load Image gives back ``u8 / 255``, which rounds
back to the same bytes. A copy of the protected picture re-encoded with loss (a JPEG, a
resize) is another picture.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import torch

from .crop import FaceCrop


def saved_pixels(image: torch.Tensor) -> np.ndarray:
    """[H, W, 3] uint8: what SaveImage writes of an IMAGE [H, W, C] in [0, 1]."""
    return np.clip(255.0 * image[..., :3].detach().cpu().float().numpy(), 0, 255).astype(np.uint8)


def loaded_pixels(image: torch.Tensor) -> np.ndarray:
    """[H, W, 3] uint8: the bytes Load Image read (its floats are u8 / 255)."""
    return np.clip(np.round(255.0 * image[..., :3].detach().cpu().float().numpy()), 0, 255).astype(np.uint8)


def region_digest(pixels: np.ndarray, crop: FaceCrop) -> str:
    """The SHA-256 of the crop square's part inside the photo, with where it lies."""
    h, w = pixels.shape[:2]
    x0, y0, side = crop.box
    ys, xs = slice(max(0, y0), min(h, y0 + side)), slice(max(0, x0), min(w, x0 + side))
    digest = hashlib.sha256(f"diffprivacy face region\0{w}x{h}\0{x0},{y0},{side}\0".encode())
    digest.update(np.ascontiguousarray(pixels[ys, xs]).tobytes())
    return digest.hexdigest()


def bind(crops: list[FaceCrop], protected: torch.Tensor) -> list[FaceCrop]:
    """Each crop with the digests of its region in the protected pictures of its photo
    (Face Paste's output: the candidates of each photo one after the other)."""
    photos = max(c.image_index for c in crops) + 1
    if protected.shape[0] % photos:
        raise ValueError(f"{protected.shape[0]} protected pictures for {photos} photo(s): connect the Face Paste "
                         "whose pictures these keys protect")
    candidates = protected.shape[0] // photos
    bound = []
    for crop in crops:
        if tuple(protected.shape[1:3]) != crop.source_size:
            raise ValueError(f"the protected pictures are {protected.shape[2]}x{protected.shape[1]}; face "
                             f"{crop.face_index}'s photo is {crop.source_size[1]}x{crop.source_size[0]}")
        pictures = protected[crop.image_index * candidates:(crop.image_index + 1) * candidates]
        bound.append(replace(crop, region_digests=tuple(region_digest(saved_pixels(p), crop) for p in pictures)))
    return bound


def check_bound(photo: torch.Tensor, crop: FaceCrop) -> None:
    """Refuse to put a face back into a picture its key was not made with."""
    if crop.region_digests and tuple(photo.shape[:2]) == crop.source_size \
            and region_digest(loaded_pixels(photo), crop) not in crop.region_digests:
        raise ValueError(f"face {crop.face_index}'s key was made with other pictures: this photo's face region is "
                         "not the one the key protected. Recover into the protected picture saved with this key "
                         "(a re-encoded copy, e.g. a JPEG, differs from it)")
