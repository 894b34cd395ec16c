"""The `diffpriv` command end to end against real ComfyUI servers (test-size models).

The test workflow (tests/workflows/protect.json) detects faces (on_no_face=error), makes
key-I from a fixed key-E with 5 BDIA steps on a 64 px copy, and saves the key (folder
output), the 64 px copy and the face mask. Recovery is checked against the original with
protect_recoverable.json (a key-I on the task's 50-step grid, and the VAE reconstruction it
should give back), and `diffpriv eval` with anonymize_small.json (the real anonymize graph,
tiny).
"""
from __future__ import annotations

import glob
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import skimage.data
from PIL import Image

from diffpriv_client import cli, graphs
from diffpriv_client.embedded import EmbeddedComfy
from diffpriv_client.servers import Progress, Server
from diffpriv_client.summary import RECORD_NAME, THUMB_PX, latest_run
from diffpriv_core.key_types import key_e_id
from diffpriv_core.keys import load_key, save_key
from diffpriv_eval.sample_photos import SamplePhotoMissingError, sample_photos
from diffpriv_testmodels.face_models import ARCFACE_ONNX

from conftest import ROOT, keys_folder, start_host
from key_helpers import install_key_e as install_random_key_e
from key_helpers import random_key_e

pytestmark = pytest.mark.host
WORKFLOWS = ROOT / "tests" / "workflows"
KEY_E_NAME = "cli-test-e.dpkey.safetensors"  # the key-E the test workflow loads
PASSPHRASE = "correct horse"
# More steps than the workflow's 5 (about 0.1-0.4 s each on CPU), so a batch is still
# running when its first image is done and the test kills a server.
SLOW_STEPS = 10
# A bdia key-I on the anonymize task's 50-step grid (50 UNet calls; recovery 49), whose
# recovery retraces the inversion exactly.
RECOVERABLE = "protect_recoverable.json"
# Mean absolute error, in 0-255 grey levels, allowed between the recovered picture and the
# VAE reconstruction of the original. Measured (deterministic on CPU) with that key: 0.16;
# with another key-E (an unrelated picture) 37. (A fixed-point key-I, 50 steps x 10
# refinements, 550 UNet calls, gave 3.5.) Six times the measured error, a thirtieth of the
# wrong key's.
RECOVERY_TOLERANCE = 1.0


def install_key_e(base: Path) -> None:
    install_random_key_e(keys_folder(base) / KEY_E_NAME, 7)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photos shipped in packages: two faces and a cat (no face)."""
    folder = tmp_path_factory.mktemp("photos")
    hanks = glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "insightface", "data", "images",
                                   "Tom_Hanks_54745.png"))
    if not hanks:
        pytest.skip("insightface's sample photos are not installed")
    astronaut = skimage.data.astronaut()
    pictures = {"astronaut": astronaut, "chelsea": skimage.data.chelsea(),
                "hanks": np.asarray(Image.open(hanks[0]).convert("RGB")),
                # Mirrored copies: more work for the batch tests, faces still found.
                "astronaut_mirrored": astronaut[:, ::-1].copy(),
                "hanks_mirrored": np.asarray(Image.open(hanks[0]).convert("RGB"))[:, ::-1].copy()}
    paths = {}
    for name, pixels in pictures.items():
        paths[name] = folder / f"{name}.png"
        Image.fromarray(pixels).save(paths[name])
    return paths


def server_args(servers) -> list[str]:
    return [a for url in servers for a in ("--server", url)]


def protect_args(images, out: Path, *servers: str, steps: int | None = None,
                 workflow: str = "protect.json") -> list[str]:
    args = ["protect", *map(str, images), "--task", "anonymize", "--out", str(out),
            "--workflow", str(WORKFLOWS / workflow), "--seed", "3"]
    return args + server_args(servers) + (["--steps", str(steps)] if steps else [])


def recover_args(keys, out: Path, *servers: str, passphrase_env: str | None = None) -> list[str]:
    """Recovery sends the opened key to the server: only to one named with --trust-server."""
    args = ["recover", *map(str, keys), "--out", str(out), "--workflow", str(WORKFLOWS / "recover.json")]
    args += [a for url in servers for a in ("--trust-server", url)]
    return args + (["--passphrase-env", passphrase_env] if passphrase_env else [])


def results(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["results"]


def run_in_thread(argv: list[str]) -> tuple[threading.Thread, dict]:
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(rc=cli.main(argv)), daemon=True)
    thread.start()
    return thread, outcome


def wait_for(condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def ok_entries(out: Path, server: str | None = None) -> list[str]:
    """The photos the latest run into ``out`` has done so far, read from the run record as
    it is written (summary.json is written at the end)."""
    if not (out / RECORD_NAME).exists():
        return []
    run = latest_run(out)
    try:
        entries = run.results
    finally:
        run.close()
    return [name for name, e in entries.items() if e["status"] == "ok" and server in (None, e["server"])]


@pytest.fixture
def passphrase_env(monkeypatch):
    monkeypatch.setenv("DP_TEST_PASSPHRASE", PASSPHRASE)
    return "DP_TEST_PASSPHRASE"


def server_state(host) -> tuple[set[Path], set[str]]:
    """The files in the server's input, output and key folders, and its prompt history."""
    files = {p for root in (host.base / "input", host.base / "output", host.keys) for p in root.rglob("*")
             if p.is_file()}
    return files, set(host.client.get("/history"))


