"""Face model files the user places (recognisers, detectors): where they are looked for,
and the error that says what to get and where when one is missing. Nothing is downloaded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    folder: str  # the ComfyUI models/ sub-folder it belongs in
    path: str  # its usual place inside that folder
    what: str
    source: str
    licence: str

    @property
    def file(self) -> str:
        return Path(self.path).name


class MissingFaceModelError(FileNotFoundError):
    def __init__(self, name: str, searched: list[str], known: tuple[KnownModel, ...], what: str):
        expected = "\n".join(f"  - models/{m.folder}/{m.path}: {m.what}; from {m.source}; licence: {m.licence}"
                             for m in known)
        folders = "\n".join(f"  - {f}" for f in searched) or "  (none registered)"
        super().__init__(
            f"{what} file '{name}' not found. Folders searched:\n{folders}\n"
            f"Expected files (nothing is downloaded; place one yourself):\n{expected}")
        self.name = name
        self.searched = searched


def find_face_model(name: str, folders: list[str], known: tuple[KnownModel, ...], what: str) -> Path:
    """``name`` (a relative path or a bare file name) under the first folder that has it.

    A bare file name is also looked for one and two folders down, the layouts users end up
    with: ``<folder>/<pack>/<name>``, ``<folder>/models/<pack>/<name>``, ``<folder>/<pack>/<pack>/<name>``.
    """
    for folder in folders:
        root = Path(folder)
        direct = root / name
        if direct.is_file():
            return direct
        if "/" not in name:
            for pattern in (f"*/{name}", f"*/*/{name}"):
                found = sorted(p for p in root.glob(pattern) if p.is_file())
                if found:
                    return found[0]
    raise MissingFaceModelError(name, [str(f) for f in folders], known, what)
