"""The paper's experiments that need the host: the wrong-key experiment (Fig. 7) through
`diffpriv eval --wrong-keys`, and the ablations of `diffpriv protect` (Tables 5 and 6),
recorded and labelled by `diffpriv eval`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffpriv_client import cli
from diffpriv_core.keys import save_key
from diffpriv_eval.sample_photos import SamplePhotoMissingError, sample_photos

from conftest import ROOT
from key_helpers import key_i_for, random_key_e

pytestmark = pytest.mark.host
WORKFLOWS = ROOT / "tests" / "workflows"
PEOPLE = ("astronaut", "hanks", "t1_0")
KEY_I_STEPS = 3  # recovery's steps: each variant costs as many UNet calls


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """The measurement's MTCNN and recognisers run many small convolutions: on a busy 2-core
    machine one thread is several times faster than two (as in test_eval.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    try:
        pixels = sample_photos()
    except SamplePhotoMissingError:
        pytest.skip("insightface's sample photos are not installed")
    folder = tmp_path_factory.mktemp("originals")
    for name in PEOPLE:
        Image.fromarray(pixels[name]).save(folder / f"{name}.png")
    return folder


def picture(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_the_wrong_key_experiment_recovers_with_each_pair_and_writes_no_key(comfy_host, photos, installed_models,
                                                                             tmp_path):
    """Three photos' key files (random keys of the test checkpoint, short key-Is): every
    variant comes back and is measured, each with the keys it names. Both wrong for one
    photo is the next photo's key-I with the third's key-E, which is the next photo's
    "wrong key-E": the two pictures are the same, bit for bit; the right pair is what
    `diffpriv recover` gives; every other variant differs from it (a random-weight UNet
    barely heeds its conditioning, so a wrong key-E changes the picture far less than a
    wrong key-I does)."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for seed, name in enumerate(PEOPLE, start=1):
        key_e = random_key_e(seed)
        latent = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed))
        (keys / name).mkdir()
        save_key(keys / name / f"{name}_00001.dpkey.safetensors", key_e, key_i_for(key_e, KEY_I_STEPS, latent))
    out, url = tmp_path / "report", comfy_host.server.url
    assert cli.main(["eval", "--originals", str(photos), "--wrong-keys", str(keys), "--out", str(out),
                     "--trust-server", url, "--workflow", str(WORKFLOWS / "recover.json"),
                     "--models", str(installed_models)]) == 0
    results = json.loads((out / "results.json").read_text())
    stems = [f"{name}_00001" for name in PEOPLE]
    assert results["cases"] == stems
    variants = results["variants"]
    assert list(variants) == ["right_pair", "wrong_key_i", "wrong_key_e", "uc_as_key_e", "both_wrong"]
    for v in variants.values():
        assert v["images"] == 3 and set(v["identity"]) == {"dlib", "SFace", "FaceNet-CASIA"}
        assert set(v["mean"]) >= {"mse", "psnr", "ssim"} and all(-1 <= r["cos_ie"] <= 1 for r in v["identity"].values())

    def variant(stem, name):
        (path,) = (out / "wrong_keys" / stem).glob(f"{name}_00001_.png")
        return picture(path)

    for k, stem in enumerate(stems):
        following = stems[(k + 1) % 3]
        assert np.array_equal(variant(stem, "both_wrong"), variant(following, "wrong_key_e"))
        right = variant(stem, "right_pair").astype(int)
        change = {other: np.abs(variant(stem, other) - right).mean()
                  for other in ("wrong_key_i", "wrong_key_e", "uc_as_key_e", "both_wrong")}
        assert min(change.values()) > 0 and min(change["wrong_key_i"], change["both_wrong"]) > 5, (stem, change)
    recovered = tmp_path / "recovered"
    assert cli.main(["recover", str(keys / "hanks" / "hanks_00001.dpkey.safetensors"), "--out", str(recovered),
                     "--workflow", str(WORKFLOWS / "recover.json"), "--trust-server", url]) == 0
    (made,) = json.loads((recovered / "summary.json").read_text())["results"]["hanks_00001"]["outputs"]
    assert np.array_equal(picture(recovered / made), variant("hanks_00001", "right_pair"))
    assert not list(out.rglob("*.dpkey.safetensors"))  # no key file anywhere in the report
    report = (out / "report.md").read_text()
    assert "| wrong key-E | the photo's key-I, another photo's key-E | 3 |" in report
    assert "grids/hanks_00001.png" in report and picture(out / "grids" / "hanks_00001.png").shape[1] > 5 * 100


def test_protect_runs_the_papers_ablations_and_records_them(comfy_host, photos, tmp_path):
    """--no-guidance and --one-embedding reach the real nodes: the key-E holds one
    conditioning repeated for every stage, the sampler reports no guided similarity, and
    summary.json records both ablations."""
    from diffpriv_core.keys import load_key

    out = tmp_path / "out"
    assert cli.main(["protect", str(photos / "hanks.png"), "--task", "anonymize", "--out", str(out),
                     "--workflow", str(WORKFLOWS / "anonymize_small.json"), "--whole-image", "--seed", "3",
                     "--no-guidance", "--one-embedding", "--server", comfy_host.server.url]) == 0
    entry = json.loads((out / "summary.json").read_text())["results"]["hanks"]
    assert entry["status"] == "ok" and entry["ablations"] == ["no-guidance", "one-embedding"]
    assert entry["identity"] == [] and len(entry["outputs"]) == 2  # nothing guided; the workflow's 2 samples
    (key,) = entry["keys"]
    key_e, _, _ = load_key(out / key)
    assert key_e.meta["msi_variant"] == "one_embedding"
    assert torch.equal(key_e.stages, key_e.stages[:1].expand_as(key_e.stages))
