"""Every face of a photo: square crops at the working resolution, and pasting processed
crops back under a feathered, face-shaped mask.

The paper works on aligned face crops; photos have many faces at any size. A crop is a
square around one detected face (grown by a margin), resized to the resolution the
diffusion model works at. Its geometry travels with the face's key, so a recovered face
can be pasted back into the photo it came from. Pixels outside the mask are never touched:
pasting leaves them bit-identical.

Images are ComfyUI IMAGE tensors: [B, H, W, C] float in [0, 1].
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..key_format import PROTECTIONS, checked_face_crop
from .detect import Face
from .mask import ellipse_radius

# How each face is protected (recorded per face in its crop, and so in its key):
# "msi": the paper's protection, MSI's key-E + guided DDIM; "unconditional": the light
# protection of small faces, the same guided DDIM and key-I with key-E = the unconditional
# embedding (no MSI training), recoverable from the face's own key the same way.
MSI, UNCONDITIONAL = PROTECTIONS
# Faces smaller than this (the longer side of the box, photo pixels) get the light
# protection: below it the 512 px crop's 64 x 64 latent is finer than the photo pixels the
# face came from, and MSI's training (about 6 in 7 of a face's UNet passes) would learn
# to reproduce an upscaled blur (BENCHMARKS.md, small_faces).
MSI_MIN_SIZE = 32


@dataclass(frozen=True)
class FaceCrop:
    """Where one face's crop came from: enough to paste it back into its photo."""

    image_index: int  # which photo of the batch
    face_index: int  # which face of that photo (0 = largest)
    source_size: tuple[int, int]  # the photo's (height, width)
    box: tuple[int, int, int]  # the square's top-left x, y and side, in photo pixels (may overhang the photo)
    size: int  # the crop's side after resizing: the working resolution
    face_box: tuple[float, float, float, float]  # the detected face, x1, y1, x2, y2 in photo pixels
    # A key's crop: the SHA-256 of the face's region (photo_binding.region_digest) in each
    # protected picture made with it, so the face is recovered into those pictures only.
    region_digests: tuple[str, ...] = ()
    protection: str = MSI  # how the face is protected (PROTECTIONS); keys made before it say "msi"
    landmarks: tuple[tuple[float, float], ...] = ()  # the detector's five, in photo pixels; () in older keys

    def __post_init__(self):
        if self.protection not in PROTECTIONS:
            raise ValueError(f"unknown face protection {self.protection!r} (known: {', '.join(PROTECTIONS)})")

    def to_json(self) -> str:
        fields = asdict(self)
        if not self.landmarks:  # a crop without them (an older key's) records none
            del fields["landmarks"]
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "FaceCrop":
        """The crop of a key's metadata: every number checked (key_format.checked_face_crop)."""
        d = checked_face_crop(text)
        return cls(d["image_index"], d["face_index"], tuple(d["source_size"]), tuple(d["box"]), d["size"],
                   tuple(float(v) for v in d["face_box"]), tuple(d.get("region_digests", ())),
                   d.get("protection") or MSI, tuple((float(x), float(y)) for x, y in d.get("landmarks") or ()))

    @property
    def scale(self) -> float:
        """Crop pixels per photo pixel."""
        return self.size / self.box[2]

    def face_in_crop(self) -> Face:
        """The detected face in the crop's pixels: its box (pixel edges) and landmarks (pixel
        centres, as the alignments read them), mapped as crop_faces resizes the square. (A
        crop keeps no detector score: the face's is 1.)"""
        if len(self.landmarks) != 5:
            raise ValueError("this face crop carries no landmarks (a key made before they were recorded)")
        x0, y0, _side = self.box
        s = self.scale
        x1, y1, x2, y2 = self.face_box
        return Face(((x1 - x0) * s, (y1 - y0) * s, (x2 - x0) * s, (y2 - y0) * s),
                    tuple(((x - x0 + 0.5) * s - 0.5, (y - y0 + 0.5) * s - 0.5) for x, y in self.landmarks), 1.0)


def protection_for(face: Face, msi_min_size: float = MSI_MIN_SIZE) -> str:
    """MSI for faces of ``msi_min_size`` px and more, the light protection below."""
    return MSI if face.size >= msi_min_size else UNCONDITIONAL


def plan_crop(face: Face, image_index: int, face_index: int, height: int, width: int, size: int,
              margin: float, msi_min_size: float = MSI_MIN_SIZE) -> FaceCrop:
    """The square around ``face``: the face box's longer side grown by ``margin`` of it on
    each side, centred on the box (and grown further should a landmark lie beyond it: the
    key's geometry holds them inside its square); with the face's landmarks and its
    protection."""
    if size % 8 or size < 8:
        raise ValueError(f"the crop size must be a multiple of 8 (the VAE's factor), got {size}")
    x1, y1, x2, y2 = face.box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    reach = max([0.0] + [max(abs(x - cx), abs(y - cy)) for x, y in face.landmarks])
    side = max(8, round(max(x2 - x1, y2 - y1) * (1 + 2 * margin)), math.ceil(2 * reach) + 2)
    x0, y0 = round((x1 + x2 - side) / 2), round((y1 + y2 - side) / 2)
    return FaceCrop(image_index, face_index, (height, width), (x0, y0, side), size, tuple(face.box),
                    protection=protection_for(face, msi_min_size), landmarks=tuple(tuple(p) for p in face.landmarks))


