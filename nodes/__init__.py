"""Thin ComfyUI adapters over diffpriv_core."""
from .faces import FaceDetect
from .msi import MSIInversion

NODES = [
    FaceDetect,
    MSIInversion,
]
