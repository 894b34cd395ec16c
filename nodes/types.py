"""The pack's custom ComfyUI types (prefixed so they never clash with other packs), and the
batch_size input every node that batches its images' UNet calls shares.

DP_KEY_E and DP_KEY_I carry Python lists with one diffpriv_core KeyE / KeyI per image.
"""
from comfy_api.v0_0_2 import io

Faces = io.Custom("DP_FACES")
FaceCrops = io.Custom("DP_FACE_CROPS")  # list of diffpriv_core.faces.crop.FaceCrop, one per crop
KeyE = io.Custom("DP_KEY_E")
KeyI = io.Custom("DP_KEY_I")
FaceModel = io.Custom("DP_FACE_MODEL")  # a frozen FaceEmbedder (diffpriv_core.faces.recognizers)
Guidance = io.Custom("DP_GUIDANCE")  # diffpriv_core.guided.IdentityGuidance


def batch_size_input(default: int, maximum: int, together: str, unchanged: str) -> io.Int.Input:
    """The optional ``batch_size`` input: latents per UNet call, 0 for no limit. ``together``
    says how the node's images share the calls, ``unchanged`` what does not depend on it."""
    return io.Int.Input("batch_size", default=default, min=0, max=maximum, optional=True,
                        tooltip=f"latents per UNet call: {together} (0: all at once); lower it if memory runs out. "
                                f"{unchanged} not depend on it")
