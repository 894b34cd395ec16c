"""Thin ComfyUI adapters over diffpriv_core."""
from .faces import FaceDetect

NODES = [
    FaceDetect,
]
