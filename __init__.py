"""Diff-Privacy for ComfyUI: diffusion-based face anonymization and visual identity
hiding, with key-based recovery. ComfyUI loads this file; the method lives in
``diffpriv_core`` (no ComfyUI imports) and the nodes in ``nodes/``."""
import os
import sys

try:  # installed with pip (the setup command does this)
    import diffpriv_core  # noqa: F401
except ImportError:  # copied or cloned into custom_nodes without pip: use this folder
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

# The editor's files: the node docs the frontend shows in its help panel (web/docs/<NodeId>.md).
WEB_DIRECTORY = "./web"

try:
    from comfy_api.v0_0_2 import ComfyExtension
except ImportError:  # imported outside ComfyUI (test collection, packaging tools)
    ComfyExtension = None

if ComfyExtension is not None:
    from .nodes import NODES

    try:  # the server that is loading the pack: add the pack's HTTP routes to it
        from server import PromptServer
    except ImportError:  # imported by tests without a server
        PromptServer = None
    if getattr(PromptServer, "instance", None) is not None:
        from .nodes.example_photo import provide_example_photo
        from .nodes.routes import register

        register(PromptServer.instance)
        provide_example_photo()

    class DiffPrivacyExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    async def comfy_entrypoint() -> DiffPrivacyExtension:
        return DiffPrivacyExtension()