def plan_crops(faces_per_image: list[list[Face]], height: int, width: int, size: int, margin: float,
               msi_min_size: float = MSI_MIN_SIZE) -> list[FaceCrop]:
    return [plan_crop(face, b, k, height, width, size, margin, msi_min_size)
            for b, faces in enumerate(faces_per_image) for k, face in enumerate(faces)]


def _resize(images: torch.Tensor, side: int) -> torch.Tensor:
    """[N, H, W, C] -> [N, side, side, C], antialiased (crops shrink by large factors)."""
    x = images.movedim(-1, 1)
    x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
    return x.movedim(1, -1).clamp(0, 1)


def crop_faces(images: torch.Tensor, crops: list[FaceCrop]) -> torch.Tensor:
    """[N, size, size, C]: each crop cut out of its photo and resized. Where the square
    overhangs the photo, the edge pixels are repeated (a plausible image for the model;
    pasting never writes there)."""
    out = []
    for c in crops:
        photo = images[c.image_index]
        x0, y0, side = c.box
        h, w = photo.shape[:2]
        pad = (max(0, -x0), max(0, x0 + side - w), max(0, -y0), max(0, y0 + side - h))
        region = photo[max(0, y0):min(h, y0 + side), max(0, x0):min(w, x0 + side)]
        if any(pad):
            region = F.pad(region.movedim(-1, 0)[None], pad, mode="replicate")[0].movedim(0, -1)
        out.append(_resize(region[None].float(), c.size)[0])
    return torch.stack(out).to(images.dtype)


def face_mask(crop: FaceCrop, feather: float, restore: bool = False) -> torch.Tensor:
    """[side, side] in [0, 1]: 1 on an ellipse around the face (mask.py), falling smoothly to 0 over
    ``feather`` (a fraction of the ellipse's radii) and exactly 0 beyond. ``restore``: the
    mask that puts a recovered face back, 1 wherever the protection's mask (the same
    ``feather``) is above 0, so every pixel the protection changed is replaced, then falling
    to 0 over the pixels beyond, which the protection left as they were."""
    r = torch.from_numpy(ellipse_radius(crop.box, crop.face_box))
    inner = 1 + feather if restore else 1  # the protection's mask is above 0 for r < 1 + feather
    if feather <= 0:
        return (r <= inner).float()
    ramp = ((inner + feather - r) / feather).clamp(0, 1)
    return ramp * ramp * (3 - 2 * ramp)  # smoothstep: no visible seam at either edge


def paste_faces(photos: torch.Tensor, faces: torch.Tensor, crops: list[FaceCrop],
                feather: float = 0.2, restore: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Put processed crops back: ``faces`` holds ``k`` candidates per crop (crop-major, as
    the sampler makes them), giving ``k`` versions of each photo (photo-major). Returns the
    photos [B * k, H, W, C] and the pasted masks [B * k, H, W]. Outside the masks every
    pixel is the input's, bit for bit. ``restore``: recovered faces going back into their
    protected photo, each over the whole region its protection's paste (with this
    ``feather``) changed (face_mask)."""
    if not crops:
        raise ValueError("no face crops to paste: the crop list is empty")
    if faces.shape[0] % len(crops):
        raise ValueError(f"{faces.shape[0]} face images for {len(crops)} crops: give the same number of "
                         "candidates for every crop")
    candidates = faces.shape[0] // len(crops)
    targets = [_target_photo(photos, c, n) for n, c in enumerate(crops)]
    out = photos.repeat_interleave(candidates, dim=0).clone()
    masks = torch.zeros(out.shape[:3], dtype=torch.float32)
    for n, (c, b) in enumerate(zip(crops, targets)):
        mask = face_mask(c, feather, restore)
        resized = _resize(faces[n * candidates:(n + 1) * candidates].float(), c.box[2])
        for j, face in enumerate(resized):
            _blend(out[b * candidates + j], masks[b * candidates + j], face, mask, c.box)
    return out, masks


def _target_photo(photos: torch.Tensor, crop: FaceCrop, n: int) -> int:
    """The photo crop ``n`` goes back into: its own index, or the only photo given (a
    recovered face pasted into its protected photo)."""
    b = 0 if photos.shape[0] == 1 else crop.image_index
    if b >= photos.shape[0]:
        raise ValueError(f"face crop {n} belongs to photo {crop.image_index}, but only {photos.shape[0]} were given")
    if tuple(photos.shape[1:3]) != crop.source_size:
        h, w = crop.source_size
        raise ValueError(f"face crop {n} was cut from a {w}x{h} photo; the photo given is "
                         f"{photos.shape[2]}x{photos.shape[1]}")
    return b


def _blend(photo: torch.Tensor, pasted: torch.Tensor, face: torch.Tensor, mask: torch.Tensor, box) -> None:
    """In place: ``photo`` = face under ``mask`` within the box's part inside the photo."""
    x0, y0, side = box
    h, w = photo.shape[:2]
    ys, xs = slice(max(0, y0), min(h, y0 + side)), slice(max(0, x0), min(w, x0 + side))
    cs = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
    m = mask[cs][..., None].to(photo.dtype)
    region = photo[ys, xs]
    blended = region * (1 - m) + face[cs].to(photo.dtype) * m
    # where() rather than the blend alone: outside the mask the photo stays bit-identical.
    photo[ys, xs] = torch.where(m > 0, blended, region)
    pasted[ys, xs] = torch.maximum(pasted[ys, xs], mask[cs])

