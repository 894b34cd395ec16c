"""Photos as people's files are, made into the one picture a server gets: upright, 8-bit
RGB in sRGB, and nothing else of the file.

ComfyUI's Load Image reads a file's pixels as if they were 8-bit (a 16-bit scan comes out
white) and leaves colour profiles alone, and a file carries more than its pixels: EXIF GPS
positions, camera serial numbers, XMP face regions with people's names, comments. So the
command never uploads the user's file: it uploads a PNG of its own making that holds the
pixels and nothing else, and the server's Load Image, SaveImage and every node see exactly
those pixels (read_photo says how each file is turned into them).

Torch-free: PIL and numpy only.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

# The colour modes PIL gives files, turned into RGB(A) plainly (no profile of their own).
PLAIN_MODES = {"1": "L", "P": "RGBA", "PA": "RGBA", "RGBX": "RGB", "RGBa": "RGBA", "YCbCr": "RGB", "HSV": "RGB"}
# An ICC profile's colour space -> the PIL mode of the pixels it describes.
PROFILE_MODES = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK", "Lab": "LAB"}
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# A PNG of the command's own making: fast to write (it lives only until the prompt is over).
PNG_COMPRESS_LEVEL = 1


class PhotoError(ValueError):
    """The file is not a picture the command can protect; the message says why."""


@dataclass(frozen=True)
class Photo:
    """A photo as the command sends it: [H, W, 3] uint8, upright, sRGB."""

    pixels: np.ndarray
    notes: tuple[str, ...] = ()  # what was done to the file's pixels, in words

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as viewers show the original."""
        return self.pixels.shape[1], self.pixels.shape[0]

    def png(self) -> bytes:
        """A new PNG of the pixels: no metadata of any kind (no EXIF, XMP, ICC, text)."""
        buffer = io.BytesIO()
        Image.fromarray(self.pixels, "RGB").save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buffer.getvalue()


def read_photo(path: str | Path) -> Photo:
    """The file's picture as viewers show it, in the order a viewer applies: its EXIF (or
    XMP) orientation first; 16-bit and 32-bit pixels scaled to 8 bits by their range;
    palette, bilevel, CMYK, YCbCr, HSV and Lab pixels to RGB; an embedded ICC profile
    converted to sRGB (littlecms, perceptual intent); transparency flattened onto white.
    Raises PhotoError for a file that is no picture, is cut off, holds several frames (an
    animation, a multi-page scan), or is over PIL's decompression-bomb limit."""
    with warnings.catch_warnings():
        # Over PIL's bomb limit (179 MP) is refused, as ComfyUI's Load Image would refuse it;
        # its warning at half that size is no news to the user.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                frames = getattr(image, "n_frames", 1)
                if frames > 1 and image.format != "MPO":  # MPO: a phone's photo plus its depth maps
                    raise PhotoError(f"it holds {frames} frames (an animation or a multi-page file); save each "
                                     "picture as a file of its own")
                image.load()
                return _as_sent(image)
        except PhotoError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise PhotoError(f"not a readable image ({exc})") from None


