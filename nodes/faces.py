"""Face nodes: detect every face, crop each for protection, paste the results back."""
from __future__ import annotations

import logging

import torch
from comfy_api.v0_0_2 import io
from comfy_execution.graph_utils import ExecutionBlocker

from diffpriv_core.faces.binding import check_bound
from diffpriv_core.faces.crop import crop_faces, paste_faces, plan_crops
from diffpriv_core.faces.detect import (KNOWN_DETECTORS, MTCNN, NoFaceError, box_mask, detect_faces, find_detector,
                                        is_detector_file)

from .face_models import model_options, resolve_model
from .host import Progress
from .inputs import image_side_at_least, rgb_images
from .types import FaceCrops, Faces

log = logging.getLogger("diffprivacy")

SELECT = ("all", "largest", "by_index")
NO_FACE = ("error", "skip")


def detector_options() -> list[str]:
    return [MTCNN, *model_options(is_detector_file, KNOWN_DETECTORS)]


def resolve_detector(option: str) -> str:
    return MTCNN if option == MTCNN else str(resolve_model(option, find_detector))


class FaceDetect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyFaceDetect",
            display_name="Face Detect (Diff-Privacy)",
            category="Diff-Privacy/faces",
            description="Finds faces and their 5 landmarks with MTCNN (weights ship with facenet-pytorch), or "
                        "with insightface's SCRFD detector from models/insightface when you have it.",
            inputs=[
                io.Image.Input("image", tooltip="the photo(s) to find faces in"),
                io.Combo.Input("select", options=list(SELECT), default="all",
                               tooltip="all: every face found; index: only face `index` (0 = largest)"),
                io.Int.Input("index", default=0, min=0, max=64, tooltip="face to keep with select=by_index (0 = largest)"),
                io.Int.Input("min_size", default=20, min=12, max=4096, tooltip="smaller faces are ignored (pixels)"),
                io.Float.Input("min_score", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="the detector's confidence a face needs; lower it for small or turned faces"),
                io.Combo.Input("on_no_face", options=list(NO_FACE), default="error",
                               tooltip="error stops the prompt; skip reports the image and goes on"),
                io.Combo.Input("detector", options=detector_options(), default=MTCNN, optional=True,
                               tooltip="mtcnn: ships with facenet-pytorch; insightface SCRFD files need the "
                                       "optional insightface package (non-commercial research licence)"),
            ],
            outputs=[Faces.Output(display_name="faces", tooltip="per image, its faces: box, five landmarks, score"),
                     io.Mask.Output(display_name="face_mask", tooltip="the faces' boxes, 1 inside")],
        )

    @classmethod
    def execute(cls, image, select, index, min_size, min_score, on_no_face, detector=MTCNN) -> io.NodeOutput:
        image = rgb_images(image, "Face Detect")
        image_side_at_least(image, max(min_size, 12), "Face Detect")  # MTCNN's smallest window is 12 px
        detector = resolve_detector(detector)
        per_image, masks, missing = [], [], []
        progress = Progress(image.shape[0])
        for i, img in enumerate(image):
            faces = detect_faces(img, min_score=min_score, min_size=min_size, detector=detector)
            if select == "largest":
                faces = faces[:1]
            elif select == "by_index":
                faces = faces[index:index + 1]
            if not faces:
                if on_no_face == "error":
                    raise NoFaceError(i, f" (min_size {min_size}, min_score {min_score})")
                missing.append(i)
            per_image.append(faces)
            masks.append(box_mask(img.shape[0], img.shape[1], faces))
            progress.step()
        if missing:
            log.warning("Diff-Privacy: no face in image(s) %s of the batch; passed through", missing)
        return io.NodeOutput(per_image, torch.stack(masks))


class FaceCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyFaceCrop",
            display_name="Face Crop (Diff-Privacy)",
            category="Diff-Privacy/faces",
            description="Cuts a square around every detected face, resized to the working resolution, as one "
                        "batch (photo by photo, largest face first). Each crop is then protected with its own key.",
            inputs=[
                io.Image.Input("image", tooltip="the photo(s) Face Detect ran on"),
                Faces.Input("faces", tooltip="from Face Detect on the same image"),
                io.Int.Input("size", default=512, min=64, max=2048, step=8,
                             tooltip="the crops' side: the resolution the model works at (512 for SD 1.5)"),
                io.Float.Input("margin", default=0.5, min=0.0, max=2.0, step=0.05,
                               tooltip="context around the face, as a fraction of the face's size on each side"),
            ],
            outputs=[io.Image.Output(display_name="crops", tooltip="one square crop per face, at `size` px"),
                     FaceCrops.Output(display_name="crop_info",
                                      tooltip="where each crop sits in its photo: for Face Paste and Save Privacy Key")],
        )

    @classmethod
    def execute(cls, image, faces, size, margin) -> io.NodeOutput:
        image = rgb_images(image, "Face Crop")
        if len(faces) != image.shape[0]:
            raise ValueError(f"Face Crop got {image.shape[0]} images but faces for {len(faces)}: "
                             "connect the Face Detect that ran on this image")
        crops = plan_crops(faces, image.shape[1], image.shape[2], size, margin)
        if not crops:
            # Face Detect let the photos through (on_no_face=skip): nothing downstream runs,
            # so no key or protected image is written for a photo with nothing to protect.
            log.warning("Diff-Privacy: no face in any image; nothing to protect")
            return io.NodeOutput(ExecutionBlocker(None), ExecutionBlocker(None))
        return io.NodeOutput(crop_faces(image, crops), crops)


class FacePaste(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyFacePaste",
            display_name="Face Paste (Diff-Privacy)",
            category="Diff-Privacy/faces",
            description="Puts processed face crops back into their photo under a feathered, face-shaped mask; "
                        "every pixel outside the mask stays exactly as it was. With several candidates per "
                        "face, gives one photo per candidate.",
            inputs=[
                io.Image.Input("image", tooltip="the photo(s) the crops were cut from (or the protected photo, "
                                                "to put a recovered face back)"),
                io.Image.Input("faces", tooltip="the processed crops: N per crop, in the sampler's order"),
                FaceCrops.Input("crop_info", tooltip="from Face Crop, or from Load Privacy Key"),
                io.Float.Input("feather", default=0.2, min=0.0, max=1.0, step=0.05,
                               tooltip="width of the soft edge, as a fraction of the face ellipse's size"),
                io.Boolean.Input("restore", default=False, optional=True,
                                 tooltip="on to put a recovered face back into its protected photo: it then "
                                         "replaces every pixel the protection's paste changed (its whole feathered "
                                         "mask, with the feather it was protected with: 0.2 in the shipped "
                                         "workflows) and fades out over the pixels beyond"),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="the photo(s) with the faces pasted back: one per candidate"),
                     io.Mask.Output(display_name="mask", tooltip="the feathered face masks that were pasted")],
        )

    @classmethod
    def execute(cls, image, faces, crop_info, feather, restore=False) -> io.NodeOutput:
        if not crop_info:
            raise ValueError("Face Paste got no crop geometry: the key was made from a whole image, not from a "
                             "Face Crop, so there is nothing to paste into")
        image = rgb_images(image, "Face Paste")
        for crop in crop_info:  # a key's face goes back only into the pictures it protected
            b = 0 if image.shape[0] == 1 else crop.image_index
            if b < image.shape[0]:
                check_bound(image[b], crop)
        return io.NodeOutput(*paste_faces(image, rgb_images(faces, "Face Paste", "faces"), crop_info, feather,
                                          restore))
