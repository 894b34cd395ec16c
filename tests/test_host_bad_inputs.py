"""Bad inputs through the real server, for every node: each is refused before any compute
with an error naming the node, the input and what it expects (or converted as documented),
and the server keeps serving."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from diffpriv_client.comfy_http import PromptFailed
from diffpriv_core.keys import save_key
from diffpriv_testmodels.face_models import ARCFACE_ONNX, TEST_THRESHOLD
from key_helpers import forge, key_i_for
from test_host_foundation import fetch_image
from test_host_recovery import add, base_graph, random_key_e

pytestmark = pytest.mark.host

SD2_UNET = "dp-test-sd2-unet.safetensors"
VIT_H = "dp-test-vith-stub.safetensors"


def sd2_unet(checkpoint: Path, out: Path) -> None:
    """The test checkpoint's UNet reshaped into a Stable Diffusion 2.x one (linear
    projections, 1024-wide cross-attention): a checkpoint of the wrong family."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    with safe_open(str(checkpoint), "pt") as f:
        for key in f.keys():
            if not key.startswith("model.diffusion_model."):
                continue
            t, name = f.get_tensor(key), key[len("model.diffusion_model."):]
            if name.endswith(("proj_in.weight", "proj_out.weight")):
                t = t.reshape(t.shape[0], t.shape[1])
            elif name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
                t = (torch.randn(t.shape[0], 1024, generator=g) * 0.02).to(t.dtype)
            sd[name] = t
    save_file(sd, str(out))


def forged_key(path: Path, tensors: dict[str, torch.Tensor], **meta) -> None:
    """A key file with a valid digest around tensors no real key has."""
    path.write_bytes(forge(tensors, **meta))


@pytest.fixture(scope="module")
def bad(comfy_host, astronaut, test_models):
    """Uploaded pictures, latent files, models of the wrong family and key files."""
    base = comfy_host.base
    upload = comfy_host.upload
    face = np.ascontiguousarray(astronaut[::4, ::4])  # 128 x 128, the face about 25 px wide
    names = {
        "face": upload(face, "bi-face.png"),
        "face_rgba": upload(np.dstack([face, np.full(face.shape[:2], 200, np.uint8)]), "bi-face-rgba.png"),
        "face_134": upload(np.asarray(Image.fromarray(astronaut).resize((134, 134), Image.BICUBIC)), "bi-134.png"),
        "small": upload(np.ascontiguousarray(astronaut[::8, ::8]), "bi-64.png"),
        "one": upload(np.zeros((1, 1, 3), np.uint8), "bi-1.png"),
        "wide": upload(np.full((64, 2056, 3), 128, np.uint8), "bi-wide.png"),
    }
    Image.fromarray(face[..., 0]).save(base / "uploads" / "bi-grey.png")  # a one-channel PNG
    names["grey"] = comfy_host.client.upload_image(base / "uploads" / "bi-grey.png")
    for label, tensor in {"nan": torch.full((1, 4, 8, 8), float("nan")), "inf": torch.full((1, 4, 8, 8), float("inf")),
                          "empty": torch.zeros(0, 4, 8, 8), "c16": torch.zeros(1, 16, 8, 8)}.items():
        names[f"{label}.latent"] = f"bi-{label}.latent"
        save_file({"latent_tensor": tensor, "latent_format_version_0": torch.tensor([])},
                  str(base / "input" / f"bi-{label}.latent"))
    models = base / "models"
    (models / "diffusion_models").mkdir(exist_ok=True)
    sd2_unet(test_models / "checkpoints" / "dp-test-sd15.safetensors", models / "diffusion_models" / SD2_UNET)
    save_file({"vision_model.encoder.layers.30.layer_norm1.weight": torch.ones(1280)},  # detected as ViT-H/14
              str(models / "clip_vision" / VIT_H))
    key_dir = models / "diffprivacy_keys" / "bi"
    key_dir.mkdir(parents=True, exist_ok=True)
    save_key(key_dir / "e.dpkey.safetensors", random_key_e(11))
    other_e = random_key_e(12)
    other_e.meta["checkpoint"] = "0123456789abcdef"
    save_key(key_dir / "other-e.dpkey.safetensors", other_e)
    save_key(key_dir / "other-e-with-i.dpkey.safetensors", other_e, key_i_for(other_e, 10))
    e = random_key_e(13)
    forged_key(key_dir / "wide-e.dpkey.safetensors",
               {"key_e.stages": torch.zeros(10, 77, 1024), "key_e.uc": torch.zeros(1, 77, 1024)})
    forged_key(key_dir / "fp16-e.dpkey.safetensors", {"key_e.stages": e.stages.half(), "key_e.uc": e.uc.half()})
    forged_key(key_dir / "i8ch.dpkey.safetensors",
               {"key_e.stages": e.stages, "key_e.uc": e.uc, "key_i.latent": torch.zeros(8, 8, 8)},
               steps="10", inversion="ddim", refine="0")
    junk = models / "insightface" / "models" / "dp-junk"
    junk.mkdir(parents=True, exist_ok=True)
    (junk / "w600k_r50.onnx").write_bytes(np.random.default_rng(0).bytes(5000))
    (models / "arcface").mkdir(exist_ok=True)
    torch.save({"input_layer.0.weight": _RunsACommand()}, models / "arcface" / "dp-evil.pth")
    save_file({"w": torch.zeros(3)}, str(models / "arcface" / "dp-other.safetensors"))
    return names


