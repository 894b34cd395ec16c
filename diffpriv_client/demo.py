"""``--demo-weights``: seeded random-weight models, the small settings the demo runs with, and
what it tells the user about them.

The demo shows that everything is installed and wired up, on a CPU, in a couple of minutes:
faces are worked on at 64 px with few steps everywhere (key-I a few more than sampling).
key-I is made in the workflow's mode, bdia, whose recovery retraces the inversion exactly,
so recovery gives the original back; the demo then proves it (check_recovery).
"""
from __future__ import annotations

import copy
import math
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from diffpriv_core.faces.mask import protected_pixels
from diffpriv_core.key_format import KEY_SUFFIX

from . import graphs
from .batch import Cleanup, Job, run_batch, upload_photo
from .embedded import PACK_DIR
from .pictures import read_photo
from .servers import Server
from .summary import Summary

BANNER = """
##############################################################################
#  --demo-weights: RANDOM-WEIGHT test models. The pictures are MEANINGLESS   #
#  and protect nothing. Use them only to see the pipeline run end to end.    #
##############################################################################
"""
# The generator's models plus the demo's own UNet: bump when what the demo generates changes.
MODELS_VERSION = "2"


@dataclass(frozen=True)
class DemoSettings:
    crop: int = 64  # Face Crop's side: the working size of every face
    msi_steps: int = 1
    sampling_steps: int = 2  # of the DDIM grid; sampling runs its last S_ns
    # key-I in the workflow's mode (bdia): recovery retraces the inversion exactly at any step
    # count (at least 2); recovery runs on key-I's own grid.
    key_i_steps: int = 4
    # 64 px crops need little memory: the guidance's decoder keeps its activations rather
    # than computing them twice.
    gradient_checkpointing: bool = False

    def describe(self, steps: int | None) -> str:
        if steps is not None:
            return f"faces at {self.crop} px, {steps} steps everywhere (--steps)"
        return (f"faces at {self.crop} px; MSI {self.msi_steps} step, sampling on a {self.sampling_steps}-step "
                f"grid, key-I {self.key_i_steps} steps")


SETTINGS = DemoSettings()
MODELS_WORDS = ("demo models: a one-level SD1.5-shaped UNet (random, gentle output), SD1.5's text encoder and VAE "
                "and a CLIP ViT-L/14 image encoder at their real sizes (the smallest ComfyUI loads as SD1.5 and "
                "CLIP vision), a small ArcFace-shaped recogniser; all random weights")


def models_folder(cache_dir: Path) -> Path:
    """Where models_dir keeps the demo's models in ``cache_dir``."""
    from diffpriv_testmodels.comfy_models import GENERATOR_VERSION

    return cache_dir / "demo-models" / f"demo{MODELS_VERSION}-v{GENERATOR_VERSION}-seed1234"


def models_dir(cache_dir: Path) -> Path:
    """The seeded random-weight models, generated once into the cache (in a child process,
    since the generator imports ComfyUI)."""
    from diffpriv_testmodels.comfy_models import ARCFACE_ONNX, CLIP_VISION, DEMO_CHECKPOINT

    folder = models_folder(cache_dir)
    if not all((folder / rel).is_file() for rel in (DEMO_CHECKPOINT, CLIP_VISION, ARCFACE_ONNX)):
        subprocess.run([sys.executable, "-m", "diffpriv_testmodels.comfy_models", str(folder), "--unet", "demo"],
                       check=True, cwd=PACK_DIR)
    return folder


def use_demo_models(graph: dict) -> None:
    from diffpriv_testmodels.comfy_models import (ARCFACE_ONNX, CLIP_VISION, DEMO_CHECKPOINT,  # imports torch: only here
                                                  TEST_THRESHOLD)

    graphs.set_models(graph, {str(Path(rel).parent): Path(rel).name for rel in (DEMO_CHECKPOINT, CLIP_VISION)})
    graphs.set_face_recognizer(graph, ARCFACE_ONNX, TEST_THRESHOLD)


def apply_settings(graph: dict, settings: DemoSettings = SETTINGS) -> None:
    """The demo's working size and step counts, node by node (``--steps``, applied after,
    still sets them all)."""
    values = {"DiffPrivacyFaceCrop": {"size": settings.crop},
              "DiffPrivacyMSIInversion": {"steps": settings.msi_steps},
              "DiffPrivacyGuidedDDIMSampler": {"steps": settings.sampling_steps},
              "DiffPrivacyDDIMInversionKey": {"steps": settings.key_i_steps},
              "DiffPrivacyIdentityGuidance": {"gradient_checkpointing": settings.gradient_checkpointing}}
    for class_type, inputs in values.items():
        for node in graphs.nodes_of(graph, class_type):
            node["inputs"].update({k: v for k, v in inputs.items()
                                   if k in node["inputs"] and not isinstance(node["inputs"][k], list)})


# --- the recovery check ---------------------------------------------------------------
CHECK_FOLDER = "recovery-check"


