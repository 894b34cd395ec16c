"""Where the tests and benchmarks keep their generated models (the checkout's .cache/, one
folder per generator version), made on first use, and the photo the benchmarks run on."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from diffpriv_testmodels import comfy_models, face_models

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
TEST_MODELS = CACHE / "test-models" / f"v{comfy_models.GENERATOR_VERSION}-seed1234"
DEMO_MODELS = CACHE / "test-models" / f"demo-v{comfy_models.GENERATOR_VERSION}-seed1234"
FACE_MODELS = CACHE / "test-models" / f"faces-v{face_models.GENERATOR_VERSION}-seed{face_models.SEED}"
BENCHMARK_MODELS = {"test": CACHE / "benchmark-models", "sd15": CACHE / "benchmark-models-sd15"}
UNET_WORDS = {"test": "test-size SD1.5 UNet", "sd15": "SD1.5's full-size UNet"}


def _generate(folder: Path, *args: str) -> None:
    """In a child process: the generator imports ComfyUI."""
    subprocess.run([sys.executable, "-m", "diffpriv_testmodels.comfy_models", str(folder), *args],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def comfy_test_models() -> Path:
    """A models/ folder with the seeded test-size SD1.5 checkpoint and CLIP vision."""
    if not all((TEST_MODELS / rel).exists() for rel in (comfy_models.CHECKPOINT, comfy_models.CLIP_VISION)):
        _generate(TEST_MODELS)
    return TEST_MODELS


def demo_models() -> Path:
    """A models/ folder with the --demo-weights checkpoint (its gentle UNet) and CLIP vision."""
    if not all((DEMO_MODELS / rel).exists() for rel in (comfy_models.DEMO_CHECKPOINT, comfy_models.CLIP_VISION)):
        _generate(DEMO_MODELS, "--unet", "demo")
    return DEMO_MODELS


def face_test_models() -> Path:
    """A models/ folder with the seeded face recognisers in the real file formats."""
    return face_models.ensure(FACE_MODELS)


def benchmark_models(unet: str) -> Path:
    """The models/ folder for this UNet size (test or sd15), generated when missing."""
    models = BENCHMARK_MODELS[unet]
    if not (models / "checkpoints").exists():
        _generate(models, "--unet", unet)
    return models


def astronaut(size: int):
    """scikit-image's astronaut photo as a ComfyUI IMAGE batch [1, size, size, 3] (the face
    about a sixth of its width)."""
    import skimage.data
    import torch
    import torch.nn.functional as F

    photo = torch.from_numpy(skimage.data.astronaut()).float().div(255)[None]
    return F.interpolate(photo.movedim(-1, 1), size=(size, size), mode="area").movedim(1, -1)


def astronaut_face(size: int):
    """The astronaut's face filling the picture, [1, size, size, 3] (tiny runs that must still
    find a face)."""
    import torch.nn.functional as F

    face = astronaut(512)[:, 20:212, 130:322]
    return F.interpolate(face.movedim(-1, 1), size=(size, size), mode="area").movedim(1, -1)
