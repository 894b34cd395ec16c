"""Face nodes: detect every face, crop each for protection, paste the results back; join
the faces of several photos into one batch and take each photo's part back."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from comfy_api.v0_0_2 import io
from comfy_execution.graph_utils import ExecutionBlocker

from diffpriv_core.faces.binding import check_bound
from diffpriv_core.faces.crop import MSI_MIN_SIZE, crop_faces, paste_faces, plan_crops
from diffpriv_core.faces.detect import (CENTERFACE, DEFAULT_MIN_SCORE, DEFAULT_MIN_SIZE, KNOWN_DETECTORS, MTCNN,
                                        SCORE_FLOOR, Face, NoFaceError, box_mask, detect, find_detector,
                                        is_detector_file)
from diffpriv_core.faces.photo_batch import join_crops, photo_rows, rows_of

from .face_models import find_centerface, model_options, resolve_model
from .host import Progress
from .inputs import image_side_at_least, rgb_images
from .types import FaceCrops, Faces, KeyE, KeyI

log = logging.getLogger("diffprivacy")

SELECT = ("all", "largest", "by_index")
NO_FACE = ("error", "skip")


def detector_options() -> list[str]:
    return [MTCNN, *model_options(is_detector_file, KNOWN_DETECTORS), CENTERFACE]


def resolve_detector(option: str) -> str:
    if option == MTCNN:
        return MTCNN
    if option == CENTERFACE:
        return str(find_centerface())
    return str(resolve_model(option, find_detector))


def detector_name(option: str, resolved: str) -> str:
    """What the history calls the detector: "mtcnn", "centerface" or the option's file."""
    return option if option in (MTCNN, CENTERFACE) else Path(resolved).name


def face_entry(k: int, face: Face) -> dict:
    return {"face": k, "box": [round(v, 1) for v in face.box], "score": round(face.score, 4),
            "size": round(face.size, 1)}


def possible_entry(face: Face) -> dict:
    return {"box": [round(v, 1) for v in face.box], "score": round(face.score, 4)}


class FaceDetect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyFaceDetect",
            display_name="Face Detect (Diff-Privacy)",
            category="Diff-Privacy/faces",
            description="Finds faces and their 5 landmarks with MTCNN (weights ship with facenet-pytorch), "
                        "CenterFace (installed by the setup into models/facedetection), or insightface's SCRFD "
                        "detector from models/insightface when you have it. Candidates it leaves out (a score "
                        "below min_score, a size below min_size, or not selected) are listed in the history as "
                        "possible faces.",
            inputs=[
                io.Image.Input("image", tooltip="the photo(s) to find faces in"),
                io.Combo.Input("select", options=list(SELECT), default="all",
                               tooltip="all: every face found; index: only face `index` (0 = largest)"),
                io.Int.Input("index", default=0, min=0, max=64, tooltip="face to keep with select=by_index (0 = largest)"),
                io.Int.Input("min_size", default=DEFAULT_MIN_SIZE, min=12, max=4096,
                             tooltip="faces whose box's longer side is smaller are left out (pixels; listed as "
                                     "possible faces)"),
                io.Float.Input("min_score", default=DEFAULT_MIN_SCORE[MTCNN], min=0.0, max=1.0, step=0.01,
                               tooltip="faces the detector scores lower are left out (listed as possible faces "
                                       f"from its floor: mtcnn {SCORE_FLOOR[MTCNN]}, centerface "
                                       f"{SCORE_FLOOR[CENTERFACE]}). Scores differ by detector: mtcnn "
                                       f"{DEFAULT_MIN_SCORE[MTCNN]}, centerface {DEFAULT_MIN_SCORE[CENTERFACE]} "
                                       "(measured, BENCHMARKS.md)"),
                io.Combo.Input("on_no_face", options=list(NO_FACE), default="error",
                               tooltip="error stops the prompt; skip reports the image and goes on"),
                io.Combo.Input("detector", options=detector_options(), default=MTCNN, optional=True,
                               tooltip="mtcnn: ships with facenet-pytorch (the best recall measured); centerface: "
                                       "MIT, installed by the setup; insightface SCRFD files need the optional "
                                       "insightface package (non-commercial research licence)"),
            ],
            outputs=[Faces.Output(display_name="faces", tooltip="per image, its faces: box, five landmarks, score"),
                     io.Mask.Output(display_name="face_mask", tooltip="the faces' boxes, 1 inside")],
        )

    @classmethod
    def execute(cls, image, select, index, min_size, min_score, on_no_face, detector=MTCNN) -> io.NodeOutput:
        image = rgb_images(image, "Face Detect")
        image_side_at_least(image, max(min_size, 12), "Face Detect")  # MTCNN's smallest window is 12 px
        resolved = resolve_detector(detector)
        per_image, masks, missing, report = [], [], [], []
        progress = Progress(image.shape[0])
        for i, img in enumerate(image):
            found = detect(img, min_score=min_score, min_size=min_size, detector=resolved)
            faces = found.faces
            if select == "largest":
                faces = faces[:1]
            elif select == "by_index":
                faces = faces[index:index + 1]
            possible = [f for f in found.faces if f not in faces] + found.possible
            if not faces:
                if on_no_face == "error":
                    raise NoFaceError(i, f" (min_size {min_size}, min_score {min_score}"
                                         f"{'; possible faces: ' + str(len(possible)) if possible else ''})")
                missing.append(i)
            per_image.append(faces)
            masks.append(box_mask(img.shape[0], img.shape[1], faces))
            report.append({"image": i, "detector": detector_name(detector, resolved), "min_size": int(min_size),
                           "min_score": float(min_score), "faces": [face_entry(k, f) for k, f in enumerate(faces)],
                           "possible": [possible_entry(f) for f in possible]})
            progress.step()
        if missing:
            log.warning("Diff-Privacy: no face in image(s) %s of the batch; passed through", missing)
        unprotected = sum(len(r["possible"]) for r in report)
        if unprotected:
            log.warning("Diff-Privacy: %d possible face(s) left out by Face Detect's settings (see its history)",
                        unprotected)
        return io.NodeOutput(per_image, torch.stack(masks), ui={"diffprivacy_faces": report})


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
                io.Int.Input("msi_min_size", default=MSI_MIN_SIZE, min=0, max=4096, optional=True,
                             tooltip="faces whose box's longer side is smaller (photo pixels) get the light "
                                     "protection: no MSI training, key-E is the unconditional embedding (wire "
                                     "crop_info into MSI Inversion); still guided, with its own key-I and key. "
                                     "0 = MSI for every face"),
            ],
            outputs=[io.Image.Output(display_name="crops", tooltip="one square crop per face, at `size` px"),
                     FaceCrops.Output(display_name="crop_info",
                                      tooltip="per crop: where it sits in its photo, the detector's box, landmarks "
                                              "and score, and the face's protection (msi or unconditional); for "
                                              "MSI Inversion, the Identity Energy Guidance, Face Paste and Save "
                                              "Privacy Key")],
        )

    @classmethod
    def execute(cls, image, faces, size, margin, msi_min_size=MSI_MIN_SIZE) -> io.NodeOutput:
        image = rgb_images(image, "Face Crop")
        if len(faces) != image.shape[0]:
            raise ValueError(f"Face Crop got {image.shape[0]} images but faces for {len(faces)}: "
                             "connect the Face Detect that ran on this image")
        crops = plan_crops(faces, image.shape[1], image.shape[2], size, margin, msi_min_size)
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


class FaceBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyFaceBatch",
            display_name="Face Batch (Diff-Privacy)",
            category="Diff-Privacy/faces",
            description="Joins the face crops of two Face Crops (photos of any sizes) into one batch, so MSI, the "
                        "sampler and key-I make one network call a step for the faces of every photo. Chain it for "
                        "more photos; Photo Faces takes each photo's part back afterwards.",
            inputs=[
                io.Image.Input("crops", tooltip="the first Face Crop's crops (or an earlier Face Batch's)"),
                FaceCrops.Input("crop_info", tooltip="their crop_info"),
                io.Image.Input("crops_2", tooltip="the next photo's crops, at the same size"),
                FaceCrops.Input("crop_info_2", tooltip="their crop_info; its photos are numbered after the first's"),
            ],
            outputs=[io.Image.Output(display_name="crops", tooltip="every crop of both, the first's first"),
                     FaceCrops.Output(display_name="crop_info",
                                      tooltip="per crop, as Face Crop gives it, with the photo numbered within the "
                                              "joined batch (for MSI Inversion, the guidance, the sampler and "
                                              "Photo Faces)")],
        )

    @classmethod
    def execute(cls, crops, crop_info, crops_2, crop_info_2) -> io.NodeOutput:
        for images, info, name in ((crops, crop_info, "crops"), (crops_2, crop_info_2, "crops_2")):
            if images.shape[0] != len(info):
                raise ValueError(f"Face Batch: '{name}' holds {images.shape[0]} crops but its crop_info {len(info)}: "
                                 "connect both outputs of the same Face Crop")
        if crops.shape[1:] != crops_2.shape[1:]:
            raise ValueError(f"Face Batch: crops of {crops.shape[2]}x{crops.shape[1]} and {crops_2.shape[2]}x"
                             f"{crops_2.shape[1]} px cannot share a batch: give both Face Crops the same size")
        return io.NodeOutput(torch.cat([crops, crops_2]), join_crops(crop_info, crop_info_2))


class PhotoFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyPhotoFaces",
            display_name="Photo Faces (Diff-Privacy)",
            category="Diff-Privacy/faces",
            description="Takes one photo's part back out of a Face Batch's joined batch: its faces (with their "
                        "candidates), key-Es and key-Is, for that photo's own Face Paste and Save Privacy Key.",
            inputs=[
                FaceCrops.Input("crop_info", tooltip="the joined crop_info (from Face Batch)"),
                io.Int.Input("photo", default=0, min=0, max=4096,
                             tooltip="which photo of the joined batch: 0 for the first Face Batch's first input"),
                io.Image.Input("faces", optional=True,
                               tooltip="the processed crops of the whole batch (VAE Decode of the sampler): N per "
                                       "crop"),
                KeyE.Input("key_e", optional=True, tooltip="the batch's key-Es (one per crop, or one for all)"),
                KeyI.Input("key_i", optional=True, tooltip="the batch's key-Is (one per crop)"),
            ],
            outputs=[io.Image.Output(display_name="faces", tooltip="the photo's processed crops, N per crop"),
                     KeyE.Output(display_name="key_e", tooltip="the photo's key-Es"),
                     KeyI.Output(display_name="key_i", tooltip="the photo's key-Is")],
        )

    @classmethod
    def execute(cls, crop_info, photo, faces=None, key_e=None, key_i=None) -> io.NodeOutput:
        try:
            rows = photo_rows(crop_info, photo)
            parts = [None if value is None else rows_of(value, rows, len(crop_info), name)
                     for value, name in ((faces, "faces"), (key_e, "key_e"), (key_i, "key_i"))]
        except ValueError as exc:
            raise ValueError(f"Photo Faces: {exc}") from None
        return io.NodeOutput(*parts, ui={"diffprivacy_photo": [{"photo": photo, "first": rows.start,
                                                                "faces": len(rows)}]})
