"""Pictures of any size for a VAE that works on multiples of 8 pixels.

SD's VAE turns every 8 x 8 pixels into one latent cell, so it takes only sides that are
multiples of 8; ComfyUI's VAE Encode crops the rest away (centred). The pack pads instead,
at the bottom and right, repeating the last row and column, so no pixel is lost; the
picture keeps its top-left corner, face boxes keep their coordinates, and the original is
the top-left ``height x width`` of anything decoded from that latent. key-E records the
original size (``image_size``), so a recovery can cut it back out.

This module imports no torch (the `diffpriv` command checks sizes with it before queueing).
"""
from __future__ import annotations

VAE_FACTOR = 8  # pixels per latent cell, per side
# MSI trains the UNet's forward and backward pass on the whole image at full resolution:
# above this the memory and time grow out of reach of one GPU (SD 1.x works best at 512).
MSI_MIN_SIDE, MSI_MAX_SIDE = 64, 2048
SIZE_META = "image_size"  # key-E metadata: the original picture's "<width>x<height>"


def padded_side(side: int, factor: int = VAE_FACTOR) -> int:
    return -(-side // factor) * factor


def pad_to_factor(images, factor: int = VAE_FACTOR):
    """[B, H, W, C] -> [B, H', W', C] with H', W' the next multiples of ``factor``; the
    added rows and columns repeat the last ones (a plausible edge for the VAE)."""
    batch, height, width, channels = images.shape
    full_h, full_w = padded_side(height, factor), padded_side(width, factor)
    if (full_h, full_w) == (height, width):
        return images
    out = images.new_empty((batch, full_h, full_w, channels))
    out[:, :height, :width] = images
    out[:, height:, :width] = images[:, height - 1:height]
    out[:, :, width:] = out[:, :, width - 1:width]
    return out


def crop_to_size(images, height: int, width: int):
    """The top-left ``height x width`` of [B, H, W, C] pictures decoded from a padded latent."""
    if images.shape[1] < height or images.shape[2] < width:
        raise ValueError(f"the pictures are {images.shape[2]} x {images.shape[1]} pixels, smaller than the "
                         f"original's {width} x {height}: they do not come from its padded latent")
    return images[:, :height, :width]


def size_meta(height: int, width: int) -> str:
    return f"{width}x{height}"


def parse_size_meta(text: str) -> tuple[int, int]:
    """(height, width) from key-E's ``image_size``; a hostile value is refused."""
    try:
        width, height = (int(v) for v in text.split("x"))
    except ValueError:
        raise ValueError(f"unreadable image size {text!r} in the key") from None
    if not (0 < width <= 1 << 16 and 0 < height <= 1 << 16):
        raise ValueError(f"image size {text!r} in the key is out of range")
    return height, width


def latent_offset(image_hw: tuple[int, int], latent_hw: tuple[int, int], factor: int = VAE_FACTOR) -> tuple[int, int]:
    """(dx, dy) of the latent's frame in the original image, for the two ways a picture of
    any size is encoded: padded (the pack's Pad to VAE Size; the frame starts at the
    picture's corner) or cropped, centred (ComfyUI's VAE Encode). A latent of any other size
    is not this picture's, and the face alignment would miss the face."""
    (height, width), (h, w) = image_hw, latent_hw
    if (h, w) == (padded_side(height, factor) // factor, padded_side(width, factor) // factor):
        return 0, 0
    if h == height // factor and w == width // factor:
        return (width - w * factor) // 2, (height - h * factor) // 2
    raise ValueError(f"the latent ({w * factor} x {h * factor} px) is not the encoding of the reference image "
                     f"({width} x {height} px): give the guidance the image that was encoded")


def msi_size_problem(height: int, width: int) -> str | None:
    """Why MSI cannot train on a picture of this size, or None when it can."""
    if min(height, width) < MSI_MIN_SIDE:
        return f"MSI needs images of at least {MSI_MIN_SIDE} x {MSI_MIN_SIDE} pixels, got {width} x {height}"
    if max(height, width) > MSI_MAX_SIDE:
        return (f"MSI takes images of at most {MSI_MAX_SIDE} x {MSI_MAX_SIDE} pixels, got {width} x {height}; "
                "resize the image or crop the face region first")
    return None
