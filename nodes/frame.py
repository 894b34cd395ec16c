"""Pictures of any size: pad them for the VAE, and cut the original size back out."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from diffpriv_core.frame import SIZE_META, crop_to_size, pad_to_factor, parse_size_meta

from .inputs import rgb_images
from .types import KeyE


class PadToVAESize(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyPadToVAESize",
            display_name="Pad to VAE Size (Diff-Privacy)",
            category="Diff-Privacy/image",
            description="Pads the image at the bottom and right to a multiple of 8 pixels (the VAE's factor) by "
                        "repeating its edge, so VAE Encode loses no pixel (it crops otherwise). Crop to Original "
                        "Size gives the decoded pictures their original size back.",
            inputs=[io.Image.Input("image", tooltip="picture(s) of any size")],
            outputs=[io.Image.Output(display_name="image",
                                     tooltip="padded (edge pixels repeated) to a multiple of 8, the VAE's factor")],
        )

    @classmethod
    def execute(cls, image) -> io.NodeOutput:
        return io.NodeOutput(pad_to_factor(rgb_images(image, "Pad to VAE Size")))


class CropToOriginalSize(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyCropToOriginalSize",
            display_name="Crop to Original Size (Diff-Privacy)",
            category="Diff-Privacy/image",
            description="Cuts pictures decoded from a padded latent back to the original image's size, which "
                        "key-E records (MSI Inversion, or Load Privacy Key at recovery).",
            inputs=[io.Image.Input("image", tooltip="decoded from the padded image's latent"),
                    KeyE.Input("key_e", tooltip="the key-E of the original image(s)")],
            outputs=[io.Image.Output(display_name="image", tooltip="the pictures at the original image's size")],
        )

    @classmethod
    def execute(cls, image, key_e) -> io.NodeOutput:
        image = rgb_images(image, "Crop to Original Size")
        sizes = {k.meta[SIZE_META] for k in key_e if SIZE_META in k.meta}
        if not sizes:  # a key-E made before keys recorded the size: the picture stays as decoded
            return io.NodeOutput(image)
        if len(sizes) > 1:
            raise ValueError(f"Crop to Original Size: the key-Es record different image sizes {sorted(sizes)}; "
                             "one IMAGE batch has one size: crop each image's pictures separately")
        try:
            return io.NodeOutput(crop_to_size(image, *parse_size_meta(sizes.pop())))
        except ValueError as exc:
            raise ValueError(f"Crop to Original Size: {exc}") from None
