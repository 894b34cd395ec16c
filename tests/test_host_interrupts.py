"""Cancel (POST /interrupt) during every long loop of the pack, in the real server: MSI
training, guided sampling, DDIM inversion and recovery. Each stops within a couple of
steps, the history records the interruption, no key file (or partial file) is left, and
the next prompt runs normally."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from diffpriv_client.comfy_http import PromptFailed
from diffpriv_core.keys import load_key, save_key
from test_host_protect import add_guided_sampling
from key_helpers import key_i_for
from test_host_recovery import add, base_graph, random_key_e

pytestmark = pytest.mark.host

SLACK = 2  # steps a loop may still report after the interrupt was sent (messages in flight)


@pytest.fixture(scope="module")
def setup(comfy_host, astronaut):
    keys = comfy_host.keys / "int"
    keys.mkdir(exist_ok=True)
    save_key(keys / "e.dpkey.safetensors", random_key_e(21))
    for steps in (300, 3):
        key_e = random_key_e(22)
        save_key(keys / f"ei{steps}.dpkey.safetensors", key_e, key_i_for(key_e, steps))
    return {"small": comfy_host.upload(np.ascontiguousarray(astronaut[::8, ::8]), "int-64.png"),
            "face": comfy_host.upload(np.ascontiguousarray(astronaut[::4, ::4]), "int-128.png")}


def files_under(host) -> set[Path]:
    """Every file, dotfiles and .part files included, where keys and outputs are written."""
    roots = (host.keys, host.base / "output")
    return {p for root in roots for p in root.rglob("*") if p.is_file()}


def interrupt_while_running(host, graph: dict, node: str, after: int) -> dict:
    """Queue ``graph``; once ``node`` has reported ``after`` steps, POST /interrupt for this
    prompt. Returns what was seen: the step at the interrupt, the last step reported, the
    step count, and the seconds from the interrupt to the end of the prompt."""
    client = host.client
    seen = {"at": None, "last": 0, "max": None}
    prompt_id = client.queue(graph)

    def on_progress(progress):
        if progress.get("node") != node:
            return
        seen["last"], seen["max"] = max(seen["last"], progress["value"]), progress["max"]
        if seen["at"] is None and progress["value"] >= after:
            seen["at"], seen["sent"] = progress["value"], time.monotonic()
            client.post("/interrupt", {"prompt_id": prompt_id})

    with pytest.raises(PromptFailed, match="interrupted") as failure:
        client.wait(prompt_id, timeout=900, on_progress=on_progress)
    seen["stop_s"] = time.monotonic() - seen["sent"]
    print(f"\n{node}: interrupt sent at step {seen['at']}/{seen['max']}, last step reported {seen['last']}, "
          f"prompt ended {seen['stop_s']:.1f} s later")
    assert failure.value.node_type and failure.value.details.get("node_id") == node, failure.value.details
    entry = client.history(prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    # Nodes that finished before the interrupt may report (pass counts); the interrupted
    # node reports nothing and no file reaches the history.
    outputs = entry.get("outputs") or {}
    assert node not in outputs, outputs
    assert not any(key in out for out in outputs.values() for key in ("images", "diffprivacy_keys")), outputs
    return seen


def check_stopped_early(seen: dict) -> None:
    assert seen["at"] is not None, "the loop never reported progress"
    assert seen["last"] <= seen["at"] + SLACK, seen
    assert seen["last"] < seen["max"] // 4, seen  # far from the full run


def msi_graph(image: str, steps: int, seed: int) -> dict:
    g = base_graph()
    add(g, "img", "LoadImage", image=image)
    add(g, "cv", "CLIPVisionLoader", clip_name="dp-test-vitl14.safetensors")
    add(g, "msi", "DiffPrivacyMSIInversion", model=["ckpt", 0], clip=["ckpt", 1], vae=["ckpt", 2],
        clip_vision=["cv", 0], image=["img", 0], preset="fast", steps=steps, lr=0.0, seed=seed)
    # key-I from this key-E with the same checkpoint: accepted (the fingerprints agree)
    add(g, "enc", "VAEEncode", pixels=["img", 0], vae=["ckpt", 2])
    add(g, "inv", "DiffPrivacyDDIMInversionKey", model=["ckpt", 0], latent=["enc", 0], key_e=["msi", 0], steps=1,
        mode="ddim", refine_iterations=1)
    add(g, "savekey", "DiffPrivacySaveKey", key_e=["msi", 0], key_i=["inv", 0], filename_prefix="int/msi",
        folder="keys", passphrase="")
    return g


def sampler_graph(image: str, steps: int, seed: int) -> dict:
    g = base_graph()
    add(g, "img", "LoadImage", image=image)
    add(g, "enc", "VAEEncode", pixels=["img", 0], vae=["ckpt", 2])
    add(g, "key", "DiffPrivacyLoadKey", key_name="int/e.dpkey.safetensors", passphrase="")
    decoded = add_guided_sampling(g, ["img", 0], ["enc", 0], ["key", 0], s_ns=1.0, steps=steps, samples=1, seed=seed)
    add(g, "save", "SaveImage", images=decoded, filename_prefix="int/protected")
    return g


def inversion_graph(image: str, steps: int, refine: int = 1) -> dict:
    g = base_graph()
    add(g, "img", "LoadImage", image=image)
    add(g, "enc", "VAEEncode", pixels=["img", 0], vae=["ckpt", 2])
    add(g, "key", "DiffPrivacyLoadKey", key_name="int/e.dpkey.safetensors", passphrase="")
    add(g, "inv", "DiffPrivacyDDIMInversionKey", model=["ckpt", 0], latent=["enc", 0], key_e=["key", 0],
        steps=steps, mode="ddim", refine_iterations=refine)
    add(g, "savekey", "DiffPrivacySaveKey", key_e=["key", 0], key_i=["inv", 0], filename_prefix="int/inv",
        folder="output", passphrase="pw")
    return g


def recover_graph(key: str) -> dict:
    g = base_graph()
    add(g, "key", "DiffPrivacyLoadKey", key_name=key, passphrase="")
    add(g, "rec", "DiffPrivacyRecover", model=["ckpt", 0], key_i=["key", 1], key_e=["key", 0])
    add(g, "dec", "VAEDecode", samples=["rec", 0], vae=["ckpt", 2])
    add(g, "save", "SaveImage", images=["dec", 0], filename_prefix="int/recovered")
    return g


def saved_key(host, result, node: str, passphrase: str | None = None) -> Path:
    (record,) = result.files(node, "diffprivacy_keys")
    path = host.saved_file(record)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    load_key(path, passphrase)  # complete and valid
    return path


def test_interrupting_msi_training(comfy_host, setup):
    before = files_under(comfy_host)
    seen = interrupt_while_running(comfy_host, msi_graph(setup["small"], steps=400, seed=31), "msi", after=1)
    check_stopped_early(seen)
    assert files_under(comfy_host) == before
    result = comfy_host.client.run(msi_graph(setup["small"], steps=1, seed=32), timeout=900)
    key_e, key_i, _ = load_key(saved_key(comfy_host, result, "savekey"))
    assert key_e.stages.shape == (10, 77, 768) and key_i.latent.shape == (4, 8, 8)
    assert key_e.meta["checkpoint"] == key_i.meta["checkpoint"]  # both made with this checkpoint


def test_interrupting_guided_sampling(comfy_host, setup):
    before = files_under(comfy_host)
    seen = interrupt_while_running(comfy_host, sampler_graph(setup["face"], steps=100, seed=41), "sample", after=1)
    check_stopped_early(seen)
    assert files_under(comfy_host) == before
    result = comfy_host.client.run(sampler_graph(setup["face"], steps=2, seed=42), timeout=900)
    assert len(result.files("save")) == 1


def test_interrupting_ddim_inversion(comfy_host, setup):
    before = files_under(comfy_host)
    seen = interrupt_while_running(comfy_host, inversion_graph(setup["small"], steps=300), "inv", after=2)
    check_stopped_early(seen)
    assert files_under(comfy_host) == before
    result = comfy_host.client.run(inversion_graph(setup["small"], steps=3), timeout=900)
    saved_key(comfy_host, result, "savekey", passphrase="pw")


def test_interrupting_recovery(comfy_host, setup):
    before = files_under(comfy_host)
    seen = interrupt_while_running(comfy_host, recover_graph("int/ei300.dpkey.safetensors"), "rec", after=2)
    check_stopped_early(seen)
    assert files_under(comfy_host) == before
    result = comfy_host.client.run(recover_graph("int/ei3.dpkey.safetensors"), timeout=900)
    assert len(result.files("save")) == 1