MARKER = Path("/tmp") / f"dp-recogniser-pickle-ran-{os.getpid()}"


class _RunsACommand:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def refused(host, graph: dict, match: str) -> None:
    with pytest.raises(PromptFailed, match=match):
        host.client.run(graph, timeout=300)
    assert host.client.is_up()


def msi(g: dict, image: list, clip_vision: str = "dp-test-vitl14.safetensors", model: list | None = None) -> dict:
    add(g, "cv", "CLIPVisionLoader", clip_name=clip_vision)
    add(g, "msi", "DiffPrivacyMSIInversion", model=model or ["ckpt", 0], clip=["ckpt", 1], vae=["ckpt", 2],
        clip_vision=["cv", 0], image=image, preset="fast", steps=1, lr=0.0, seed=0)
    add(g, "save", "SaveImage", images=["msi", 1], filename_prefix="bad/msi")
    return g


def guidance(g: dict, image: list, on_no_face: str = "skip") -> list:
    add(g, "fr", "DiffPrivacyFaceRecognizerLoader", model_name=ARCFACE_ONNX, threshold=TEST_THRESHOLD)
    add(g, "guide", "DiffPrivacyIdentityGuidance", face_model=["fr", 0], image=image, mode="anonymize",
        lambda_scale=1.0, normalize_gradient=False, diversity=True, decode_region="whole image", face_index=0,
        min_score=0.9, on_no_face=on_no_face, gradient_checkpointing=False)
    return ["guide", 0]


def sampler(g: dict, latent: list, model: list | None = None, **extra) -> dict:
    add(g, "key", "DiffPrivacyLoadKey", key_name="bi/e.dpkey.safetensors", passphrase="")
    add(g, "sched", "DiffPrivacyEmbeddingScheduler", key_e=["key", 0], preset="anonymize", tau=0.4)
    add(g, "sample", "DiffPrivacyGuidedDDIMSampler", model=model or ["ckpt", 0], vae=["ckpt", 2],
        positive=["sched", 0], latent=latent, preset="custom", s_ns=0.5, steps=2, samples=1, seed=0, **extra)
    add(g, "save", "SaveLatent", samples=["sample", 0], filename_prefix="bad/sample")
    return g


def inversion(g: dict, latent: list, model: list | None = None, key: str = "bi/e.dpkey.safetensors") -> dict:
    add(g, "key", "DiffPrivacyLoadKey", key_name=key, passphrase="")
    add(g, "inv", "DiffPrivacyDDIMInversionKey", model=model or ["ckpt", 0], latent=latent, key_e=["key", 0],
        steps=2, mode="ddim", refine_iterations=1)
    add(g, "savekey", "DiffPrivacySaveKey", key_e=["key", 0], key_i=["inv", 0], filename_prefix="bad/key",
        folder="output", passphrase="")
    return g


