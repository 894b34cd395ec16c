"""`diffpriv protect --photos-per-prompt` against the real server: the faces of several photos
in one prompt give each photo what a prompt of its own gives, and a photo that fails the
shared prompt fails alone."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffpriv_client import cli
from diffpriv_core.key_format import CROP_META
from diffpriv_core.keys import load_key
from test_cli_host import server_state
from test_host_faces import every_face_graph, install_key_e, pair_photo

pytestmark = pytest.mark.host
# What a photo's summary entry says that must not depend on the photos sharing its prompt
# (its calls and seconds are the prompt's; float rounding aside, its cosines too).
OWN_FIELDS = ("status", "outputs", "keys", "faces", "detection", "photo", "passes")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, comfy_host, astronaut) -> dict:
    """Two faces (200 x 220), one face (160 x 160), and a grey photo without any."""
    folder = tmp_path_factory.mktemp("photos")
    pictures = {"pair": pair_photo(), "astronaut": np.asarray(Image.fromarray(astronaut).resize((160, 160))),
                "grey": np.full((96, 96, 3), 128, np.uint8)}
    for name, picture in pictures.items():
        Image.fromarray(picture).save(folder / f"{name}.png")
    workflow = folder / "protect_faces.json"
    workflow.write_text(json.dumps(every_face_graph("placeholder.png")))
    install_key_e(comfy_host)
    return {"folder": folder, "workflow": workflow}


def protect(comfy_host, photos, names: list[str], out, per_prompt: int) -> int:
    return cli.main(["protect", *[str(photos["folder"] / f"{n}.png") for n in names], "--task", "anonymize",
                     "--out", str(out), "--server", comfy_host.server.url, "--workflow", str(photos["workflow"]),
                     "--photos-per-prompt", str(per_prompt)])


@pytest.fixture(scope="module")
def alone(comfy_host, photos, tmp_path_factory):
    """The pair and the astronaut, each in a prompt of its own."""
    out = tmp_path_factory.mktemp("alone")
    assert protect(comfy_host, photos, ["pair", "astronaut"], out, 1) == 0
    return out


def results(out) -> dict:
    return json.loads((out / "summary.json").read_text())["results"]


def assert_same_photo(out, entry: dict, alone_out, alone_entry: dict) -> None:
    """The photo's pictures, keys and summary equal those of its prompt alone, to float rounding."""
    assert {k: entry[k] for k in OWN_FIELDS} == {k: alone_entry[k] for k in OWN_FIELDS}
    for got, want in zip(entry["identity"], alone_entry["identity"]):
        assert got["image"] == want["image"] and np.allclose(got["cosines"], want["cosines"], atol=1e-3)
    for picture in entry["outputs"]:
        got, want = (np.asarray(Image.open(folder / picture).convert("RGB"), np.int16) for folder in (out, alone_out))
        assert np.abs(got - want).max() <= 2, picture
    for key in entry["keys"]:
        (e, i, meta), (e0, i0, meta0) = load_key(out / key), load_key(alone_out / key)
        assert torch.allclose(e.stages, e0.stages) and torch.allclose(i.latent, i0.latent, atol=1e-3), key
        crop, crop0 = json.loads(meta[CROP_META]), json.loads(meta0[CROP_META])
        crop.pop("region_digests"), crop0.pop("region_digests")
        assert crop == crop0, key


def test_photos_in_one_prompt_get_what_each_gets_in_its_own(comfy_host, photos, alone, tmp_path):
    shared = tmp_path / "shared"
    assert protect(comfy_host, photos, ["pair", "astronaut"], shared, 2) == 0
    got, want = results(shared), results(alone)
    assert [f["face"] for f in got["pair"]["faces"]] == [0, 1] and len(got["astronaut"]["faces"]) == 1
    for name in ("pair", "astronaut"):
        assert_same_photo(shared, got[name], alone, want[name])
        assert got[name]["shared_prompt"] == ["pair", "astronaut"]
        assert "shared_prompt" not in want[name]
    # The sampler and key-I ran all three faces together: both photos list those calls of
    # the prompt (made once for both: not to be added up), as many as either photo's own
    # prompt made and fewer than the two made; the guidance embeds each face's reference on
    # its own, so each photo lists its own faces' calls there.
    for stage in ("Guided DDIM Sampler", "DDIM Inversion Key"):
        shared_calls = {got[name]["calls"]["stages"][stage]["unet_forward"] for name in got}
        own_calls = [want[name]["calls"]["stages"][stage]["unet_forward"] for name in want]
        assert shared_calls == {max(own_calls)} and max(own_calls) < sum(own_calls)
    for name, faces in (("pair", 2), ("astronaut", 1)):
        assert got[name]["calls"]["stages"]["Identity Energy Guidance"] == {"recogniser_forward": faces}

def test_a_photo_without_a_face_fails_alone_and_the_others_come_out(comfy_host, photos, alone, tmp_path, capsys):
    out = tmp_path / "out"
    before = server_state(comfy_host)
    assert protect(comfy_host, photos, ["pair", "grey", "astronaut"], out, 3) == 1
    assert server_state(comfy_host) == before, "the shared prompt's uploads, outputs and history were removed too"
    got, want = results(out), results(alone)
    assert got["grey"]["status"] == "failed" and "no face found in image 0" in got["grey"]["error"]
    assert not (out / "grey").exists() or not any((out / "grey").iterdir())
    for name in ("pair", "astronaut"):
        assert_same_photo(out, got[name], alone, want[name])
        assert "shared_prompt" not in got[name], "done again alone"
    assert "each photo is done again alone" in capsys.readouterr().out
