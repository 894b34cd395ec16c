"""Photos as people's files are, turned into the picture the command sends (no server):
every EXIF orientation, 16- and 32-bit pixels, palettes, CMYK, transparency, ICC profiles,
and none of the file's metadata in what is sent."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageCms, ImageOps, PngImagePlugin

from diffpriv_client.pictures import PhotoError, decode_picture, read_photo

# sRGB's colorants (D50), as in its ICC profile.
SRGB_RED, SRGB_GREEN, SRGB_BLUE = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
SERIAL, OWNER, PLACE = "SN-4242-TEST-0042", "Jane Q. Example", "Rue de la Paix"


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """A real face photo, 80 x 60 (wider than high, so a turn shows)."""
    return np.ascontiguousarray(skimage.data.astronaut()[40:200:2, 140:300:2][:60])


def png_chunks(data: bytes) -> list[bytes]:
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        chunks.append(data[at + 4:at + 8])
        at += 12 + length
    return chunks


def icc_profile(red, green, blue, gamma: float = 2.2, name: str = "test primaries") -> bytes:
    """A minimal ICC v2 RGB matrix/TRC display profile with these colorants (XYZ, D50)."""
    def fixed(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(v):
        return b"XYZ " + bytes(4) + b"".join(fixed(c) for c in v)

    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    text = name.encode() + b"\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8 + 3 + 67)
    tags = [(b"desc", desc), (b"wtpt", xyz((0.9642, 1.0, 0.8249))), (b"rXYZ", xyz(red)), (b"gXYZ", xyz(green)),
            (b"bXYZ", xyz(blue)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(28) + fixed(0.9642) + fixed(1.0) + fixed(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_the_picture_viewers_show(face, tmp_path, orientation):
    # Store the pixels so that a viewer applying the orientation shows ``face``.
    undo = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
            4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE], 6: [Image.Transpose.ROTATE_90],
            7: [Image.Transpose.TRANSVERSE], 8: [Image.Transpose.ROTATE_270]}.get(orientation, [])
    stored = Image.fromarray(face)
    for step in undo:
        stored = stored.transpose(step)
    exif = stored.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif)
    photo = read_photo(path)
    assert photo.size == (80, 60) and np.array_equal(photo.pixels, face)
    assert np.array_equal(photo.pixels, np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))
    assert ("turned upright (EXIF orientation %d)" % orientation in photo.notes) == (orientation != 1)


def test_16_bit_scans_are_scaled_by_their_range_not_clipped(face, tmp_path):
    gray = face.mean(axis=-1) / 255.0
    levels = np.rint(gray * 65535).astype(np.uint16)  # what a scanner writes
    expected = np.rint(levels * (255 / 65535)).astype(np.uint8)
    for name in ("scan.png", "scan.tif"):
        Image.fromarray(levels).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == "I;16"
        photo = read_photo(tmp_path / name)
        assert np.array_equal(photo.pixels, np.repeat(expected[..., None], 3, axis=-1)), name
        assert photo.notes == ("16-bit grayscale scaled to 8 bits",)
    big_endian = Image.frombytes("I;16B", levels.shape[::-1], levels.astype(">u2").tobytes())
    big_endian.save(tmp_path / "scan_be.tif")
    assert np.array_equal(read_photo(tmp_path / "scan_be.tif").pixels[..., 0], expected)
    # A float TIFF in 0..1, and 16-bit colour (PIL keeps each channel's top 8 bits).
    Image.fromarray(gray.astype(np.float32)).save(tmp_path / "float.tif")
    assert np.abs(read_photo(tmp_path / "float.tif").pixels[..., 0].astype(int) - np.rint(gray * 255)).max() <= 1
    import cv2  # writes 16-bit colour PNGs, which PIL cannot

    colour16 = (face.astype(np.uint16) * 257 + 100)[..., ::-1]
    cv2.imwrite(str(tmp_path / "colour16.png"), colour16)
    assert np.array_equal(read_photo(tmp_path / "colour16.png").pixels, (colour16[..., ::-1] >> 8).astype(np.uint8))


def test_other_modes_come_out_as_plain_rgb(face, tmp_path):
    picture = Image.fromarray(face)
    cases = {"palette.png": picture.convert("P"), "gray.png": picture.convert("L"), "bilevel.png": picture.convert("1"),
             "cmyk.jpg": picture.convert("CMYK"), "lab.tif": ImageCms.profileToProfile(
                 picture, ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), outputMode="LAB")}
    for name, image in cases.items():
        image.save(tmp_path / name, **({"quality": 95} if name.endswith(".jpg") else {}))
        photo = read_photo(tmp_path / name)
        assert photo.pixels.shape == face.shape and photo.pixels.dtype == np.uint8, name
        if image.mode in ("P", "L", "1"):  # exactly the colours the file holds
            assert np.array_equal(photo.pixels, np.asarray(image.convert("RGB"))), name
        else:  # CMYK (JPEG) and CIELab (TIFF) pixels back in RGB
            assert np.abs(photo.pixels.astype(int) - face).mean() < 4, name
    # Transparency is flattened onto white: a half-transparent photo is half as dark.
    rgba = np.dstack([face, np.full(face.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    photo = read_photo(tmp_path / "alpha.png")
    assert np.abs(photo.pixels - (face * (128 / 255) + 255 * (127 / 255))).max() <= 1
    assert "transparent parts flattened onto white" in photo.notes


def test_an_icc_profile_is_converted_to_srgb(face, tmp_path):
    # A profile whose red, green and blue are sRGB's green, blue and red: in sRGB, the file's
    # (r, g, b) is (b, r, g) (within the gap between gamma 2.2 and sRGB's curve).
    Image.fromarray(face).save(tmp_path / "rolled.png", icc_profile=icc_profile(SRGB_GREEN, SRGB_BLUE, SRGB_RED))
    photo = read_photo(tmp_path / "rolled.png")
    error = np.abs(photo.pixels.astype(int) - np.roll(face, 1, axis=-1))
    assert error.max() <= 12 and error.mean() < 4, (error.max(), error.mean())
    assert photo.notes == ("colours converted from its ICC profile (test primaries) to sRGB",)
    # A profile for other pixels than the file's is ignored, and says so.
    Image.fromarray(face).convert("L").save(tmp_path / "gray.png", icc_profile=icc_profile(SRGB_RED, SRGB_GREEN,
                                                                                           SRGB_BLUE))
    photo = read_photo(tmp_path / "gray.png")
    assert photo.notes == ("its ICC profile (test primaries) is for RGB pixels, not L: ignored",)


def test_nothing_of_the_file_but_its_pixels_is_sent(face, tmp_path):
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "ExampleCam", "Model X", 6
    exif.get_ifd(0x8769)[0xA431] = SERIAL  # the camera's body serial number
    exif.get_ifd(0x8769)[0xA430] = OWNER  # its owner
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 52.0, 10.0), 3: "E", 4: (2.0, 19.0, 55.0)})  # GPS
    xmp = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           f'<rdf:Description xmlns:mwg-rs="http://www.metadataworkinggroup.com/schemas/regions/">'
           f'<mwg-rs:Name>{OWNER}</mwg-rs:Name></rdf:Description></rdf:RDF></x:xmpmeta>').encode()
    path = tmp_path / "phone.jpg"
    Image.fromarray(face).save(path, exif=exif, xmp=xmp, comment=f"taken at {PLACE}".encode(), quality=95)
    original = open(path, "rb").read()
    assert all(s.encode() in original for s in (SERIAL, OWNER, PLACE)), "the file carries them"
    assert Image.open(path).getexif().get_ifd(0x8825), "and its GPS position"
    photo = read_photo(path)
    sent = photo.png()
    assert set(png_chunks(sent)) == {b"IHDR", b"IDAT", b"IEND"}, "pixels only: no eXIf, iTXt, tEXt, iCCP, pHYs"
    assert not any(s.encode() in sent for s in (SERIAL, OWNER, PLACE, "ExampleCam"))
    assert np.array_equal(decode_picture(sent), photo.pixels) and photo.size == (60, 80), "upright"
    assert not Image.open(io.BytesIO(sent)).getexif()


def test_files_the_command_cannot_send_are_refused_with_the_reason(face, tmp_path):
    frames = [Image.fromarray(face), Image.fromarray(face[::-1])]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(PhotoError, match="holds 2 frames"):
        read_photo(tmp_path / "anim.gif")
    frames[0].save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:200])
    with pytest.raises(PhotoError, match="not a readable image"):
        read_photo(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(PhotoError, match="not a readable image"):
        read_photo(tmp_path / "text.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "fine")
    Image.fromarray(face).save(tmp_path / "ok.png", pnginfo=info)
    assert read_photo(tmp_path / "ok.png").notes == ()
