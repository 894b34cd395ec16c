"""Loading evaluation sets from disk and pairing files by name stem."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from diffpriv_client.summary import finished_ablations, finished_outputs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# Candidates of one original are saved as <stem>_00001.png, <stem>_00002.png, ...; the
# recovery of one face's key (a per-face key, diffpriv protect's default) as <stem>_face<k>_00001.
_SUFFIXES = (re.compile(r"_\d+$"), re.compile(r"_face\d+$"))


def original_stem(name: str, stems: set[str]) -> str | None:
    """The original `name` was made from: `<stem>`, `<stem>_<digits>`, `<stem>_face<k>` or
    `<stem>_face<k>_<digits>`; None when it matches no original."""
    for pattern in _SUFFIXES:
        if name in stems:
            return name
        name = pattern.sub("", name)
    return name if name in stems else None


@dataclass
class Case:
    """One original photo and what the method made of it, all RGB uint8 at the
    original's size."""

    stem: str
    original: np.ndarray
    protected: list[np.ndarray] = field(default_factory=list)
    recovered: np.ndarray | None = None
    resized: list[str] = field(default_factory=list)  # files resized to the original's size
    source: Path | None = None  # the original's file
    ablations: list[str] = field(default_factory=list)  # the paper's ablations its protection ran
    variants: dict[str, np.ndarray] = field(default_factory=dict)  # recovered with other keys (wrong_keys.py)


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def save_rgb(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path)


def image_files(paths: Iterable[Path]) -> list[Path]:
    """Image files among `paths`, expanding folders (not recursively), sorted by name."""
    files = []
    for path in paths:
        if path.is_dir():
            files.extend(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return sorted(files, key=lambda p: p.name)


def group_by_stem(files: Iterable[Path], stems: set[str],
                  name_of: Callable[[Path], str] = lambda p: p.stem) -> dict[str, list[Path]]:
    """Files assigned to the original whose stem their name carries (`original_stem`).
    Files that match no original are left out."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        stem = original_stem(name_of(path), stems)
        if stem is not None:
            groups.setdefault(stem, []).append(path)
    return groups


def group_folder(folder: Path, stems: set[str]) -> dict[str, list[Path]]:
    """The pictures of `folder` per original stem: by the summary of a `diffpriv` output
    folder, else by file name. ComfyUI names a `diffpriv` output `<name>_<label>_00001_.png`
    inside `<name>/`, so its own stem cannot be paired; the summary's names can."""
    outputs = finished_outputs(folder)
    if outputs is None:
        return group_by_stem(image_files([folder]), stems)
    return group_by_stem(outputs, stems, name_of=outputs.__getitem__)


def load_at_size(path: Path, size: tuple[int, int], case: Case) -> np.ndarray:
    image = load_rgb(path)
    if image.shape[:2] != size:
        # Pixel metrics need equal sizes; the pipeline may work at another resolution.
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.LANCZOS))
        case.resized.append(path.name)
    return image


def load_cases(originals: list[Path], protected_dir: Path | None, recovered_dir: Path | None) -> list[Case]:
    """Cases for every original; protected candidates and recovered image matched by stem."""
    files = image_files(originals)
    cases = {p.stem: Case(p.stem, load_rgb(p), source=p) for p in files}
    if len(cases) != len(files):
        raise ValueError("two originals share a name stem (outputs pair with their original by name): rename one; "
                         "in a gallery, name each photo after its person as LFW does (alice/alice_0001.jpg)")
    stems = set(cases)
    if protected_dir is not None:
        for stem, paths in group_folder(protected_dir, stems).items():
            case = cases[stem]
            case.protected = [load_at_size(p, case.original.shape[:2], case) for p in paths]
        for name, ablations in finished_ablations(protected_dir).items():
            if (stem := original_stem(name, stems)) is not None:
                cases[stem].ablations = ablations
    if recovered_dir is not None:
        for stem, paths in group_folder(recovered_dir, stems).items():
            case = cases[stem]
            case.recovered = load_at_size(paths[0], case.original.shape[:2], case)
    return list(cases.values())
