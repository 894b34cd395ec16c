"""Load through the HTTP API: 50 mixed prompts (anonymize, hide, recover; with and without
passphrase) queued at once on the real server with the test-size models. Every prompt
gets exactly its own result in /history, and the server's memory after the run is back
within a small margin of its level after a warm-up (no growth per prompt)."""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

import load_graphs
from diffpriv_core.keys import load_key, save_key
from key_helpers import key_i_for, random_key_e

pytestmark = pytest.mark.host

PROMPTS = 50
KINDS = ("anonymize", "hide-pw", "recover", "recover-pw", "anonymize-pw", "hide")
SAMPLES = {"anonymize": 2, "anonymize-pw": 2, "hide": 1, "hide-pw": 1, "recover": 1, "recover-pw": 1}
# Allowed RSS growth over the whole run. What the run legitimately adds is tiny (50 history
# entries and prompt graphs, a few kB each); allocator noise after the warm-up measured about
# 15 MiB. A leak of one key-E per prompt (2.4 MB) would add 120 MB over 50 prompts, one kept
# VAE decoder copy per prompt far more.
RSS_MARGIN_MB = 64


@pytest.fixture(scope="module")
def load_setup(comfy_host, astronaut):
    keys = comfy_host.keys / "load"
    keys.mkdir(exist_ok=True)
    save_key(comfy_host.keys / load_graphs.KEY_E, random_key_e(51))
    recover_keys = {"recover": [], "recover-pw": []}
    for n in range(4):  # several keys, so consecutive recoveries are not served from ComfyUI's cache
        key_e = random_key_e(60 + n)
        key_i = key_i_for(key_e, 1, torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(n)))
        for kind, passphrase in (("recover", None), ("recover-pw", load_graphs.PASSPHRASE)):
            name = f"load/r{n}{'-pw' if passphrase else ''}.dpkey.safetensors"
            save_key(keys.parent / name, key_e, key_i, passphrase)
            recover_keys[kind].append(name)
    # Face crops of the astronaut (64 x 64), so consecutive protections encode different pictures.
    images = [comfy_host.upload(np.ascontiguousarray(astronaut[30 + 10 * k:222 + 10 * k:3, 150 + 5 * k:342 + 5 * k:3]),
                                f"load-{k}.png") for k in range(5)]
    return images, recover_keys


def prompt(kind: str, n: int, images: list[str], recover_keys: dict, prefix: str) -> dict:
    passphrase = load_graphs.PASSPHRASE if kind.endswith("-pw") else ""
    if kind.startswith("recover"):
        names = recover_keys[kind]
        return load_graphs.recover(names[n % len(names)], prefix, passphrase)
    mode = kind.split("-")[0]
    return load_graphs.protect(images[n % len(images)], mode, seed=1000 + n, prefix=prefix, passphrase=passphrase,
                               guided=False)


def rss_mb(host) -> float:
    return psutil.Process(host.server.proc.pid).memory_info().rss / 2**20


def wait_all(client, prompt_ids: list[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = client.get("/history")
        if all(history.get(p, {}).get("status", {}).get("completed") is not None for p in prompt_ids):
            return history
        time.sleep(1.0)
    raise TimeoutError(f"{sum(p in history for p in prompt_ids)} of {len(prompt_ids)} prompts finished in time")


def run_seconds(entry: dict) -> float:
    """Execution time of a prompt, from the server's own status messages (ms timestamps)."""
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def test_fifty_mixed_prompts_queued_at_once(comfy_host, load_setup):
    images, recover_keys = load_setup
    client = comfy_host.client
    # Warm-up: every kind once, one at a time (models loaded, code paths and allocator pools used).
    for kind in KINDS:
        client.run(prompt(kind, 100, images, recover_keys, f"loadwarm/{kind}"), timeout=600)
    warm = rss_mb(comfy_host)

    start = time.monotonic()
    kinds = [KINDS[n % len(KINDS)] for n in range(PROMPTS)]
    queued = [client.queue(prompt(kind, n, images, recover_keys, f"load/p{n:02d}")) for n, kind in enumerate(kinds)]
    peak = warm
    deadline = time.monotonic() + 900
    while client.queue_remaining() and time.monotonic() < deadline:
        peak = max(peak, rss_mb(comfy_host))
        time.sleep(1.0)
    history = wait_all(client, queued, timeout=120)
    elapsed = time.monotonic() - start
    after = rss_mb(comfy_host)

    # None lost, none duplicated: 50 distinct prompts, each finished with exactly its own files.
    assert len(set(queued)) == PROMPTS
    claimed = []
    for n, (prompt_id, kind) in enumerate(zip(queued, kinds)):
        entry = history[prompt_id]
        assert entry["status"]["status_str"] == "success", (n, kind, entry["status"])
        outputs = entry["outputs"]
        (latent,) = outputs["save"]["latents"]
        assert latent["subfolder"] == f"load/p{n:02d}", (n, latent)
        saved = load_file(comfy_host.base / "output" / latent["subfolder"] / latent["filename"])
        assert saved["latent_tensor"].shape == (SAMPLES[kind], 4, 8, 8), (n, kind)
        claimed.append((latent["subfolder"], latent["filename"]))
        if not kind.startswith("recover"):
            (key,) = outputs["savekey"]["diffprivacy_keys"]
            claimed.append((key["subfolder"], key["filename"]))
            path = comfy_host.base / "output" / key["subfolder"] / key["filename"]
            load_key(path, load_graphs.PASSPHRASE if kind.endswith("-pw") else None)
    assert len(claimed) == len(set(claimed))
    on_disk = {(str(p.parent.relative_to(comfy_host.base / "output")), p.name)
               for p in (comfy_host.base / "output" / "load").rglob("*") if p.is_file()}
    assert on_disk == set(claimed)
    assert client.queue_remaining() == 0

    per_kind = Counter()
    for prompt_id, kind in zip(queued, kinds):
        per_kind[kind] += run_seconds(history[prompt_id])
    counts = Counter(kinds)
    print(f"\n{PROMPTS} prompts in {elapsed:.1f} s ({elapsed / PROMPTS:.2f} s per prompt); server RSS after warm-up "
          f"{warm:.0f} MiB, peak {peak:.0f} MiB, after the run {after:.0f} MiB ({after - warm:+.0f} MiB)")
    print("mean run time per kind: " + ", ".join(f"{k} {per_kind[k] / counts[k]:.2f} s" for k in KINDS))
    assert after - warm < RSS_MARGIN_MB, (warm, peak, after)