def test_protect_a_batch_then_recover(comfy_host, photos, tmp_path, passphrase_env, capsys):
    install_key_e(comfy_host.base)
    url = comfy_host.server.url
    out = tmp_path / "out"
    images = [photos["astronaut"], photos["chelsea"], photos["hanks"]]
    before = server_state(comfy_host)
    rc = cli.main(protect_args(images, out, url) + ["--passphrase-env", passphrase_env])

    assert rc == 1, "one image failed"
    got = results(out)
    assert got["chelsea"]["status"] == "failed" and "no face found in image 0" in got["chelsea"]["error"]
    for name in ("astronaut", "hanks"):
        entry = got[name]
        assert entry["status"] == "ok" and entry["server"] == url and entry["seconds"] > 0, entry
        assert sorted(Path(p).name.split("_0")[0] for p in entry["outputs"]) == [f"{name}_face_mask",
                                                                                 f"{name}_small"]
        small = Image.open(out / next(p for p in entry["outputs"] if "_small_" in p))
        assert small.size == (64, 64)
        (key,) = entry["keys"]
        key_bytes = (out / key).read_bytes()
        assert key.startswith(f"{name}/{name}_") and key.endswith(".dpkey.safetensors")
        assert PASSPHRASE.encode() not in key_bytes and b'"dtype":"F32"' not in key_bytes, "encrypted"
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    assert PASSPHRASE not in requests.get(f"{url}/history", timeout=10).text, "prompts with it were deleted"
    assert server_state(comfy_host) == before, "uploads, outputs and history of every prompt removed, failed too"
    sheet = Image.open(out / "contact_sheet_0001.png")
    assert sheet.height == 2 * THUMB_PX and sheet.width > 3 * 64
    shown = capsys.readouterr()
    assert "1 failed, 2 ok" in shown.out
    # The progress line names each stage with its step and clocks, and is cleared at the end.
    lines = shown.err.replace("\r", "\n").splitlines()
    assert any(re.search(r"astronaut: DDIM Inversion Key \d+/\d+, \d\d:\d\d elapsed", line) for line in lines), lines
    assert "elapsed" not in [line for line in lines if line.strip()][-1]

    # Recovery on a server we did not start: the command uploads the key, then removes it.
    key = out / got["astronaut"]["keys"][0]
    recovered = tmp_path / "recovered"
    assert cli.main(recover_args([key], recovered, url, passphrase_env=passphrase_env)) == 0
    (entry,) = results(recovered).values()
    (picture,) = entry["outputs"]
    assert entry["status"] == "ok" and Image.open(recovered / picture).size == (64, 64)
    assert stat.S_IMODE((recovered / picture).stat().st_mode) == 0o600
    assert server_state(comfy_host) == before

    # --keep-on-server keeps the job's uploads, outputs and history; no passphrase is in them.
    kept = tmp_path / "kept"
    assert cli.main(recover_args([key], kept, url, passphrase_env=passphrase_env) + ["--keep-on-server"]) == 0
    files, history = server_state(comfy_host)
    assert len(history - before[1]) == 1 and {p.parent.parent.name for p in files - before[0]} == {"diffpriv-jobs"}
    assert PASSPHRASE not in requests.get(f"{url}/history", timeout=10).text


