"""What the benchmarks run on: random-weight models (generated once into .cache/) and a photo."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"test": ROOT / ".cache" / "benchmark-models", "sd15": ROOT / ".cache" / "benchmark-models-sd15"}
UNET_WORDS = {"test": "test-size SD1.5 UNet", "sd15": "SD1.5's full-size UNet"}


def ensure_models(unet: str) -> Path:
    """The models/ folder for this UNet size (test or sd15), generated when missing."""
    models = MODELS[unet]
    if not (models / "checkpoints").exists():
        subprocess.run([sys.executable, "-m", "diffpriv_client.demo_models", str(models), "--unet", unet],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return models


def astronaut(size: int):
    """scikit-image's astronaut photo as a ComfyUI IMAGE batch [1, size, size, 3] (the face
    about a sixth of its width)."""
    import skimage.data
    import torch
    import torch.nn.functional as F

    photo = torch.from_numpy(skimage.data.astronaut()).float().div(255)[None]
    return F.interpolate(photo.movedim(-1, 1), size=(size, size), mode="area").movedim(1, -1)