def recover(g: dict, key: str, model: list | None = None) -> dict:
    add(g, "key", "DiffPrivacyLoadKey", key_name=key, passphrase="")
    add(g, "rec", "DiffPrivacyRecover", model=model or ["ckpt", 0], key_i=["key", 1], key_e=["key", 0])
    add(g, "save", "SaveLatent", samples=["rec", 0], filename_prefix="bad/recover")
    return g


def image_node(g: dict, name: str) -> list:
    return add(g, "img", "LoadImage", image=name)


def encoded(g: dict, name: str) -> list:
    return add(g, "enc", "VAEEncode", pixels=image_node(g, name), vae=["ckpt", 2])


def nan_image(g: dict) -> list:
    """A NaN IMAGE: VAE Decode of a NaN latent (its clamp keeps NaN)."""
    add(g, "nanlat", "LoadLatent", latent="bi-nan.latent")
    return add(g, "nanimg", "VAEDecode", samples=["nanlat", 0], vae=["ckpt", 2])


def image_node_as(g: dict, name: str) -> list:
    return add(g, "ref", "LoadImage", image=name)


def sd2_model(g: dict) -> list:
    return add(g, "unet2", "UNETLoader", unet_name=SD2_UNET, weight_dtype="default")


# --- images --------------------------------------------------------------------------------

@pytest.mark.parametrize("case, match", [
    ("one", "at least 64 x 64 pixels, got 1 x 1"),
    ("wide", "at most 2048 x 2048 pixels, got 2056 x 64"),
    ("nan", "MSI Inversion: 'image' holds NaN or infinite values"),
    ("sd2", r"MSI Inversion: 'model' must be a Stable Diffusion 1.x checkpoint .* SD20 .* 1024-wide"),
    ("vith", "MSI needs the OpenAI CLIP ViT-L/14 .* given is clip with hidden size 1280, 32 layers"),
])
def test_msi_refuses_images_and_models_it_cannot_use(comfy_host, bad, case, match):
    g = base_graph()
    if case == "nan":
        msi(g, nan_image(g))
    elif case == "sd2":
        msi(g, image_node(g, bad["small"]), model=sd2_model(g))
    elif case == "vith":
        msi(g, image_node(g, bad["small"]), clip_vision=VIT_H)
    else:
        msi(g, image_node(g, bad[case]))
    refused(comfy_host, g, match)


@pytest.mark.parametrize("case, match", [
    ("one", "Identity Guidance: 'image' is 1 x 1 pixels; it needs at least 20 x 20"),
    ("nan", "Identity Guidance: 'image' holds NaN or infinite values"),
])
def test_identity_guidance_refuses_unusable_images(comfy_host, bad, case, match):
    g = base_graph()
    image = nan_image(g) if case == "nan" else image_node(g, bad[case])
    add(g, "save", "SaveImage", images=[guidance(g, image)[0], 1], filename_prefix="bad/aligned")
    refused(comfy_host, g, match)


@pytest.mark.parametrize("case, match", [
    ("one", "Face Detect: 'image' is 1 x 1 pixels"),
    ("nan", "Face Detect: 'image' holds NaN or infinite values"),
])
def test_face_detect_refuses_unusable_images(comfy_host, bad, case, match):
    g = base_graph()
    image = nan_image(g) if case == "nan" else image_node(g, bad[case])
    add(g, "fd", "DiffPrivacyFaceDetect", image=image, select="all", index=0, min_size=20, min_score=0.9,
        on_no_face="error")
    add(g, "mi", "MaskToImage", mask=["fd", 1])
    add(g, "save", "SaveImage", images=["mi", 0], filename_prefix="bad/facemask")
    refused(comfy_host, g, match)