def picture(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def only_output(out: Path, name: str, label: str = "") -> Path:
    (rel,) = [p for p in results(out)[name]["outputs"] if label in Path(p).name]
    return out / rel


def with_another_key_e(key: Path, into: Path) -> Path:
    """The same key-I under another key-E: what recovery gives without the right key-E."""
    _key_e, key_i, _meta = load_key(key, PASSPHRASE)
    other = random_key_e(8)
    key_i.meta["pair"] = key_e_id(other)  # a forged binding: the pair check is a check, the key-E decides
    return save_key(into, other, key_i, PASSPHRASE)


def test_recover_gives_back_the_original_and_a_wrong_passphrase_fails_clearly(comfy_host, photos, tmp_path,
                                                                              passphrase_env, monkeypatch, capsys):
    install_key_e(comfy_host.base)
    url = comfy_host.server.url
    out = tmp_path / "out"
    assert cli.main(protect_args([photos["astronaut"]], out, url, workflow=RECOVERABLE)
                    + ["--whole-image", "--passphrase-env", passphrase_env]) == 0
    reconstruction = picture(only_output(out, "astronaut", "_reconstruction_"))
    key = out / results(out)["astronaut"]["keys"][0]
    wrong = with_another_key_e(key, tmp_path / "wrong-e.dpkey.safetensors")

    recovered = tmp_path / "recovered"
    assert cli.main(recover_args([key, wrong], recovered, url, passphrase_env=passphrase_env)) == 0
    errors = {k: np.abs(picture(only_output(recovered, cli.key_stem(k))) - reconstruction).mean() for k in (key, wrong)}
    # The reconstruction, to the PNG's rounding: see RECOVERY_TOLERANCE.
    assert errors[key] < RECOVERY_TOLERANCE < errors[wrong], errors

    # A wrong passphrase is found here, from the key file, before any server is asked.
    monkeypatch.setenv(passphrase_env, "not the passphrase")
    capsys.readouterr()
    rejected = tmp_path / "rejected"
    assert cli.main(recover_args([key], rejected, "http://127.0.0.1:9", passphrase_env=passphrase_env)) == 2
    err = capsys.readouterr().err
    assert "wrong passphrase, or the key file was modified (checked here, before starting any server)" in err
    assert not rejected.exists(), "nothing written"
    # A key that needs a passphrase, without one, is refused alone before queueing.
    monkeypatch.delenv(passphrase_env)
    assert cli.main(recover_args([key], rejected, "http://127.0.0.1:9")) == 1
    (entry,) = results(rejected).values()
    assert entry["status"] == "failed" and "encrypted: give its passphrase" in entry["error"]


@pytest.fixture
def face_photos(tmp_path) -> Path:
    """A folder of two real face photos (their faces are still found at 64 px)."""
    try:
        pixels_of = sample_photos()
    except SamplePhotoMissingError:
        pytest.skip("insightface's sample photos are not installed")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "hanks"):
        Image.fromarray(pixels_of[name]).save(folder / f"{name}.png")
    return folder


def test_eval_reports_on_what_protect_and_recover_wrote(comfy_host, face_photos, face_models, tmp_path):
    """The user's round: protect photos, recover their keys, evaluate both output folders
    as they are (ComfyUI's file names, one folder per photo) against the photo folder.
    Only one of the two photos is protected (about a minute each on a CPU): the other
    shows that nothing is paired with a photo that has no outputs, and it is not counted."""
    url = comfy_host.server.url
    protected, recovered, report = tmp_path / "protected", tmp_path / "recovered", tmp_path / "report"
    assert cli.main(protect_args([face_photos / "hanks.png"], protected, url, workflow="anonymize_small.json")
                    + ["--whole-image"]) == 0
    (key,) = results(protected)["hanks"]["keys"]
    assert cli.main(recover_args([protected / key], recovered, url)) == 0

    arcface = face_models / ARCFACE_ONNX
    assert cli.main(["eval", "--originals", str(face_photos), "--protected", str(protected), "--recovered",
                     str(recovered), "--out", str(report), "--arcface", str(arcface)]) == 0
    got = json.loads((report / "results.json").read_text())
    assert got["cases"] == ["hanks"] and list(got["skipped"]) == ["astronaut"]
    assert [(n, r["role"]) for n, r in got["protection"].items()] == [
        ("dlib", "transfer"), ("SFace", "white-box"), ("FaceNet-CASIA", "transfer"), ("ArcFace", "transfer")]
    for recognizer in ("dlib", "ArcFace"):
        protection = got["protection"][recognizer]
        assert protection["candidates"] == 2, "the workflow's 2 samples, and nothing else of the folder"
        assert list(protection["distances_to_original"]) == ["hanks"]
        assert len(protection["distances_to_original"]["hanks"]) == 2 and protection["diversity"]["pairs"] == 1
    assert list(got["recovery"]["per_image"]) == ["hanks"]
    assert len(got["resized"]["hanks"]) == 3, "the 64 px outputs were compared at the photo's size"
    assert got["utility"]["MTCNN"]["protected"] is not None
    markdown = (report / "report.md").read_text()
    for png in ("grids/hanks.png", "diversity_dlib.png", "diversity_SFace.png", "diversity_ArcFace.png"):
        assert Image.open(report / png).width > 64 and png in markdown
    assert "Protection success" in markdown and "Recovery quality" in markdown


