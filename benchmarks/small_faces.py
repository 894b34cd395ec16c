"""What a small face holds, for choosing which faces get MSI (Face Crop's msi_min_size).

MSI trains, per face, the conditionings that let the diffusion model reproduce that face
crop: about six in seven of a face's UNet passes (passes_per_face). A face of s px is cut
with a margin of half its size each side, so its square is 2s photo pixels, upscaled to
the 512 px crop: below s = 32 the crop's 64 x 64 latent has more cells than the photo has
pixels across the square, and what MSI would learn to reproduce is an upscaled blur.

This measures how much of a face's identity the photo still holds at s px: each real face
(the six people of insightface's t1.jpg, scikit-image's astronaut and cameraman) shrunk so
its box's longer side is s, brought back to full size as the crop would be, and read by
SFace (aligned on the full-size photo's landmarks); the table gives the cosine to the
full-size face's embedding (1 = all the recogniser sees is there), beside the cosines
between the different people. The light protection still changes every such face (the
guided DDIM from the unconditional embedding, with its own key-I): the choice is only
whether MSI's training is worth it.

    .venv/bin/python benchmarks/small_faces.py [--dry]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffpriv_core.faces.align import face_matrix, warp_faces  # noqa: E402
from diffpriv_core.faces.crop import MSI_MIN_SIZE  # noqa: E402
from diffpriv_core.faces.detect import detect_faces  # noqa: E402
from diffpriv_core.faces.recognizers import load_recognizer  # noqa: E402
from diffpriv_core.faces.wheel_models import SFACE  # noqa: E402
from diffpriv_eval.crowd import photo_sources  # noqa: E402

SIZES = (12, 16, 20, 24, 32, 40, 48, 64, 96)


def embedding(recogniser, photo: np.ndarray, face) -> torch.Tensor:
    matrix = face_matrix(face, recogniser.input_size, recogniser.alignment)
    with torch.no_grad():
        return recogniser(warp_faces(torch.from_numpy(photo.copy()).float()[None] / 255, matrix,
                                     recogniser.input_size))[0]


def at_size(photo: np.ndarray, face, size: int) -> np.ndarray:
    """The photo as it looks when the face is ``size`` px, brought back to full size."""
    h, w = photo.shape[:2]
    scale = size / face.size
    small = Image.fromarray(photo).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="two faces, three sizes: checks the script")
    args = parser.parse_args(argv)
    from diffpriv_client.embedded import find_comfyui

    recogniser = load_recognizer(find_comfyui() / "models" / SFACE.folder / SFACE.file)
    sources = [s for s in photo_sources() if s.name != "hanks"]  # Hanks's crop is the face alone
    sizes = SIZES[3:6] if args.dry else SIZES
    sources = sources[:2] if args.dry else sources
    faces = {}
    for source in sources:  # the face the photo's true box marks, as the detector reads it at full size
        found = detect_faces(torch.from_numpy(source.photo.copy()).float() / 255, 0.7, 20)
        faces[source.name] = min(found, key=lambda f: abs(f.box[0] - source.box[0]) + abs(f.box[1] - source.box[1]))
    full = {s.name: embedding(recogniser, s.photo, faces[s.name]) for s in sources}
    names = list(full)
    others = [float(full[a] @ full[b]) for i, a in enumerate(names) for b in names[i + 1:]]
    print(f"SFace (same-person cosine >= {recogniser.threshold:.3f}) on {len(sources)} real faces; between the "
          f"different people: mean {np.mean(others):.3f}, max {max(others):.3f}.")
    print()
    print("| face size (px) | cosine to the full-size face: min | median | latent cells per photo pixel "
          "(512 px crop) |")
    print("|---|---|---|---|")
    for size in sizes:
        cosines = [float(embedding(recogniser, at_size(s.photo, faces[s.name], size), faces[s.name]) @ full[s.name])
                   for s in sources]
        print(f"| {size} | {min(cosines):.3f} | {np.median(cosines):.3f} | {64 / (2 * size):.2f} |")
    print()
    print(f"Face Crop's msi_min_size: {MSI_MIN_SIZE} px (the first size with no more than one latent cell per "
          "photo pixel).")


if __name__ == "__main__":
    main()