def test_rgba_and_grey_pictures_are_used_as_rgb(comfy_host, bad):
    """RGBA drops its alpha (as VAE Encode does): the recogniser sees exactly the RGB face,
    and the face detector finds the same box. A grey PNG arrives as RGB (Load Image)."""
    def aligned_and_mask(image_graph) -> tuple[np.ndarray, np.ndarray]:
        g = base_graph()
        image = image_graph(g)
        add(g, "save", "SaveImage", images=[guidance(g, image, on_no_face="error")[0], 1], filename_prefix="bad/rgba")
        add(g, "fd", "DiffPrivacyFaceDetect", image=image, select="all", index=0, min_size=20, min_score=0.9,
            on_no_face="error")
        add(g, "mi", "MaskToImage", mask=["fd", 1])
        add(g, "savemask", "SaveImage", images=["mi", 0], filename_prefix="bad/rgba-mask")
        result = comfy_host.client.run(g, timeout=300)
        return tuple(fetch_image(comfy_host, result.files(node)[0]) for node in ("save", "savemask"))

    def rgba(g):
        loaded = image_node(g, bad["face_rgba"])
        return add(g, "join", "JoinImageWithAlpha", image=loaded, alpha=[loaded[0], 1])

    rgb_face, rgb_mask = aligned_and_mask(lambda g: image_node(g, bad["face"]))
    rgba_face, rgba_mask = aligned_and_mask(rgba)
    assert rgb_face.shape == (112, 112, 3) and rgb_mask.max() == 255
    assert np.array_equal(rgba_face, rgb_face) and np.array_equal(rgba_mask, rgb_mask)

    g = base_graph()
    add(g, "save", "SaveImage", images=[guidance(g, image_node(g, bad["grey"]))[0], 1], filename_prefix="bad/grey")
    (record,) = comfy_host.client.run(g, timeout=300).files("save")
    assert fetch_image(comfy_host, record).shape == (112, 112, 3)


def test_guided_ddim_sampler_in_samplercustom_refuses_guidance_for_another_image(comfy_host, bad):
    g = base_graph()
    latent = encoded(g, bad["small"])  # 64 px; the guidance's reference is the 128 px picture
    guide = guidance(g, image_node_as(g, bad["face"]), on_no_face="error")
    add(g, "key", "DiffPrivacyLoadKey", key_name="bi/e.dpkey.safetensors", passphrase="")
    add(g, "sched", "DiffPrivacyEmbeddingScheduler", key_e=["key", 0], preset="anonymize", tau=0.4)
    add(g, "sampler", "DiffPrivacyGuidedDDIM", vae=["ckpt", 2], guidance=guide, image_index=0)
    add(g, "sigmas", "BasicScheduler", model=["ckpt", 0], scheduler="ddim_uniform", steps=4, denoise=0.5)
    add(g, "custom", "SamplerCustom", model=["ckpt", 0], add_noise=True, noise_seed=0, cfg=1.0, positive=["sched", 0],
        negative=["sched", 0], sampler=["sampler", 0], sigmas=["sigmas", 0], latent_image=latent)
    add(g, "save", "SaveLatent", samples=["custom", 0], filename_prefix="bad/custom")
    refused(comfy_host, g, r"Guided DDIM: image 0 of 'latent' does not match 'guidance'")


@pytest.mark.parametrize("name, match", [
    ("insightface/models/dp-junk/w600k_r50.onnx", "w600k_r50.onnx is damaged or not a face recogniser"),
    ("arcface/dp-evil.pth", "dp-evil.pth holds pickled objects other than weights and was refused"),
    ("arcface/dp-other.safetensors", "neither an IR-SE .* nor a FaceNet"),
])
def test_files_that_are_not_face_recognisers_are_refused(comfy_host, bad, name, match):
    g = base_graph()
    image = image_node(g, bad["face"])
    add(g, "fr", "DiffPrivacyFaceRecognizerLoader", model_name=name)
    add(g, "guide", "DiffPrivacyIdentityGuidance", face_model=["fr", 0], image=image, mode="anonymize",
        lambda_scale=1.0, normalize_gradient=False, diversity=True, decode_region="whole image", face_index=0,
        min_score=0.9, on_no_face="skip", gradient_checkpointing=False)
    add(g, "save", "SaveImage", images=["guide", 1], filename_prefix="bad/aligned")
    refused(comfy_host, g, match)
    assert not MARKER.exists()


