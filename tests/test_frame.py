"""Pictures of any size for the VAE: padding to its factor and cutting the original back out."""
from __future__ import annotations

import pytest
import torch

from diffpriv_core import frame


def test_padding_repeats_the_edge_keeps_every_pixel_and_crops_back():
    images = torch.rand(2, 13, 21, 3, generator=torch.Generator().manual_seed(0))
    padded = frame.pad_to_factor(images)
    assert padded.shape == (2, 16, 24, 3)
    assert torch.equal(padded[:, :13, :21], images)
    assert torch.equal(padded[:, 13:, :21], images[:, 12:13].expand(-1, 3, -1, -1))
    assert torch.equal(padded[:, :, 21:], padded[:, :, 20:21].expand(-1, -1, 3, -1))
    assert torch.equal(frame.crop_to_size(padded, 13, 21), images)


def test_multiples_of_eight_pass_unchanged():
    images = torch.rand(1, 16, 8, 3)
    assert frame.pad_to_factor(images) is images


def test_a_picture_smaller_than_the_original_is_refused():
    with pytest.raises(ValueError, match="smaller than the original's 21 x 13"):
        frame.crop_to_size(torch.zeros(1, 8, 24, 3), 13, 21)


def test_the_latent_frame_of_a_padded_or_a_cropped_encoding():
    assert frame.latent_offset((517, 130), (65, 17)) == (0, 0)  # padded: starts at the corner
    assert frame.latent_offset((517, 130), (64, 16)) == (1, 2)  # VAE Encode's centred crop
    assert frame.latent_offset((512, 128), (64, 16)) == (0, 0)
    with pytest.raises(ValueError, match="not the encoding of the reference image"):
        frame.latent_offset((512, 512), (32, 32))


def test_the_size_in_key_e_reads_back_and_hostile_values_are_refused():
    assert frame.parse_size_meta(frame.size_meta(491, 1137)) == (491, 1137)
    for bad in ("", "12", "axb", "0x5", "-3x4", "99999999x2", "1x2x3"):
        with pytest.raises(ValueError, match="image size"):
            frame.parse_size_meta(bad)


def test_msi_limits_say_what_to_do():
    assert frame.msi_size_problem(491, 1137) is None
    assert "at least 64 x 64 pixels, got 100 x 63" in frame.msi_size_problem(63, 100)
    assert "at most 2048 x 2048 pixels, got 970 x 2204; resize" in frame.msi_size_problem(2204, 970)