def test_missing_models_are_named_with_their_folders_and_sources(comfy_host, photos, tmp_path, capsys):
    workflow = json.loads((WORKFLOWS / "protect.json").read_text())
    workflow["ckpt"]["inputs"]["ckpt_name"] = "v1-5-pruned-emaonly.safetensors"
    path = tmp_path / "real.json"
    path.write_text(json.dumps(workflow))
    argv = protect_args([photos["astronaut"]], tmp_path / "out", comfy_host.server.url)
    argv[argv.index("--workflow") + 1] = str(path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "checkpoints/v1-5-pruned-emaonly.safetensors" in err and "SD 1.5 model card" in err
    assert "--demo-weights" in err
    assert results(tmp_path / "out") == {}, "nothing was queued"


def start_server(base: Path, test_models: Path, face_models: Path) -> EmbeddedComfy:
    server = start_host(base, test_models, face_models)
    install_key_e(base)
    return server


def kill_mid_batch(server: EmbeddedComfy, argv: list[str], when, join_s: float) -> dict:
    """Run the command in a thread, kill ``server`` once ``when()`` holds, and return the
    command's outcome ({"rc": exit status}) after it has finished or ``join_s`` passed."""
    try:
        thread, outcome = run_in_thread(argv)
        wait_for(when)
        server.kill()
        thread.join(join_s)
    finally:
        server.stop()
    return outcome


def test_a_killed_server_loses_nothing_and_a_rerun_finishes(tmp_path, test_models, face_models, photos, comfy_host):
    out = tmp_path / "out"
    images = [photos[n] for n in ("astronaut", "hanks", "astronaut_mirrored")]
    server = start_server(tmp_path / "comfy", test_models, face_models)
    outcome = kill_mid_batch(server, protect_args(images, out, server.url, steps=SLOW_STEPS),
                             lambda: ok_entries(out), join_s=120)
    assert outcome["rc"] == 1
    done = ok_entries(out)
    unfinished = [n for n, e in results(out).items() if e["status"] == "failed"]
    assert done and unfinished and len(done) + len(unfinished) == len(images)
    assert all("stopped answering" in results(out)[n]["error"] for n in unfinished)
    kept = {n: [(out / p).stat().st_mtime_ns for p in results(out)[n]["outputs"]] for n in done}

    # The rerun (on the shared server: any server with the models will do) skips what is done.
    install_key_e(comfy_host.base)
    assert cli.main(protect_args(images, out, comfy_host.server.url, steps=SLOW_STEPS)) == 0
    final = results(out)
    assert {n for n, e in final.items() if e["status"] == "skipped"} == set(done)
    assert {n for n, e in final.items() if e["status"] == "ok"} == set(unfinished)
    assert kept == {n: [(out / p).stat().st_mtime_ns for p in final[n]["outputs"]] for n in done}


def test_two_servers_share_a_batch_and_one_dying_leaves_it_to_the_other(tmp_path, test_models, face_models, photos,
                                                                        comfy_host, capsys):
    names = ["astronaut", "hanks", "astronaut_mirrored", "hanks_mirrored"]
    install_key_e(comfy_host.base)
    first = comfy_host.server
    second = start_server(tmp_path / "b", test_models, face_models)
    out = tmp_path / "out"

    def second_finished_and_cleaned_one() -> bool:
        # Killed between a photo's download and its cleanup, the server would keep that
        # photo's files on its disk, and the command rightly reports them: not this test.
        return bool(ok_entries(out, second.url)) and not requests.get(f"{second.url}/history", timeout=10).json()

    outcome = kill_mid_batch(second, protect_args([photos[n] for n in names], out, first.url, second.url,
                                                  steps=SLOW_STEPS), second_finished_and_cleaned_one, join_s=300)
    assert outcome["rc"] == 0
    final = results(out)
    assert all(final[n]["status"] == "ok" for n in names), final
    servers = [final[n]["server"] for n in names]
    assert second.url in servers and first.url in servers, "both took part"
    assert re.search(rf"{second.url} stopped answering; [1-9] unfinished job", capsys.readouterr().out), \
        "the first finished what the second left"


@pytest.fixture
def models_for_embedded(tmp_path, test_models) -> Path:
    """A models folder of the user's for --models: the test checkpoint and key-E."""
    models = tmp_path / "models"
    rel = "checkpoints/dp-test-sd15.safetensors"
    (models / rel).parent.mkdir(parents=True)
    (models / rel).symlink_to(test_models / rel)
    install_key_e(tmp_path)  # writes tmp_path/models/diffprivacy_keys
    return models


def test_without_server_the_embedded_comfyui_runs_the_batch_and_recovery(tmp_path, models_for_embedded, photos,
                                                                         passphrase_env):
    models = models_for_embedded
    out = tmp_path / "out"
    common = ["--base", str(tmp_path / "base"), "--models", str(models), "--passphrase-env", passphrase_env]
    assert cli.main(protect_args([photos["hanks"]], out) + common) == 0
    entry = results(out)["hanks"]
    for picture in entry["outputs"]:
        assert not Image.open(out / picture).info, "--disable-metadata: no workflow (or passphrase) in the PNG"

    # The embedded server gets the key uploaded into its keys folder, and removed after.
    key = out / entry["keys"][0]
    assert cli.main(recover_args([key], tmp_path / "recovered") + common) == 0
    assert results(tmp_path / "recovered")[key.name.split(".")[0]]["status"] == "ok"
    assert not list((models / "diffprivacy_keys" / "diffpriv-jobs").iterdir()), "the job's key folder was removed"


def test_cancel_withdraws_our_queued_and_running_prompts(comfy_host, photos):
    install_key_e(comfy_host.base)
    server = Server(comfy_host.server.url)
    template = graphs.load_workflow(WORKFLOWS / "protect.json")
    for name in ("astronaut", "hanks"):
        uploaded = server.client.upload_image(photos[name])
        server.submit(name, graphs.protect_graph(template, uploaded, name, steps=200))
    prompt_ids = list(server.in_flight)
    wait_for(lambda: any(e.value > 0 for e in server.poll(0.1) if isinstance(e, Progress)), timeout=120)
    server.cancel_all()
    wait_for(lambda: not any(server.client.get("/queue").values()), timeout=30)
    first = server.client.history(prompt_ids[0])
    assert first["status"]["status_str"] == "error", "interrupted mid-run"
    assert server.client.history(prompt_ids[1]) is None, "never ran"


def test_a_stopped_command_leaves_no_prompt_upload_or_history_on_the_server(comfy_host, photos, tmp_path,
                                                                             passphrase_env):
    """SIGTERM (as Ctrl-C) mid-batch: the running prompt is interrupted, the queued one
    withdrawn, and both prompts' uploads, outputs and history removed."""
    install_key_e(comfy_host.base)
    before = server_state(comfy_host)
    argv = [sys.executable, "-m", "diffpriv_client.cli",
            *protect_args([photos["hanks"], photos["astronaut"]], tmp_path / "out", comfy_host.server.url, steps=200),
            "--passphrase-env", passphrase_env]
    command = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: comfy_host.client.get("/queue")["queue_running"], timeout=180)
    command.terminate()
    assert command.wait(120) == 130, command.stdout.read()
    assert not any(comfy_host.client.get("/queue").values())
    assert server_state(comfy_host) == before


