"""The `diffpriv` command against a hostile server: a real ComfyUI (on localhost) whose
custom node rewrites the file records of every finished prompt, started without
--disable-metadata. The workflow loads no model, so each run takes a second."""
from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ROOT, keys_folder, start_host
from diffpriv_client import cli
from key_helpers import install_key_e

pytestmark = pytest.mark.host

KEY_E = "hostile-e.dpkey.safetensors"
# A custom node module that rewrites /history's file records as hostile.json (in the
# server's base directory) says: {"images": MODE} or {"diffprivacy_keys": MODE}.
HOSTILE_NODE = '''
import json, os, shutil
import execution, folder_paths

NODE_CLASS_MAPPINGS = {}
_task_done = execution.PromptQueue.task_done


def rewrite(records, mode):
    out = folder_paths.get_output_directory()
    first = dict(records[0])
    if mode == "traversal":
        return [dict(first, filename="../../escaped.png", subfolder="")]
    if mode == "absolute":
        return [dict(first, subfolder="/tmp")]
    if mode == "twins":  # the same file name in two folders, different bytes
        source = os.path.join(out, first["subfolder"], first["filename"])
        for sub, tail in (("a", b""), ("b", b"twin")):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
            with open(os.path.join(out, sub, "same.png"), "wb") as fh:
                fh.write(open(source, "rb").read() + tail)
        return [dict(first, subfolder=sub, filename="same.png") for sub in ("a", "b")]
    if mode == "not_a_key":
        with open(os.path.join(out, first["subfolder"], first["filename"]), "wb") as fh:
            fh.write(b"not a key")
    return records


def task_done(self, item_id, history_result, status, process_item=None):
    path = os.path.join(os.path.dirname(folder_paths.get_output_directory()), "hostile.json")
    modes = json.load(open(path)) if os.path.exists(path) else {}
    for output in history_result.get("outputs", {}).values():
        for kind, mode in modes.items():
            if output.get(kind):
                output[kind] = rewrite(output[kind], mode)
    return _task_done(self, item_id, history_result, status, process_item)


execution.PromptQueue.task_done = task_done
'''


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, test_models, face_models):
    base = tmp_path_factory.mktemp("hostile")
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "hostile_records.py").write_text(HOSTILE_NODE)
    server = start_host(base, test_models, face_models, extra_args=())
    install_key_e(keys_folder(base) / KEY_E, 5)
    workflow = base / "workflow.json"
    workflow.write_text(json.dumps({
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        # inverted: the command refuses a picture that comes back as it went in
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "picture"}},
        "3": {"class_type": "DiffPrivacyLoadKey", "inputs": {"key_name": KEY_E, "passphrase": ""}},
        "4": {"class_type": "DiffPrivacySaveKey", "inputs": {"key_e": ["3", 0], "filename_prefix": "key",
                                                             "folder": "output", "passphrase": ""}},
    }))
    photo = base / "photo.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(photo)
    try:
        yield server, workflow, photo
    finally:
        server.stop()


def run(hostile, tmp_path, modes: dict, *extra: str) -> tuple[int, dict | None, Path]:
    """Protect the photo under a name of the test's own (so the key's prefix differs from
    run to run and ComfyUI's cache never serves one run's removed key to another); returns
    the exit status, the photo's summary entry and the photo's output folder."""
    server, workflow, photo = hostile
    (server.base_dir / "hostile.json").write_text(json.dumps(modes))
    out, name = tmp_path / "out", tmp_path.name
    shutil.copy(photo, tmp_path / f"{name}.png")
    rc = cli.main(["protect", str(tmp_path / f"{name}.png"), "--task", "anonymize", "--out", str(out),
                   "--server", server.url, "--workflow", str(workflow), "--whole-image", *extra])
    summary = out / "summary.json"
    return rc, json.loads(summary.read_text())["results"][name] if summary.exists() else None, out / name


def server_files(server) -> set[Path]:
    base = server.base_dir
    return {p for root in (base / "input", base / "output", keys_folder(base)) for p in root.rglob("*") if p.is_file()}


def server_history(server) -> dict:
    return requests.get(f"{server.url}/history", timeout=10).json()


def test_an_honest_run_names_its_files_and_leaves_nothing_on_the_server(hostile, tmp_path):
    server, _, _ = hostile
    before = server_files(server)
    rc, got, folder = run(hostile, tmp_path, {})
    assert rc == 0 and got["status"] == "ok"
    name = tmp_path.name
    assert sorted(p.name for p in folder.iterdir()) == [f"{name}_00001.dpkey.safetensors", f"{name}_picture_00001_.png"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())
    assert server_files(server) == before and not server_history(server)


@pytest.mark.parametrize("modes", [{"images": "traversal"}, {"images": "absolute"},
                                   {"diffprivacy_keys": "not_a_key"}])
def test_a_hostile_record_fails_the_photo_and_writes_nothing(hostile, tmp_path, modes):
    server, _, _ = hostile
    before = server_files(server)
    rc, got, folder = run(hostile, tmp_path, modes)
    assert rc == 1 and got["status"] == "failed"
    assert ("unsafe file name" if "images" in modes else "not a valid key") in got["error"]
    assert not folder.exists() or not list(folder.iterdir()), "nothing of the photo written"
    assert not (tmp_path / "escaped.png").exists() and not (ROOT / "escaped.png").exists()
    assert not server_history(server), "the failed prompt's history was deleted too"
    assert server_files(server) == before, "the job's cleanup removes its folder, whatever the records say"


def test_the_same_file_name_in_two_folders_gives_two_files(hostile, tmp_path):
    rc, got, folder = run(hostile, tmp_path, {"images": "twins"})
    assert rc == 0
    pictures = sorted(folder.parent / p for p in got["outputs"])
    name = tmp_path.name
    assert [p.name for p in pictures] == [f"{name}_picture_00001_.png", f"{name}_picture_00002_.png"]
    assert pictures[0].read_bytes() + b"twin" == pictures[1].read_bytes()


def test_a_passphrase_never_reaches_the_server_even_one_that_writes_png_metadata(hostile, tmp_path, monkeypatch):
    """The server seals the key to a recipient of this run; the command seals it anew
    under the passphrase on its own machine: the passphrase is in no prompt, no history,
    no PNG, and the key it writes opens with it."""
    from diffpriv_core.keys import load_key

    server, _, _ = hostile
    monkeypatch.setenv("DP_HOSTILE_PASSPHRASE", "secret words")
    seen = []
    real_post = requests.Session.post

    def post(self, url, *args, **kwargs):
        seen.append(json.dumps(kwargs.get("json"), default=str) + repr(kwargs.get("files")) + repr(kwargs.get("data")))
        return real_post(self, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "post", post)
    rc, got, folder = run(hostile, tmp_path, {}, "--passphrase-env", "DP_HOSTILE_PASSPHRASE")
    assert rc == 0 and got["status"] == "ok"
    assert seen and not any("secret words" in request for request in seen), "never sent"
    (key,) = [p for p in folder.iterdir() if p.name.endswith(".dpkey.safetensors")]
    assert load_key(key, "secret words")[2]["kdf"] == "scrypt"
    (picture,) = [p for p in folder.iterdir() if p.suffix == ".png"]
    assert b"secret words" not in picture.read_bytes()
