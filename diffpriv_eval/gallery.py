"""The identification gallery (paper Table 3) from a folder, laid out as LFW is:

    gallery/
      alice/        several photos of alice (alice_0001.jpg, alice_0002.jpg, ...)
      bob/          several photos of bob
      distractors/  photos of people outside the gallery

An original is the identity whose folder holds it (``--originals gallery/alice/alice_0001.jpg``,
or every identity folder when --originals is left out) or whose folder is named like its
file stem (``photos/alice.jpg``). Each gallery photo is read at its largest MTCNN face; a
copy of the probe's own original is never its match.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from diffpriv_eval.detectors import Detector
from diffpriv_eval.identity import FaceImage
from diffpriv_eval.images import Case, image_files, load_rgb

DISTRACTORS = "distractors"


@dataclass
class Gallery:
    folder: Path
    identities: dict[str, list[FaceImage]]
    distractors: list[FaceImage]
    skipped: dict[str, str] = field(default_factory=dict)  # gallery file -> why it is left out
    names: dict[str, list[str]] = field(default_factory=dict)  # each identity's photos' file names

    def identity_folders(self) -> list[Path]:
        """The folder of each identity (the originals, when none are given)."""
        return [self.folder / who for who in self.identities]

    def identity_of(self, case: Case) -> str | None:
        """Who an original shows, by the folder that holds it or by its name; None if nobody here."""
        if case.source is not None and case.source.resolve().parent.parent == self.folder.resolve():
            folder = case.source.resolve().parent.name
            if folder in self.identities:
                return folder
        return case.stem if case.stem in self.identities else None


def _faces(files: Sequence[Path], detector: Detector, skipped: dict[str, str], root: Path) -> dict[str, FaceImage]:
    """Each photo's largest face, by file name; photos without one go to ``skipped``."""
    found = {}
    for path in files:
        image = load_rgb(path)
        faces = detector.detect(image)
        if faces:
            found[path.name] = FaceImage(image, faces[0])
        else:
            skipped[str(path.relative_to(root))] = "no face found by MTCNN"
    return found


def load_gallery(folder: Path, detector: Detector) -> Gallery:
    """One subfolder per identity (several photos each) and ``distractors/``; refuses a
    folder a user most likely laid out otherwise."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no such gallery folder: {folder}")
    loose = image_files([p for p in folder.iterdir() if p.is_file()])
    if loose:
        raise ValueError(f"{folder} holds images outside any identity folder ({loose[0].name}, ...): put each "
                         f"person's photos in a subfolder named after them, and other people in {DISTRACTORS}/")
    skipped: dict[str, str] = {}
    identities, names = {}, {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != DISTRACTORS):
        photos = _faces(image_files([sub]), detector, skipped, folder)
        if photos:
            identities[sub.name], names[sub.name] = list(photos.values()), list(photos)
    distractors = folder / DISTRACTORS
    others = _faces(image_files([distractors]), detector, skipped, folder) if distractors.is_dir() else {}
    if not identities:
        raise ValueError(f"{folder} has no identity subfolder with a detectable face")
    return Gallery(folder, identities, list(others.values()), skipped, names)
