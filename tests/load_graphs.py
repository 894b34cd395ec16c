"""The prompts of the load test: anonymize, hide and recover, with and without passphrase,
on the test-size models (64 px images, one DDIM step). Results are saved as latents:
decoding them is ComfyUI's own VAE Decode, and on a CPU it would cost more than the rest."""
from __future__ import annotations

from diffpriv_testmodels.face_models import ARCFACE_ONNX, TEST_THRESHOLD
from test_host_recovery import add, base_graph

KEY_E = "load/e.dpkey.safetensors"  # one key-E for every protection prompt (MSI is not what is measured)
PASSPHRASE = "load-pw"


def protect(image: str, mode: str, seed: int, prefix: str, passphrase: str = "", guided: bool = True) -> dict:
    """Stage II with identity guidance (face crop decoding), key-I, and the key file in output/."""
    g = base_graph()
    add(g, "img", "LoadImage", image=image)
    add(g, "enc", "VAEEncode", pixels=["img", 0], vae=["ckpt", 2])
    add(g, "key", "DiffPrivacyLoadKey", key_name=KEY_E, passphrase="")
    add(g, "sched", "DiffPrivacyEmbeddingScheduler", key_e=["key", 0], preset=mode, tau=-1.0)
    extra = {}
    if guided:
        add(g, "fr", "DiffPrivacyFaceRecognizerLoader", model_name=ARCFACE_ONNX, threshold=TEST_THRESHOLD)
        extra["guidance"] = add(g, "guide", "DiffPrivacyIdentityGuidance", face_model=["fr", 0], image=["img", 0],
                                mode=mode, lambda_scale=1.0, normalize_gradient=False, diversity=True,
                                decode_region="face crop", face_index=0, min_score=0.9, on_no_face="error",
                                gradient_checkpointing=False)
    add(g, "sample", "DiffPrivacyGuidedDDIMSampler", model=["ckpt", 0], vae=["ckpt", 2], positive=["sched", 0],
        latent=["enc", 0], preset="custom", s_ns=0.5, steps=2, samples=2 if mode == "anonymize" else 1, seed=seed,
        **extra)
    add(g, "save", "SaveLatent", samples=["sample", 0], filename_prefix=f"{prefix}/protected")
    add(g, "inv", "DiffPrivacyDDIMInversionKey", model=["ckpt", 0], latent=["enc", 0], key_e=["key", 0], steps=1,
        mode="ddim", refine_iterations=1)
    add(g, "savekey", "DiffPrivacySaveKey", key_e=["key", 0], key_i=["inv", 0], filename_prefix=f"{prefix}/key",
        folder="output", passphrase=passphrase)
    return g


def recover(key_name: str, prefix: str, passphrase: str = "") -> dict:
    g = base_graph()
    add(g, "key", "DiffPrivacyLoadKey", key_name=key_name, passphrase=passphrase)
    add(g, "rec", "DiffPrivacyRecover", model=["ckpt", 0], key_i=["key", 1], key_e=["key", 0])
    add(g, "save", "SaveLatent", samples=["rec", 0], filename_prefix=f"{prefix}/recovered")
    return g
