"""The faces of several photos as one batch, and each photo's part of it again.

Photos of different sizes cannot share an IMAGE batch, but their face crops (all at the
working resolution) can: joined after Face Crop, every face of every photo goes through
MSI, the guided sampler and key-I together, one network call a step for all of them (on a
GPU those calls, not the faces in them, decide the time). After those stages each photo
takes back its own rows, so its Face Paste and Save Privacy Key see only its faces.

A joined crop keeps its face's ``face_index`` within its own photo, and its
``image_index`` says which photo of the joined batch it is of: the photos of the second
part are numbered after those of the first.
"""
from __future__ import annotations

import dataclasses

from .crop import FaceCrop


def photo_count(crops: list[FaceCrop]) -> int:
    """How many photos the crops come from (numbered 0 up, as Face Crop numbers them)."""
    return max((c.image_index for c in crops), default=-1) + 1


def join_crops(first: list[FaceCrop], second: list[FaceCrop]) -> list[FaceCrop]:
    """The crops of both parts, those of ``second``'s photos renumbered after ``first``'s."""
    offset = photo_count(first)
    return list(first) + [dataclasses.replace(c, image_index=c.image_index + offset) for c in second]


def photo_rows(crops: list[FaceCrop], photo: int) -> range:
    """The rows of the joined batch that hold photo ``photo``'s faces (one run: the parts
    were joined photo by photo)."""
    rows = [i for i, c in enumerate(crops) if c.image_index == photo]
    if not rows:
        raise ValueError(f"the joined batch holds no face of photo {photo} (it holds faces of "
                         f"{photo_count(crops)} photos, numbered from 0)")
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"the faces of photo {photo} are not together in the batch: join whole photos")
    return range(rows[0], rows[-1] + 1)


def rows_of(items, rows: range, faces: int, what: str):
    """The part of a batched value (a tensor's first dimension or a list) that belongs to
    ``rows`` of a batch of ``faces`` faces: each face may hold several entries (a sampler's
    candidates), and a value with one entry serves every face."""
    count = len(items)
    if count == 1:
        return items
    if count % faces:
        raise ValueError(f"{what} holds {count} entries for {faces} faces: give the same number for every face")
    per_face = count // faces
    return items[rows.start * per_face:rows.stop * per_face]


def noise_indices(crops: list[FaceCrop]) -> list[int]:
    """Per crop, the index its noise is seeded by: its face's index within its own photo,
    so a face gets the same start noise whichever photos share its batch (for one photo,
    its place in the batch)."""
    return [c.face_index for c in crops]