def test_a_side_not_divisible_by_8_is_cropped_like_vae_encode(comfy_host, bad):
    """134 px: VAE Encode keeps the centred 128 px; the guidance follows that crop."""
    g = base_graph()
    latent = encoded(g, bad["face_134"])
    sampler(g, latent, guidance=guidance(g, ["img", 0], on_no_face="error"))
    (record,) = comfy_host.client.run(g, timeout=300).files("save", "latents")
    assert record["filename"].endswith(".latent")


# --- latents, models, batches ------------------------------------------------------------------

LATENT_CASES = [
    ("nan.latent", "'latent' holds NaN or infinite values"),
    ("inf.latent", "'latent' holds NaN or infinite values"),
    ("empty.latent", "'latent' is an empty batch"),
    ("c16.latent", "'latent' has 16 channels; an SD 1.x VAE makes 4"),
]


@pytest.mark.parametrize("node", ["sampler", "inversion"])
@pytest.mark.parametrize("case, match", LATENT_CASES)
def test_latents_that_are_not_sd1_latents_are_refused(comfy_host, bad, node, case, match):
    g = base_graph()
    latent = add(g, "lat", "LoadLatent", latent=bad[case])
    build, label = (sampler, "Guided DDIM Sampler") if node == "sampler" else (inversion, "DDIM Inversion Key")
    build(g, latent)
    refused(comfy_host, g, f"{label}: {match}")


@pytest.mark.parametrize("node", ["sampler", "inversion", "recover"])
def test_a_checkpoint_of_another_family_is_refused(comfy_host, bad, node):
    g = base_graph()
    model = sd2_model(g)
    if node == "recover":
        recover(g, "bi/other-e-with-i.dpkey.safetensors", model=model)
        label = "Recover"
    else:
        (sampler if node == "sampler" else inversion)(g, encoded(g, bad["small"]), model=model)
        label = "Guided DDIM Sampler" if node == "sampler" else "DDIM Inversion Key"
    refused(comfy_host, g, rf"{label}: 'model' must be a Stable Diffusion 1.x checkpoint .* SD20 .* 1024-wide")


def test_guidance_for_other_images_than_the_latent_is_refused(comfy_host, bad):
    # Two reference images for three latents.
    g = base_graph()
    latent = add(g, "three", "RepeatLatentBatch", samples=encoded(g, bad["face"]), amount=3)
    pair = add(g, "pair", "ImageBatch", image1=["img", 0], image2=["img", 0])
    sampler(g, latent, guidance=guidance(g, pair))
    refused(comfy_host, g, "'guidance' holds 2 reference images but 'latent' has 3; give one reference image per")
    # The reference is the 128 px picture, the latent encodes a 64 px one.
    g = base_graph()
    sampler(g, encoded(g, bad["small"]), guidance=guidance(g, image_node_as(g, bad["face"]), on_no_face="error"))
    refused(comfy_host, g, r"image 0 of 'latent' does not match 'guidance': the latent \(64 x 64 px\) is not the "
                           r"encoding of the reference image \(128 x 128 px\)")


def test_a_mask_batch_that_fits_neither_one_nor_every_image_is_refused(comfy_host, bad):
    g = base_graph()
    latent = add(g, "three", "RepeatLatentBatch", samples=encoded(g, bad["small"]), amount=3)
    pair = add(g, "pair", "ImageBatch", image1=["img", 0], image2=["img", 0])
    mask = add(g, "mask", "ImageToMask", image=pair, channel="red")
    sampler(g, latent, mask=mask)
    refused(comfy_host, g, "Guided DDIM Sampler: 'mask' holds 2 masks but 'latent' has 3")


# --- keys ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, match", [
    ("bi/wide-e.dpkey.safetensors", r"key_e.stages is F32 \[10, 77, 1024\]; a Diff-Privacy key has float32"),
    ("bi/fp16-e.dpkey.safetensors", r"key_e.stages is F16 \[10, 77, 768\]"),
    ("bi/i8ch.dpkey.safetensors", r"key_i.latent is F32 \[8, 8, 8\]; a Diff-Privacy key has float32 \[4, height"),
])
def test_keys_of_wrong_shape_or_dtype_are_refused_at_load(comfy_host, bad, key, match):
    refused(comfy_host, recover(base_graph(), key), match)


