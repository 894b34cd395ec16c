"""``--demo-weights``: seeded random-weight models, the small settings the demo runs with, and
what it tells the user about them.

The demo shows that everything is installed and wired up, on a CPU, in a couple of minutes:
faces are worked on at 64 px with few steps everywhere, except key-I, which keeps enough
steps for recovery to give the original back (the demo then proves it, demo_check.py).
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import graphs
from .embedded import PACK_DIR

BANNER = """
##############################################################################
#  --demo-weights: RANDOM-WEIGHT test models. The pictures are MEANINGLESS   #
#  and protect nothing. Use them only to see the pipeline run end to end.    #
##############################################################################
"""
# The generator's models plus the demo's own UNet: bump when what the demo generates changes.
MODELS_VERSION = "1"


@dataclass(frozen=True)
class DemoSettings:
    crop: int = 64  # Face Crop's side: the working size of every face
    msi_steps: int = 2
    sampling_steps: int = 2  # of the DDIM grid; sampling runs its last S_ns
    # Fixed-point inversion converges in these few steps on the demo's gentle UNet
    # (diffpriv_testmodels.comfy_models.DEMO_OUTPUT_SCALE); recovery uses key-I's own count.
    key_i_steps: int = 4
    key_i_refine: int = 4

    def describe(self, steps: int | None) -> str:
        if steps is not None:
            return (f"faces at {self.crop} px, {steps} steps everywhere (--steps; key-I needs "
                    f"{self.key_i_steps} or more for recovery to work)")
        return (f"faces at {self.crop} px; MSI {self.msi_steps} steps, sampling on a {self.sampling_steps}-step "
                f"grid, key-I {self.key_i_steps} steps ({self.key_i_refine} refinements each)")


SETTINGS = DemoSettings()
MODELS_WORDS = ("demo models: a one-level SD1.5-shaped UNet (random, gentle output), SD1.5's text encoder and VAE "
                "and a CLIP ViT-L/14 image encoder at their real sizes (the smallest ComfyUI loads as SD1.5 and "
                "CLIP vision), a small ArcFace-shaped recogniser; all random weights")


def models_dir(cache_dir: Path) -> Path:
    """The seeded random-weight models, generated once into the cache (in a child process,
    since the generator imports ComfyUI)."""
    from diffpriv_testmodels.comfy_models import ARCFACE_ONNX, CHECKPOINT, CLIP_VISION, GENERATOR_VERSION

    folder = cache_dir / "demo-models" / f"demo{MODELS_VERSION}-v{GENERATOR_VERSION}-seed1234"
    if not all((folder / rel).is_file() for rel in (CHECKPOINT, CLIP_VISION, ARCFACE_ONNX)):
        subprocess.run([sys.executable, "-m", "diffpriv_testmodels.comfy_models", str(folder), "--unet", "demo"],
                       check=True, cwd=PACK_DIR)
    return folder


def use_demo_models(graph: dict) -> None:
    from diffpriv_testmodels.comfy_models import ARCFACE_ONNX, CHECKPOINT, CLIP_VISION  # imports torch: only here

    graphs.set_models(graph, {str(Path(rel).parent): Path(rel).name for rel in (CHECKPOINT, CLIP_VISION)})
    graphs.set_face_recognizer(graph, ARCFACE_ONNX)


def apply_settings(graph: dict, settings: DemoSettings = SETTINGS) -> None:
    """The demo's working size and step counts, node by node (``--steps``, applied after,
    still sets them all)."""
    values = {"DiffPrivacyFaceCrop": {"size": settings.crop},
              "DiffPrivacyMSIInversion": {"steps": settings.msi_steps},
              "DiffPrivacyGuidedDDIMSampler": {"steps": settings.sampling_steps},
              "DiffPrivacyDDIMInversionKey": {"steps": settings.key_i_steps, "mode": "fixed_point",
                                              "refine_iterations": settings.key_i_refine}}
    for class_type, inputs in values.items():
        for node in graphs.nodes_of(graph, class_type):
            node["inputs"].update({k: v for k, v in inputs.items()
                                   if k in node["inputs"] and not isinstance(node["inputs"][k], list)})
