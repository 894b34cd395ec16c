"""The pack's custom ComfyUI types (prefixed so they never clash with other packs)."""
from comfy_api.v0_0_2 import io

Faces = io.Custom("DP_FACES")
KeyE = io.Custom("DP_KEY_E")  # a list of diffpriv_core.key_types.KeyE, one per image
