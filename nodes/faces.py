"""Face detection nodes."""
from __future__ import annotations

import logging

import torch
from comfy_api.v0_0_2 import io

from diffpriv_core.faces.detect import NoFaceError, box_mask, detect_faces

from .types import Faces

log = logging.getLogger("diffprivacy")

SELECT = ("all", "largest", "by_index")
NO_FACE = ("error", "skip")


class FaceDetect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyFaceDetect",
            display_name="Face Detect (Diff-Privacy)",
            category="Diff-Privacy/faces",
            description="Finds faces and their 5 landmarks with MTCNN (weights ship with facenet-pytorch).",
            inputs=[
                io.Image.Input("image"),
                io.Combo.Input("select", options=list(SELECT), default="all"),
                io.Int.Input("index", default=0, min=0, max=64, tooltip="face to keep with select=by_index (0 = largest)"),
                io.Int.Input("min_size", default=20, min=12, max=4096, tooltip="smaller faces are ignored (pixels)"),
                io.Float.Input("min_score", default=0.9, min=0.0, max=1.0, step=0.01),
                io.Combo.Input("on_no_face", options=list(NO_FACE), default="error",
                               tooltip="error stops the prompt; skip reports the image and goes on"),
            ],
            outputs=[Faces.Output(display_name="faces"), io.Mask.Output(display_name="face_mask")],
        )

    @classmethod
    def execute(cls, image, select, index, min_size, min_score, on_no_face) -> io.NodeOutput:
        if image.shape[0] == 0:
            raise ValueError("Face Detect got an empty image batch")
        per_image, masks, missing = [], [], []
        for i, img in enumerate(image):
            faces = detect_faces(img, min_score=min_score, min_size=min_size)
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
        if missing:
            log.warning("Diff-Privacy: no face in image(s) %s of the batch; passed through", missing)
        return io.NodeOutput(per_image, torch.stack(masks))
