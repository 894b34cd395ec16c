"""Identity Similarity: what a face recogniser says of protected pictures, after any sampler.

The Guided DDIM Sampler reports each sample's similarity itself; a SAMPLER inside
SamplerCustom can only return latents, so this node measures the decoded pictures instead,
the same way: the recogniser's cosine between the original face and the face at the same
place in each picture.
"""
from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from diffpriv_core.guided import picture_similarity

from .faces import NO_FACE
from .guidance import MIN_FACE_SIDE, reference_faces
from .inputs import image_side_at_least, rgb_images
from .types import FaceModel

log = logging.getLogger("diffprivacy")
NAME = "Identity Similarity"


def similarity_entry(image: int, embedder, cosines: list[float], mode: str | None = None,
                     goal: float | None = None) -> dict:
    """One image's similarity as the history shows it (and the command's summary.json keeps
    it): the recogniser, its threshold, each sample's cosine and verdict, and the guidance's
    task and target-similarity goal where known."""
    threshold = embedder.threshold
    return {"image": image, "recognizer": embedder.name, "cosines": [round(c, 4) for c in cosines],
            "threshold": round(threshold, 4), "mode": mode, "goal": None if goal is None else round(goal, 4),
            "same_person": [c >= threshold for c in cosines]}


def goal_met(entry: dict, cosine: float) -> bool:
    return cosine <= entry["goal"] if entry["mode"] == "anonymize" else cosine >= entry["goal"]


def report_text(entries: list[dict]) -> str:
    """The entries in words, one line per image under a line per recogniser (Markdown:
    Preview as Text shows it)."""
    if not entries:
        return "No identity measured (no guidance, or no face)."
    lines, head = [], None
    for entry in entries:
        entry_head = f"**{entry['recognizer']}**: same person at cosine >= {entry['threshold']}"
        if entry["goal"] is not None:
            entry_head += f"; goal {'<=' if entry['mode'] == 'anonymize' else '>='} {entry['goal']} ({entry['mode']})"
        if entry_head != head:
            lines += ["", entry_head] if lines else [entry_head]
            head = entry_head
        verdicts = []
        for cosine, same in zip(entry["cosines"], entry["same_person"]):
            verdict = f"{cosine:.4f} {'same person' if same else 'different person'}"
            if entry["goal"] is not None:
                verdict += ", goal met" if goal_met(entry, cosine) else ", goal missed"
            verdicts.append(verdict)
        lines.append(f"- image {entry['image']}: " + "; ".join(verdicts))
    return "\n".join(lines)


def pictures_per_original(originals: int, pictures: int) -> int:
    """How many protected pictures each original has (its samples, one after the other)."""
    if originals != 1 and pictures % originals:
        raise ValueError(f"{NAME}: 'protected' holds {pictures} pictures and 'original' {originals} images: give "
                         "one original for all, or one per image with the same number of pictures each "
                         "(the samplers' order: image 0's samples first)")
    return pictures // originals


class IdentitySimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyIdentitySimilarity",
            display_name="Identity Similarity (Diff-Privacy)",
            category="Diff-Privacy/faces",
            description="Measures what a face recogniser says of protected pictures: each one's cosine to its "
                        "original's face (read at the same place, aligned the recogniser's way) and the verdict at "
                        "the recogniser's threshold. Works after any sampler, e.g. the Guided DDIM SAMPLER in "
                        "SamplerCustom; wire 'report' into Preview as Text to read it.",
            inputs=[
                FaceModel.Input("face_model", tooltip="from Face Recognizer Loader: the recogniser that judges"),
                io.Image.Input("original", tooltip="the original image(s): one for all pictures, or one per image"),
                io.Image.Input("protected", tooltip="the protected pictures, at the original's size, each original's "
                                                    "in turn (the samplers' order: image 0's samples first)"),
                io.Int.Input("face_index", default=0, min=0, max=64, tooltip="which face (0 = largest)"),
                io.Float.Input("min_score", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="the detector's confidence the original's face needs"),
                io.Combo.Input("on_no_face", options=list(NO_FACE), default="error",
                               tooltip="error stops the prompt; skip leaves that image's pictures unmeasured"),
            ],
            outputs=[
                io.Float.Output(display_name="similarity", is_output_list=True,
                                tooltip="per measured picture, the cosine to its original's face"),
                io.Boolean.Output(display_name="same_person", is_output_list=True,
                                  tooltip="per measured picture, cosine >= the recogniser's threshold"),
                io.String.Output(display_name="report", tooltip="the numbers and verdicts in words"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, face_model, original, protected, face_index, min_score, on_no_face) -> io.NodeOutput:
        original = rgb_images(original, NAME, "original")
        protected = rgb_images(protected, NAME, "protected")
        image_side_at_least(original, MIN_FACE_SIDE, NAME, "original")
        per_original = pictures_per_original(original.shape[0], protected.shape[0])
        targets, _passes = reference_faces(face_model, original, face_index, min_score, on_no_face,
                                           "identity similarity", NAME)
        entries, similarities = [], []
        for i, target in enumerate(targets):
            if target is None:
                log.warning("Diff-Privacy %s: no face in original %d; its pictures are not measured", NAME, i)
                continue
            pictures = protected[i * per_original:(i + 1) * per_original]
            try:
                cosines = picture_similarity(face_model, target, pictures)
            except ValueError as exc:
                raise ValueError(f"{NAME}: image {i}: {exc}") from None
            similarities += cosines.tolist()
            entries.append(similarity_entry(i, face_model, cosines.tolist()))
        text = report_text(entries)
        log.info("Diff-Privacy %s:\n%s", NAME, text)
        same = [verdict for entry in entries for verdict in entry["same_person"]]
        return io.NodeOutput(similarities, same, text, ui={"text": [text], "identity_similarity": entries})
