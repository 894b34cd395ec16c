"""The pack's custom ComfyUI types (prefixed so they never clash with other packs)."""
from comfy_api.v0_0_2 import io

Faces = io.Custom("DP_FACES")