def test_a_key_e_made_with_another_checkpoint_is_refused(comfy_host, bad):
    g = base_graph()
    inversion(g, encoded(g, bad["small"]), key="bi/other-e.dpkey.safetensors")
    refused(comfy_host, g, "this key-E was made with another checkpoint")
    refused(comfy_host, recover(base_graph(), "bi/other-e-with-i.dpkey.safetensors"),
            "this key-E was made with another checkpoint")


def test_key_names_cannot_leave_the_key_folder_and_files_are_owner_only(comfy_host, bad):
    before = set(Path("/tmp").glob("bi-abs*"))
    for prefix in ("/tmp/bi-abs", "bi/../../../bi-escape"):
        g = base_graph()
        add(g, "key", "DiffPrivacyLoadKey", key_name="bi/e.dpkey.safetensors", passphrase="")
        add(g, "savekey", "DiffPrivacySaveKey", key_e=["key", 0], filename_prefix=prefix, folder="keys", passphrase="")
        refused(comfy_host, g, "invalid key file name")
    assert set(Path("/tmp").glob("bi-abs*")) == before
    assert not list(comfy_host.base.glob("**/bi-escape*"))

    g = base_graph()
    add(g, "key", "DiffPrivacyLoadKey", key_name="bi/e.dpkey.safetensors", passphrase="")
    for folder, passphrase in (("keys", ""), ("output", "pw")):
        add(g, f"save-{folder}", "DiffPrivacySaveKey", key_e=["key", 0], filename_prefix="bi/perm", folder=folder,
            passphrase=passphrase)
    result = comfy_host.client.run(g, timeout=300)
    for node in ("save-keys", "save-output"):
        (record,) = result.files(node, "diffprivacy_keys")
        path = comfy_host.saved_file(record)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_after_all_bad_inputs_the_next_prompt_runs(comfy_host, bad):
    g = base_graph()
    sampler(g, encoded(g, bad["small"]))
    (record,) = comfy_host.client.run(g, timeout=300).files("save", "latents")
    assert record["filename"].endswith(".latent")


# --- what no stock node can send: the shared checks called directly ----------------------------

def test_the_shared_checks_convert_and_refuse_in_process(comfy_inproc):
    inputs = comfy_inproc.pack.nodes.inputs
    protect = comfy_inproc.pack.nodes.protect
    rgb = torch.rand(2, 16, 24, 3)
    infinite = rgb.clone()
    infinite[1, 3, 4, 0] = float("inf")
    grey = inputs.rgb_images(rgb[..., :1], "Node")
    assert grey.shape == (2, 16, 24, 3) and torch.equal(grey[..., 2], rgb[..., 0])
    assert torch.equal(inputs.rgb_images(torch.cat([rgb, torch.zeros(2, 16, 24, 1)], -1), "Node"), rgb)
    for image, match in ((torch.zeros(0, 16, 16, 3), "Node: 'image' is an empty batch"),
                         (torch.zeros(1, 16, 16, 2), "has 2 channels; expected 1 \\(grey\\), 3 \\(RGB\\) or 4"),
                         (torch.zeros(16, 16, 3), "must be an IMAGE batch"),
                         (infinite, "'image' holds NaN or infinite values \\(batch entry 1\\)")):
        with pytest.raises(ValueError, match=match):
            inputs.rgb_images(image, "Node")
    with pytest.raises(ValueError, match="'key_e' holds 2 key-Es but 'latent' has 3; give one key-E per image"):
        inputs.per_image([1, 2], 3, "DDIM Inversion Key", "key_e", "key-E", "latent")
    assert inputs.per_image([1], 3, "N", "key_e", "key-E", "latent") == [1, 1, 1]
    rows = [[torch.zeros(2, 77, 768), {}]]
    with pytest.raises(ValueError, match="'positive' holds 2 conditioning rows but 'latent' has 3"):
        protect.check_conditioning(rows, 3, "Guided DDIM Sampler")
    protect.check_conditioning(rows, 2, "Guided DDIM Sampler")
    with pytest.raises(ValueError, match=r"conditionings of shape \(1, 77, 2048\); SD 1.x needs"):
        protect.check_conditioning([[torch.zeros(1, 77, 2048), {}]], 1, "Guided DDIM Sampler")