def decode_picture(data: bytes) -> np.ndarray:
    """A picture a server sent back, as [H, W, 3] uint8 (PhotoError if it is none)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise PhotoError(f"the server sent a picture that cannot be read ({exc})") from None


def _as_sent(image: Image.Image) -> Photo:
    notes = []
    icc = image.info.get("icc_profile")
    orientation = image.getexif().get(0x0112)
    upright = ImageOps.exif_transpose(image)
    if orientation not in (None, 1):
        notes.append(f"turned upright (EXIF orientation {orientation})")
    eight, note = _eight_bit(upright, image)
    notes += [note] if note else []
    colour, alpha = _colour_and_alpha(eight)
    rgb, note = _to_srgb(colour, icc)
    notes += [note] if note else []
    pixels = np.asarray(rgb.convert("RGB"))
    if alpha is not None and alpha.min() < 255:
        pixels = _flatten_onto_white(pixels, alpha)
        notes.append("transparent parts flattened onto white")
    return Photo(np.ascontiguousarray(pixels), tuple(notes))


def _eight_bit(image: Image.Image, source: Image.Image) -> tuple[Image.Image, str | None]:
    """Grayscale pixels wider than 8 bits -> mode L, scaled by their range (as ``source``,
    the file, states it; 16-bit colour channels PIL already gives as their top 8 bits)."""
    mode = image.mode
    if mode.startswith("I;16"):
        values, top, what = np.asarray(image).astype(np.float64), 65535.0, "16-bit grayscale"
    elif mode == "I":
        values = np.asarray(image).astype(np.float64)
        top = _integer_range(source, values)
        what = f"{round(np.log2(top + 1))}-bit grayscale"
    elif mode == "F":
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all():
            raise PhotoError("its floating-point pixels include NaN or infinite values")
        peak = float(values.max(initial=0.0))
        top = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
        what = f"floating-point grayscale (read as 0 to {top:g})"
    else:
        return image, None
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, "L"), f"{what} scaled to 8 bits"


def _integer_range(source: Image.Image, values: np.ndarray) -> float:
    """The largest value a 32-bit-integer (mode I) grayscale file's pixels can take."""
    if source.format == "PNG":
        return 65535.0  # PNG's only grayscale wider than 8 bits
    bits = getattr(source, "tag_v2", {}).get(258) if source.format == "TIFF" else None
    bits = bits[0] if isinstance(bits, tuple) else bits
    if isinstance(bits, int) and 8 <= bits <= 32:
        return float(2 ** bits - 1)
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
        raise PhotoError("its 32-bit integer pixels have no stated range; save it as an 8- or 16-bit picture")
    return 255.0 if values.max(initial=0) <= 255 else 65535.0


def _colour_and_alpha(image: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """The picture's colour bands (one of L, RGB, CMYK, LAB) and its alpha, if it has any."""
    mode = PLAIN_MODES.get(image.mode, image.mode)
    if image.mode == "P" and "transparency" not in image.info:
        mode = "RGB"
    try:
        image = image.convert(mode) if mode != image.mode else image
    except ValueError as exc:
        raise PhotoError(f"its colour mode {image.mode} cannot be converted ({exc})") from None
    if mode in ("LA", "RGBA"):
        alpha = np.asarray(image.getchannel("A"))
        return image.convert(mode[:-1]), alpha
    if mode not in ("L", "RGB", "CMYK", "LAB"):
        raise PhotoError(f"its colour mode {image.mode} is not one the command can convert")
    return image, None


def _to_srgb(image: Image.Image, icc: bytes | None) -> tuple[Image.Image, str | None]:
    """RGB pixels in sRGB: through the file's ICC profile when it has one that fits its
    pixels, else as PIL converts them (Lab through littlecms's Lab profile)."""
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            space = profile.profile.xcolor_space.strip()
            name = profile.profile.profile_description or "unnamed"
        except (OSError, ImageCms.PyCMSError):
            return _plain_rgb(image), "its ICC profile cannot be read: ignored"
        if PROFILE_MODES.get(space) != image.mode:
            return _plain_rgb(image), f"its ICC profile ({name}) is for {space} pixels, not {image.mode}: ignored"
        try:
            converted = ImageCms.profileToProfile(image, profile, SRGB, outputMode="RGB",
                                                  renderingIntent=ImageCms.Intent.PERCEPTUAL)
        except ImageCms.PyCMSError as exc:
            return _plain_rgb(image), f"its ICC profile ({name}) cannot be applied ({exc}): ignored"
        return converted, f"colours converted from its ICC profile ({name}) to sRGB"
    return _plain_rgb(image), None


def _plain_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "LAB":
        lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))
        return ImageCms.profileToProfile(image, lab, SRGB, outputMode="RGB")
    return image.convert("RGB")


def _flatten_onto_white(pixels: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(pixels * a + 255.0 * (1.0 - a)).astype(np.uint8)
