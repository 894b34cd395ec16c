"""Identity guidance nodes: the face recogniser loader and the guidance it drives."""
from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import torch
from comfy_api.v0_0_2 import io

from diffpriv_core.energy import SimilarityTarget
from diffpriv_core.faces.align import warp_faces
from diffpriv_core.faces.detect import NoFaceError, detect_faces
from diffpriv_core.faces.wheel_models import AlteredModelError
from diffpriv_core.faces.recognizers import (DEFAULT_RECOGNIZER, KNOWN_MODELS, UnknownRecognizerError, find_recognizer,
                                             is_recognizer_file, load_recognizer)
from diffpriv_core.guided import FaceTarget, IdentityGuidance, face_target
from diffpriv_core.passes import PassCounter
from diffpriv_core.tasks import TASKS, LambdaSchedule

from .face_models import model_options, resolve_model
from .faces import NO_FACE
from .host import Progress, gradients, grad_input
from .inputs import image_side_at_least, rgb_images
from .types import FaceCrops, FaceModel, Guidance

log = logging.getLogger("diffprivacy")

DECODE_REGIONS = ("whole image", "face crop")
LAMBDA_MODES = ("paper schedule", "target similarity")
FACE_CROP_MARGIN = 0.5  # "face crop" decodes the face box grown by half its size on each side
MIN_FACE_SIDE = 20  # the smallest face the detector reports (detect_faces' min_size)
NAME = "Identity Energy Guidance"


def recognizer_options() -> list[str]:
    return model_options(is_recognizer_file, KNOWN_MODELS)


def resolve_recognizer(option: str) -> Path:
    return resolve_model(option, find_recognizer)


class FaceRecognizerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyFaceRecognizerLoader",
            display_name="Face Recognizer Loader (Diff-Privacy)",
            category="Diff-Privacy/faces",
            description="Loads a face recogniser: SFace (the default, Apache-2.0) and FaceNet-CASIA, which the "
                        "setup installs into models/sface and models/facenet, or ArcFace ONNX from insightface "
                        "packs, IR-SE50, FaceNet-VGGFace2 from models/insightface, models/arcface, models/facenet. "
                        "Each brings its own face alignment. Nothing is downloaded.",
            inputs=[io.Combo.Input("model_name", options=recognizer_options(), default=DEFAULT_RECOGNIZER,
                                   tooltip="SFace: Apache-2.0; FaceNet-CASIA: trained on a research dataset; "
                                           "insightface packs: non-commercial research only"),
                    io.Float.Input("threshold", default=0.0, min=0.0, max=1.0, step=0.001, optional=True,
                                   tooltip="the cosine similarity from which the recogniser takes two faces for "
                                           "one person; 0 = the published one of a file known by its content "
                                           "(sha256: SFace, FaceNet-CASIA, buffalo_l's ArcFace), which any "
                                           "other file needs stated here")],
            outputs=[FaceModel.Output(display_name="face_model",
                                       tooltip="the frozen recogniser, with its alignment and threshold")],
        )

    @classmethod
    def execute(cls, model_name, threshold=0.0) -> io.NodeOutput:
        path = resolve_recognizer(model_name)
        with gradients():  # normal tensors: the sampler differentiates through this network
            model = load_checked(path, threshold or None)
        log.info("Diff-Privacy: face recogniser %s (%d px input, %s alignment, same-person cosine >= %.3f) loaded "
                 "on the CPU; the sampler moves it to the model's device", path, model.input_size,
                 model.alignment.kind, model.threshold)
        return io.NodeOutput(model)


def load_checked(path: Path, threshold: float | None = None):
    """load_recognizer, with files that are damaged or hold more than weights refused in
    words that say so (never with advice to unpickle them)."""
    from google.protobuf.message import DecodeError
    from safetensors import SafetensorError

    try:
        return load_recognizer(path, threshold)
    except UnknownRecognizerError as exc:
        raise ValueError(f"Face Recognizer Loader: {exc}. Set this node's 'threshold' input.") from None
    except AlteredModelError as exc:
        raise ValueError(f"Face Recognizer Loader: {exc}") from None
    except pickle.UnpicklingError:
        raise ValueError(f"Face Recognizer Loader: {path.name} holds pickled objects other than weights and was "
                         "refused (code in model files is never run); use a file that holds only weights, e.g. "
                         "its .safetensors version") from None
    except (DecodeError, SafetensorError, zipfile.BadZipFile, EOFError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"Face Recognizer Loader: {path.name} is damaged or not a face recogniser ({reason})") from None


class IdentityGuidanceNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyIdentityGuidance",
            display_name="Identity Energy Guidance (Diff-Privacy)",
            category="Diff-Privacy/protect",
            description="The identity energy that steers the protection sampler: anonymize (a different person, "
                         "and different from each other across the batch) or hide (looks different to people, "
                         "the recogniser still matches).",
            inputs=[
                FaceModel.Input("face_model", tooltip="from Face Recognizer Loader: the recogniser that guides"),
                io.Image.Input("image", tooltip="the original image(s) being protected: one per image, or one for all"),
                io.Combo.Input("mode", options=list(TASKS), default="anonymize",
                               tooltip="anonymize: away from the original identity; hide: keep it for the recogniser"),
                io.Float.Input("lambda_scale", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="multiplies the task's lambda_t, the reference code's (anonymize 1; hide "
                                       "1.5 for t > 600, 2.5 below; the paper gives none); 0 = no guidance"),
                io.Boolean.Input("normalize_gradient", default=False,
                                 tooltip="FreeDoM-style: the guidance step gets lambda x the size of the DDIM step"),
                io.Boolean.Input("diversity", default=True,
                                 tooltip="anonymize: also push the batch's faces apart (L_div)"),
                io.Combo.Input("decode_region", options=list(DECODE_REGIONS), default=DECODE_REGIONS[0],
                               tooltip="face crop: decode only the latent around the face (less memory on big images)"),
                io.Int.Input("face_index", default=0, min=0, max=64, tooltip="which face to protect (0 = largest)"),
                io.Float.Input("min_score", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="the detector's confidence the reference face needs"),
                io.Combo.Input("on_no_face", options=list(NO_FACE), default="error",
                               tooltip="error stops the prompt; skip leaves that image unguided and logs its index"),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="recompute the VAE decoder's activations in the backward pass: much less "
                                         "memory on large images, somewhat slower"),
                io.Combo.Input("lambda_mode", options=list(LAMBDA_MODES), default=LAMBDA_MODES[0], optional=True,
                               tooltip="paper schedule: the fixed lambda_t (the reference code's values); target "
                                       "similarity: each sample gets "
                                       "the step that brings the recogniser's cosine to the original below its "
                                       "threshold - margin (anonymize) or above threshold + margin (hide), and "
                                       "none once there"),
                io.Float.Input("margin", default=0.05, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="target similarity: distance from the recogniser's threshold, in cosine"),
                io.Float.Input("lambda_cap", default=1000.0, min=0.0, max=1e6, step=1.0, optional=True,
                               tooltip="target similarity: the largest lambda any step may use"),
                io.Float.Input("lambda_early", default=-1.0, min=-1.0, max=1e6, step=0.05, optional=True,
                               tooltip="lambda_t above the switch point, before lambda_scale; negative = the "
                                       "reference code's"),
                io.Float.Input("lambda_late", default=-1.0, min=-1.0, max=1e6, step=0.05, optional=True,
                               tooltip="lambda_t at and below the switch point, before lambda_scale; negative = "
                                       "the reference code's"),
                io.Int.Input("switch_t", default=600, min=0, max=1000, optional=True,
                             tooltip="the timestep where lambda_t switches from early to late (the reference "
                                     "code's: 600)"),
                FaceCrops.Input("crop_info", optional=True,
                                tooltip="from the Face Crop whose crops are 'image': each crop's face is the one "
                                        "Face Detect found (its box and landmarks, mapped into the crop), with no "
                                        "second detection; a face cut by the frame is guided where the detector "
                                        "saw it. face_index, min_score and on_no_face then do not apply"),
            ],
            outputs=[Guidance.Output(display_name="guidance", tooltip="for the Guided DDIM Sampler (or the Guided DDIM SAMPLER)"),
                     io.Image.Output(display_name="aligned_faces",
                                     tooltip="what the recogniser sees of each reference face (black: no face)")],
        )

    @classmethod
    def execute(cls, face_model, image, mode, lambda_scale, normalize_gradient, diversity, decode_region,
                face_index, min_score, on_no_face, gradient_checkpointing=False, lambda_mode=LAMBDA_MODES[0],
                margin=0.05, lambda_cap=1000.0, lambda_early=-1.0, lambda_late=-1.0,
                switch_t=600, crop_info=None) -> io.NodeOutput:
        image = rgb_images(image, "Identity Guidance")
        image_side_at_least(image, MIN_FACE_SIDE, "Identity Guidance")
        lambdas = lambda_schedule(mode, lambda_scale, lambda_early, lambda_late, switch_t)
        target = None
        if lambda_mode == "target similarity":
            target = SimilarityTarget(face_model.threshold, margin, lambda_cap)
        with gradients():  # normal tensors: the sampler's backward pass uses the reference embeddings
            images = grad_input(image)
            if crop_info is None:
                targets, passes = reference_faces(face_model, images, face_index, min_score, on_no_face,
                                                  "identity guidance", NAME)
            else:
                targets, passes = detected_faces(face_model, images, crop_info, NAME)
            aligned = torch.stack([aligned_face(face_model, img, target) for img, target in zip(images, targets)])
        missing = [i for i, target in enumerate(targets) if target is None]
        if missing:
            log.warning("Diff-Privacy: no face in image(s) %s of the batch; they will run without identity guidance",
                        missing)
        guidance = IdentityGuidance(
            embedder=face_model, mode=mode, targets=tuple(targets),
            lambdas=lambdas, normalize=normalize_gradient, diversity=diversity,
            crop_margin=FACE_CROP_MARGIN if decode_region == "face crop" else None,
            checkpoint_decoder=gradient_checkpointing, target=target)
        return io.NodeOutput(guidance, aligned.detach(), ui={"passes": passes})