def check_recovery(summary: Summary, template: dict, secrets, servers: list[Server], cleanup: Cleanup,
                   recover_graph) -> list[str]:
    """Recover every face the run protected as a user does, into its protected photo (the
    first candidate: the only pictures its key accepts), and print, over the pixels the
    protection changed around that face, how close the recovery comes to the VAE's
    reconstruction of the original (the best any recovery can do) and to the original, next
    to how close the protected candidates come. ``recover_graph(template, key, name,
    secrets, photo, session)`` builds a recovery prompt, as `diffpriv recover --photo` does
    (``secrets``: cli.KeySecrets, which open the keys on this machine). Returns what could
    not be removed from the servers."""
    if not graphs.nodes_of(template, "DiffPrivacyFacePaste"):
        print("recovery check: only in the every-face mode (the default)")
        return []
    done = {name: entry for name, entry in summary.results.items()
            if entry["status"] == "ok" and entry["keys"] and entry["outputs"]}
    if not done:
        return []
    recover_template = graphs.load_workflow(graphs.default_workflow("recover_face"))
    use_demo_models(recover_template)
    reconstruction = graphs.reconstruction_graph(template)
    check = Summary(summary.out_dir / CHECK_FOLDER, "recover")
    jobs = []
    for name, entry in done.items():
        photo, protected = Path(entry["source"]), summary.out_dir / entry["outputs"][0]
        jobs.append(Job(f"{name}_reconstruction", photo, partial(_reconstruction_prompt, reconstruction, photo,
                                                                  f"{name}_reconstruction", protected)))
        jobs += [Job(_key_name(key), summary.out_dir / key,
                     partial(recover_graph, recover_template, summary.out_dir / key, _key_name(key), secrets,
                             protected))
                 for key in entry["keys"]]
    print("recovery check: recovering each face into its protected photo ...", file=sys.stderr)
    not_removed = run_batch(jobs, servers, check, cleanup)
    (paste,) = graphs.nodes_of(template, "DiffPrivacyFacePaste")
    for name, entry in done.items():
        for line in _report(name, entry, summary.out_dir, check, paste["inputs"]["feather"]):
            print(line)
    check.finish()
    check.write_json()
    check.close()
    return not_removed


def _key_name(key: str) -> str:
    return Path(key).name.removesuffix(KEY_SUFFIX)


def _reconstruction_prompt(template: dict, photo: Path, name: str, protected: Path, session) -> dict:
    uploaded = upload_photo(session, photo)
    graph = copy.deepcopy(template)
    graphs.set_input_image(graph, uploaded)
    graph["reconstruction_photo"]["inputs"]["image"] = upload_photo(session, protected)
    graphs.set_image_prefixes(graph, name, session.folder)
    return graph


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


# A recovered pixel this far from the VAE's reconstruction, in any channel, is "off".
OFF_LEVEL = 20 / 255


def changed_region(protected: np.ndarray, original: np.ndarray, face: dict, feather: float) -> np.ndarray:
    """[H, W] bool: the pixels the protection of one face (a summary's face entry) changed:
    those that differ from the original under its paste's mask (with this ``feather``)."""
    under = protected_pixels(face["crop"], face["box"], feather, *original.shape[:2])
    return under & np.any(protected != original, axis=-1)


def _report(name: str, entry: dict, out_dir: Path, check: Summary, feather: float) -> list[str]:
    """Per face: its recovery into the protected photo, over the pixels the protection changed."""
    results = check.results
    recon_entry = results.get(f"{name}_reconstruction", {})
    if recon_entry.get("status") != "ok":
        return [f"recovery check: {name}: the reconstruction failed: {recon_entry.get('error')}"]
    original = read_photo(entry["source"]).pixels / 255.0  # the photo as the command sent it
    reconstruction = _pixels(check.out_dir / recon_entry["outputs"][0])
    protected = [p for p in (_pixels(out_dir / rel) for rel in entry["outputs"]) if p.shape == original.shape]
    faces = {face["key"]: face for face in entry["faces"]}
    lines = []
    for key in entry["keys"]:
        got = results.get(_key_name(key), {})
        if got.get("status") != "ok":
            lines.append(f"recovery check: {_key_name(key)}: recovery failed: {got.get('error')}")
            continue
        recovered = _pixels(check.out_dir / got["outputs"][0])
        changed = changed_region(_pixels(out_dir / entry["outputs"][0]), original, faces[key], feather)
        off = int(np.sum(np.abs(recovered[changed] - reconstruction[changed]).max(axis=-1) > OFF_LEVEL))
        candidates = ", ".join(f"{psnr(p[changed], reconstruction[changed]):.1f}" for p in protected)
        lines.append(f"recovery check: {_key_name(key)}: recovered into the protected photo vs VAE reconstruction "
                     f"{psnr(recovered[changed], reconstruction[changed]):.1f} dB ({off} pixels off by more than "
                     f"20/255); protected candidates vs VAE reconstruction {candidates} dB; recovered vs original "
                     f"{psnr(recovered[changed], original[changed]):.1f} dB, VAE reconstruction vs original "
                     f"{psnr(reconstruction[changed], original[changed]):.1f} dB (over the {int(changed.sum())} "
                     "pixels the protection changed; higher is closer)")
    return lines
