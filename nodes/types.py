"""The pack's custom ComfyUI types (prefixed so they never clash with other packs).

DP_KEY_E and DP_KEY_I carry Python lists with one diffpriv_core KeyE / KeyI per image.
"""
from comfy_api.v0_0_2 import io

Faces = io.Custom("DP_FACES")
FaceCrops = io.Custom("DP_FACE_CROPS")  # list of diffpriv_core.faces.crop.FaceCrop, one per crop
KeyE = io.Custom("DP_KEY_E")
KeyI = io.Custom("DP_KEY_I")
FaceModel = io.Custom("DP_FACE_MODEL")  # a frozen FaceEmbedder (diffpriv_core.faces.recognizers)
Guidance = io.Custom("DP_GUIDANCE")  # diffpriv_core.guided.IdentityGuidance