def reference_faces(face_model, images: torch.Tensor, face_index: int, min_score: float, on_no_face: str,
                    purpose: str, stage: str) -> tuple[list[FaceTarget | None], list[dict]]:
    """Each image's face ``face_index`` (0 = largest) as the recogniser sees it: its
    alignment and identity (guided.face_target); None where there is none and
    ``on_no_face`` is skip. Also the recogniser passes per image, for the history under
    ``stage``."""
    targets, passes = [], []
    progress = Progress(images.shape[0])  # long batches: Cancel stops between images
    for i, img in enumerate(images):
        faces = detect_faces(img, min_score=min_score)
        counter = PassCounter()
        if len(faces) > face_index:
            targets.append(face_target(counter.embedder(face_model), img, faces[face_index]))
        elif on_no_face == "error":
            raise NoFaceError(i, f" for {purpose} (face_index {face_index}, min_score {min_score})")
        else:
            targets.append(None)
        passes += counter.report(stage, first=i)
        progress.step()
    return targets, passes


def detected_faces(face_model, images: torch.Tensor, crops: list, stage: str) -> tuple[list[FaceTarget], list[dict]]:
    """Each crop's face as Face Detect found it in the photo (box and landmarks mapped into
    the crop's pixels), as the recogniser sees it: one detection for the whole graph."""
    if len(crops) != images.shape[0]:
        raise ValueError(f"{NAME}: {len(crops)} face crops for {images.shape[0]} images: connect the Face Crop "
                         "whose crops 'image' is")
    targets, passes = [], []
    progress = Progress(images.shape[0])
    for i, (img, crop) in enumerate(zip(images, crops)):
        if tuple(img.shape[:2]) != (crop.size, crop.size):
            raise ValueError(f"{NAME}: image {i} is {img.shape[1]} x {img.shape[0]}, but its face crop is "
                             f"{crop.size} x {crop.size}: give the crops of the Face Crop that made 'crop_info'")
        try:
            face = crop.face_in_crop()
        except ValueError as exc:
            raise ValueError(f"{NAME}: face crop {i}: {exc}") from None
        counter = PassCounter()
        targets.append(face_target(counter.embedder(face_model), img, face))
        passes += counter.report(stage, first=i)
        progress.step()
    return targets, passes


def lambda_schedule(mode: str, scale: float, early: float, late: float, switch_t: int) -> LambdaSchedule:
    """lambda_t from the node's inputs: the task's (the reference code's) where a value is
    negative, all times ``scale``."""
    preset = TASKS[mode].lambdas
    early = preset.early if early < 0 else early
    late = preset.late if late < 0 else late
    return LambdaSchedule(early, late, switch_t).scaled(scale)


def aligned_face(face_model, image: torch.Tensor, target) -> torch.Tensor:
    """[S, S, 3] crop the recogniser sees; black where there is no face."""
    size = face_model.input_size
    if target is None:
        return torch.zeros(size, size, 3)
    return warp_faces(image[None].float(), target.matrix, size)[0].permute(1, 2, 0).clamp(0, 1)