def embedded_servers(base: Path) -> list[str]:
    """Command lines of the ComfyUI processes running on this base directory."""
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in ps.stdout.splitlines() if "main.py" in line and f"--base-directory {base}" in line]


def test_a_terminated_command_stops_its_embedded_comfyui(tmp_path, models_for_embedded, photos):
    base = tmp_path / "base"
    argv = [sys.executable, "-m", "diffpriv_client.cli",
            *protect_args([photos["hanks"]], tmp_path / "out", steps=SLOW_STEPS),
            "--base", str(base), "--models", str(models_for_embedded)]
    command = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: embedded_servers(base), timeout=180)
    command.terminate()  # SIGTERM while the server is still starting up
    assert command.wait(60) == 130, command.stdout.read()
    assert not embedded_servers(base)

    command = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = base / "comfyui.log"
    wait_for(lambda: "got prompt" in log.read_text(), timeout=180)  # the batch is running
    command.terminate()
    assert command.wait(60) == 130, command.stdout.read()
    assert not embedded_servers(base)


def test_a_rerun_skips_only_what_was_made_from_the_same_bytes_and_settings(comfy_host, photos, tmp_path, capsys):
    """Another photo of the same name, another seed or another task is done again under a
    new name, replacing nothing; the exit status speaks of the run's own photos."""
    install_key_e(comfy_host.base)
    url, out = comfy_host.server.url, tmp_path / "out"
    assert cli.main(protect_args([photos["astronaut"], photos["chelsea"]], out, url)) == 1, "chelsea has no face"
    first = results(out)["astronaut"]
    kept = {rel: (out / rel).stat().st_mtime_ns for rel in first["outputs"] + first["keys"]}

    capsys.readouterr()
    assert cli.main(protect_args([photos["astronaut"]], out, "http://127.0.0.1:9")) == 0, "nothing to do: no server"
    printed = capsys.readouterr().out
    assert "astronaut: done in an earlier run from the same bytes and settings, skipped" in printed
    assert "summary.json: 1 skipped" in printed and "not among this run's inputs: 1 failed" in printed
    saved = json.loads((out / "summary.json").read_text())
    assert saved["results"]["astronaut"]["status"] == "skipped" and saved["earlier"]["chelsea"]["status"] == "failed"

    elsewhere = tmp_path / "elsewhere" / "astronaut.png"  # another photo of the same name
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(photos["hanks"].read_bytes())
    hide = protect_args([photos["astronaut"]], out, url)
    hide[hide.index("anonymize")] = "hide"
    runs = {"astronaut-2": protect_args([photos["astronaut"]], out, url)[:-2] + ["--seed", "7", "--server", url],
            "astronaut-3": protect_args([elsewhere], out, url), "astronaut-4": hide}
    made = {}
    for name, argv in runs.items():
        assert cli.main(argv) == 0, name
        made[name] = results(out)[name]
        assert made[name]["status"] == "ok" and made[name]["keys"][0].startswith(f"{name}/{name}_"), made[name]
        assert f"holds results of other bytes or settings: done as {name}/" in capsys.readouterr().out
    assert made["astronaut-3"]["sha256"] != first["sha256"] == made["astronaut-2"]["sha256"]
    assert kept == {rel: (out / rel).stat().st_mtime_ns for rel in kept}, "nothing of the first run replaced"
    assert cli.main(runs["astronaut-2"]) == 0 and list(results(out)) == ["astronaut-2"], "seed 7 is done too"
    assert results(out)["astronaut-2"]["status"] == "skipped"


def test_a_traceback_mid_batch_still_cleans_the_server(comfy_host, photos, tmp_path, passphrase_env, monkeypatch):
    """A bug (here: recording a result fails) stops the command with its traceback, and
    nothing of the run stays on the server: not the upload, the outputs, the key or the
    history that holds the passphrase."""
    install_key_e(comfy_host.base)
    before = server_state(comfy_host)
    real_record = cli.Summary.record

    def failing_record(self, name, source, status, *args, **kwargs):
        if status == "ok":
            raise RuntimeError("the disk is full")
        return real_record(self, name, source, status, *args, **kwargs)

    monkeypatch.setattr(cli.Summary, "record", failing_record)
    with pytest.raises(RuntimeError, match="the disk is full"):
        cli.main(protect_args([photos["hanks"]], tmp_path / "out", comfy_host.server.url)
                 + ["--passphrase-env", passphrase_env])
    assert server_state(comfy_host) == before
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["results"] == {}, "written all the same"
