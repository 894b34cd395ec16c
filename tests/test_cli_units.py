"""Server choice, summary bookkeeping and timing, without a server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from diffpriv_client.batch import calls_of, identity_of, passes_of, prompt_seconds
from diffpriv_client.comfy_http import PromptResult
from diffpriv_client import graphs
from diffpriv_client.cli import (UsageError, build_parser, key_stem, load_template, main, parse_args, read_passphrase,
                                 workflow_name)
from diffpriv_client.preflight import refused_photos
from diffpriv_client.graphs import default_workflow
from diffpriv_client.servers import Server, choose_server
from diffpriv_client.summary import Plan, Summary, key_face

from conftest import ROOT

EXAMPLE = ROOT / "example_workflows" / "input" / "astronaut.png"


class FakeServer(Server):
    """A Server whose queue length is set by the test, not read from /prompt."""

    def __init__(self, url: str, queue: int | None, in_flight: int = 0, max_in_flight: int = 8):
        super().__init__(url, max_in_flight=max_in_flight)
        self.queue = queue
        self.in_flight = {f"p{i}": object() for i in range(in_flight)}

    def load(self) -> int:
        if self.queue is None:
            raise requests.ConnectionError("refused")
        return self.queue + len(self.in_flight)


def test_the_shortest_queue_wins_counting_our_own_prompts():
    a, b, c = FakeServer("http://a", queue=3), FakeServer("http://b", queue=1, in_flight=1), FakeServer("http://c", 4)
    assert choose_server([a, b, c]) is b  # 2 < 3 < 4
    b.in_flight["p9"] = object()
    b.in_flight["p10"] = object()
    assert choose_server([a, b, c]) is a  # b now 4: a's 3 is shortest


def test_ties_go_to_the_first_listed():
    a, b = FakeServer("http://a", 0), FakeServer("http://b", 0)
    assert choose_server([a, b]) is a


def test_full_dead_and_silent_servers_are_passed_over():
    full = FakeServer("http://full", 0, in_flight=2, max_in_flight=2)
    dead = FakeServer("http://dead", 0)
    dead.dead = True
    silent = FakeServer("http://silent", None)
    busy = FakeServer("http://busy", 50)
    assert choose_server([full, dead, silent, busy]) is busy
    assert choose_server([full, dead, silent]) is None


def test_a_server_that_stays_unreachable_gives_its_jobs_back():
    server = FakeServer("http://127.0.0.1:9", 0, in_flight=2)
    server.dead_after_s = 0.0
    (lost,) = server.poll(timeout=0.01)
    assert len(lost.jobs) == 2 and server.dead and not server.in_flight


def test_summary_resume_needs_ok_the_same_bytes_and_settings_and_the_files(tmp_path):
    out = tmp_path / "out"
    summary = Summary(out, "protect", {"task": "anonymize"})
    plan = summary.plan("a", "sha-a")
    assert plan.name == "a" and plan.done is None
    (out / "a").mkdir(parents=True)
    (out / "a" / "a_1.png").write_bytes(b"png")
    summary.record("a", tmp_path / "a.png", "ok", outputs=[out / "a" / "a_1.png"], seconds=1.23456, server="http://x",
                   anything="else")
    summary.record(summary.plan("b", "sha-b").name, tmp_path / "b.png", "failed", error="no face found in image 0")
    summary.finish()
    summary.write_json()

    again = Summary(out, "protect", {"task": "anonymize"})
    done = again.plan("a", "sha-a")
    assert done.name == "a" and done.done["outputs"] == ["a/a_1.png"], "same bytes, same settings: done"
    assert again.plan("b", "sha-b") == Plan("b"), "failed: done again under its own name"
    assert again.plan("a", "sha-other") == Plan("a-2"), "other bytes under a taken name: a new name"
    assert Summary(out, "protect", {"task": "anonymize"}).plan("renamed", "sha-a").name == "a", \
        "the bytes decide, not the file name"
    again.mark_skipped("a", done.done, tmp_path / "a.png")
    assert Summary(out, "protect", {"task": "hide"}).plan("a", "sha-a") == Plan("a-3"), "other settings: a new name"
    (out / "a" / "a_1.png").unlink()
    assert Summary(out, "protect", {"task": "anonymize"}).plan("a", "sha-a") == Plan("a"), "its files are gone"

    saved = json.loads((out / "summary.json").read_text())
    assert saved["run"]["counts"] == {"failed": 1, "ok": 1}
    entry = saved["results"]["a"]
    assert entry["outputs"] == ["a/a_1.png"] and entry["seconds"] == 1.235 and entry["anything"] == "else"
    assert saved["settings"][entry["settings"]] == {"task": "anonymize"}
    assert {k: saved["results"]["b"][k] for k in ("source", "status", "outputs", "keys", "faces", "error")} == {
        "source": str(tmp_path / "b.png"), "status": "failed", "outputs": [], "keys": [], "faces": [],
        "error": "no face found in image 0"}
    assert not list(out.glob(".*tmp*")), "no temporary file left behind"


def test_a_run_reports_its_own_inputs_and_lists_earlier_results_apart(tmp_path):
    out = tmp_path / "out"
    first = Summary(out, "protect")
    first.record(first.plan("old", "sha-old").name, tmp_path / "old.png", "failed", error="no face")
    first.finish()
    second = Summary(out, "protect")
    second.record(second.plan("new", "sha-new").name, tmp_path / "new.png", "ok")
    assert second.counts() == {"ok": 1} and list(second.results) == ["new"]
    assert {n: e["status"] for n, e in second.earlier().items()} == {"old": "failed"}
    second.write_json()
    saved = json.loads((out / "summary.json").read_text())
    assert list(saved["results"]) == ["new"] and list(saved["earlier"]) == ["old"]


def test_the_summary_keeps_what_the_sampler_reported_of_each_guided_image(tmp_path):
    report = {"image": 0, "recognizer": "face_recognition_sface_2021dec.onnx", "cosines": [0.21, 0.3],
              "threshold": 0.363, "mode": "anonymize", "goal": 0.313, "same_person": [False, False]}
    result = PromptResult("p", {"9": {"images": []}, "sample": {"identity_similarity": [report]}}, {})
    assert identity_of(result) == [report]
    summary = Summary(tmp_path, "protect")
    summary.record("a", tmp_path / "a.png", "ok", identity=identity_of(result))
    summary.write_json()
    assert json.loads((tmp_path / "summary.json").read_text())["results"]["a"]["identity"] == [report]


def test_prompt_seconds_is_execution_time_not_queue_time():
    entry = {"status": {"messages": [["execution_start", {"timestamp": 10_000}],
                                     ["execution_cached", {"timestamp": 10_100}],
                                     ["execution_error", {"timestamp": 12_500}]]}}
    assert prompt_seconds(entry) == 2.5
    assert prompt_seconds({"status": {"messages": []}}) is None


def test_key_stem():
    assert key_stem(Path("out/photo/photo_00001.dpkey.safetensors")) == "photo_00001"
    assert key_stem(Path("old.key.bin")) == "old.key"


def test_demo_weights_need_the_embedded_server(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["protect", "x.png", "--task", "anonymize", "--out", "o", "--demo-weights", "--server", "h:1"])
    assert exit_info.value.code == 2 and "leave out --server" in capsys.readouterr().err


def test_passphrase_comes_from_the_named_variable_only(monkeypatch):
    monkeypatch.setenv("DP_UNIT_PW", "s3cret")
    assert read_passphrase("DP_UNIT_PW") == "s3cret" and read_passphrase(None) == ""
    monkeypatch.delenv("DP_UNIT_PW")
    with pytest.raises(UsageError, match="DP_UNIT_PW is not set"):
        read_passphrase("DP_UNIT_PW")


def test_eval_subcommand_reaches_the_evaluation_toolkit(capsys):
    from diffpriv_client.cli import main

    with pytest.raises(SystemExit) as done:
        main(["eval", "--help"])
    assert done.value.code == 0
    assert "diffpriv eval" in capsys.readouterr().out


def test_the_default_workflow_follows_task_mode_and_photo(tmp_path):
    parse = build_parser().parse_args
    photo = tmp_path / "p.png"
    cases = {("protect", "a.png", "--task", "hide", "--out", "o"): "hide_faces",
             ("protect", "a.png", "--task", "anonymize", "--every-face", "--out", "o"): "anonymize_faces",
             ("protect", "a.png", "--task", "hide", "--whole-image", "--out", "o"): "hide",
             ("recover", "k.dpkey.safetensors", "--out", "o"): "recover",
             ("recover", "k.dpkey.safetensors", "--photo", str(photo), "--out", "o"): "recover_face"}
    for argv, name in cases.items():
        assert workflow_name(parse(list(argv))) == name
        assert default_workflow(name).is_file(), name


def test_passes_per_face_add_the_stock_vae_nodes_and_ignore_malformed_reports():
    graph = {"enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0]}},
             "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0]}}}
    sampler = [{"image": k, "stage": "Guided DDIM Sampler", "passes": {"unet_forward": 8}, "candidates": 4,
                "decode_region": "face crop", "decoded": ["96x96"]} for k in (0, 1)]
    outputs = {"sample": {"passes": sampler + [{"image": "0", "stage": "x", "passes": {}}]},
               "inv": {"passes": [{"image": 1, "stage": "DDIM Inversion Key", "passes": {"unet_forward": 5}}]},
               "odd": {"passes": "unet_forward"}}
    faces = passes_of(PromptResult("p", outputs, {}), graph)
    assert [f["face"] for f in faces] == [0, 1]
    assert faces[1]["total"] == {"unet_forward": 13, "vae_encode": 1, "vae_decode_forward": 4}
    assert faces[0]["stages"]["Guided DDIM Sampler"] == {"passes": {"unet_forward": 8}, "candidates": 4,
                                                         "decode_region": "face crop", "decoded": ["96x96"]}
    assert faces[0]["stages"]["VAE Decode"] == {"passes": {"vae_decode_forward": 4}}


def test_calls_per_photo_count_a_batch_once_and_ignore_malformed_reports():
    graph = {"enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0]}},
             "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0]}}}
    together = [{"image": k, "stage": "MSI Inversion", "passes": {"unet_forward": 100}, "batch": [0, 1],
                 "calls": {"unet_forward": 60, "unet_backward": 50}} for k in (0, 1)]
    alone = [{"image": k, "stage": "Guided DDIM Sampler", "passes": {"unet_forward": 8}, "batch": [k],
              "calls": {"unet_forward": 2}} for k in (0, 1)]
    hostile = [{"image": 0, "stage": "MSI Inversion", "passes": {}, "batch": [5], "calls": {"unet_forward": -9}},
               {"image": 0, "stage": "MSI Inversion", "passes": {}, "batch": "0", "calls": {"unet_forward": 9}},
               {"image": 0, "stage": "MSI Inversion", "passes": {}, "batch": [7], "calls": {"unet_forward": "9"}}]
    outputs = {"msi": {"passes": together + hostile}, "sample": {"passes": alone}, "odd": {"passes": "x"}}
    calls = calls_of(PromptResult("p", outputs, {}), graph)
    assert calls["stages"] == {"MSI Inversion": {"unet_forward": 60, "unet_backward": 50},
                               "Guided DDIM Sampler": {"unet_forward": 4}, "VAE Encode": {"vae_encode": 1},
                               "VAE Decode": {"vae_decode_forward": 1}}
    assert calls["total"] == {"unet_forward": 64, "unet_backward": 50, "vae_encode": 1, "vae_decode_forward": 1}


def test_the_summary_lists_the_face_of_a_per_face_key(tmp_path):
    from diffpriv_core.faces.crop import FaceCrop
    from diffpriv_core.keys import save_key
    from key_helpers import random_key_e

    landmarks = ((40.0, 55.0), (66.0, 55.0), (53.0, 66.0), (44.0, 78.0), (63.0, 78.0))
    crop = FaceCrop(0, 3, (443, 640), (10, 20, 96), 64, (30.0, 40.0, 78.5, 90.25), protection="unconditional",
                    landmarks=landmarks)
    face_key, whole_key = tmp_path / "face.dpkey.safetensors", tmp_path / "whole.dpkey.safetensors"
    save_key(face_key, random_key_e(1, "abc"), passphrase="pw", extra={"face_crop": crop.to_json()})
    save_key(whole_key, random_key_e(1, "abc"))
    assert key_face(face_key) == {"face": 3, "box": [30.0, 40.0, 78.5, 90.2], "crop": [10, 20, 96],
                                  "protection": "unconditional", "landmarks": [list(p) for p in landmarks]}
    assert key_face(whole_key) is None


def test_the_readme_command_protects_every_face_of_the_example_photo():
    args = build_parser().parse_args(["protect", str(EXAMPLE), "--task", "anonymize", "--out", "out/"])
    assert not args.whole_image and workflow_name(args) == "anonymize_faces"
    template = load_template(args)
    assert not graphs.msi_sees_the_photo(template), "MSI sees 512 px face crops, not the photo"
    assert refused_photos([EXAMPLE], whole_image=False) == {}


def test_only_whole_image_workflows_limit_the_photo_size():
    for name, limited in (("anonymize", True), ("hide", True), ("anonymize_faces", False), ("hide_faces", False)):
        assert graphs.msi_sees_the_photo(graphs.load_workflow(graphs.default_workflow(name))) == limited, name


def test_every_unusable_photo_is_refused_at_once_before_any_server_starts(tmp_path, capsys):
    from PIL import Image

    big, small, broken, empty = (tmp_path / f"{n}.png" for n in ("big", "small", "broken", "empty"))
    Image.new("RGB", (2100, 70)).save(big)
    Image.new("RGB", (63, 90)).save(small)
    broken.write_bytes(Image.new("RGB", (80, 80)).tobytes()[:50])
    empty.write_bytes(b"")
    photos = [big, small, broken, empty]
    refused = refused_photos(photos, whole_image=True)
    assert "at most 2048 x 2048 pixels, got 2100 x 70; resize" in refused[big]
    assert "at least 64 x 64 pixels, got 63 x 90" in refused[small]
    assert refused[broken].startswith("not a readable image") and refused[empty].startswith("not a readable")
    assert set(refused_photos(photos, whole_image=False)) == {broken, empty}, "faces: any size"

    out = tmp_path / "out"
    missing, empty_folder = tmp_path / "missing.png", tmp_path / "nothing"
    empty_folder.mkdir()
    # Everything refused: no server is started (none is given, and none would answer).
    assert main(["protect", *map(str, photos), str(missing), str(empty_folder), "--task", "anonymize",
                 "--whole-image", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert printed.index("refused before queueing (6 of 6):") < printed.index("summary.json: 6 failed")
    assert "missing: no such file or folder" in printed and "nothing: a folder without any picture" in printed
    saved = json.loads((out / "summary.json").read_text())["results"]
    assert {n: e["error"].split(":")[0] for n, e in saved.items()} == dict.fromkeys(
        ["missing", "nothing", "big", "small", "broken", "empty"], "refused before queueing")

    # diffpriv report: summary.json and the report again, from the record alone.
    (out / "summary.json").unlink()
    assert main(["report", "--out", str(out)]) == 1
    assert "summary.json: 6 failed" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["results"] == saved
    assert main(["report", "--out", str(tmp_path)]) == 2 and "has no run record" in capsys.readouterr().err


def test_a_workflow_without_the_nodes_the_command_fills_in_is_named(tmp_path, capsys):
    workflow = tmp_path / "mine.json"
    workflow.write_text(json.dumps({"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}))
    assert main(["protect", str(EXAMPLE), "--task", "anonymize", "--out", str(tmp_path / "o"),
                 "--workflow", str(workflow)]) == 2
    err = capsys.readouterr().err
    assert "lacks what `diffpriv protect` fills in: Save Privacy Key (DiffPrivacySaveKey)" in err
    assert "docs/cli.md" in err and "Load Image" not in err
    assert main(["recover", "k.dpkey.safetensors", "--photo", str(EXAMPLE), "--out", str(tmp_path / "o"),
                 "--workflow", str(workflow)]) == 2
    assert "Load Privacy Key (DiffPrivacyLoadKey)" in capsys.readouterr().err


def test_target_similarity_switches_the_workflows_guidance_and_needs_one(capsys):
    args = build_parser().parse_args(["protect", "a.png", "--task", "hide", "--target-similarity", "--margin", "0.1",
                                      "--out", "o"])
    (guide,) = graphs.nodes_of(load_template(args), "DiffPrivacyIdentityGuidance")
    assert guide["inputs"]["lambda_mode"] == "target similarity" and guide["inputs"]["margin"] == 0.1
    assert guide["inputs"]["mode"] == "hide", "the rest of the node as the workflow has it"
    linked = {"g": {"class_type": "DiffPrivacyIdentityGuidance", "inputs": {"margin": ["m", 0]}}}
    graphs.set_target_similarity(linked, 0.2)
    assert linked["g"]["inputs"] == {"margin": ["m", 0], "lambda_mode": "target similarity"}, "a link stays"
    with pytest.raises(ValueError, match="--target-similarity needs an Identity Energy Guidance"):
        graphs.set_target_similarity({"1": {"class_type": "LoadImage", "inputs": {}}})
    for wrong in (["--margin", "0.1"], ["--target-similarity", "--margin", "1.5"]):
        with pytest.raises(SystemExit):
            main(["protect", "a.png", "--task", "hide", "--out", "o", *wrong])
    assert "--margin COSINE needs --target-similarity" in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused_before_anything_starts(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert main(["protect", str(EXAMPLE), "--task", "anonymize", "--out", str(taken)]) == 2
    assert f"--out {taken} is a file, not a folder" in capsys.readouterr().err
    assert main(["protect", str(EXAMPLE), "--task", "anonymize", "--out", str(taken / "sub")]) == 2
    assert "cannot write there" in capsys.readouterr().err
    assert taken.read_text() == "not a folder"


def test_photos_may_follow_the_options_and_help_names_the_defaults(capsys):
    args = parse_args(build_parser(), ["protect", "a.png", "--task", "hide", "--out", "o", "b.png", "c/"])
    assert args.images == [Path("a.png"), Path("b.png"), Path("c/")]
    with pytest.raises(SystemExit):
        main(["protect", "--task", "hide", "--out", "o", "a.png", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["protect", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "<task>_faces.json, <task>.json with --whole-image" in shown and "(default: 8)" in shown
    assert "folders: every picture inside" in shown and "examples:" in shown


def test_ray_actors_ask_for_what_is_given_and_default_to_the_room_there_is():
    from types import SimpleNamespace

    from diffpriv_client.cluster import Resources, actor_resources, actors_wanted

    def cluster(**total):
        return SimpleNamespace(cluster_resources=lambda: total)

    def args(*argv):
        return build_parser().parse_args(["protect", "a.png", "--task", "hide", "--out", "o", "--ray", *argv])

    gpus = cluster(CPU=32.0, GPU=4.0)
    assert actor_resources(gpus, args()) == Resources(1.0, 1.0), "a cluster with GPUs: one each"
    assert actor_resources(cluster(CPU=8.0), args()) == Resources(1.0, 0.0), "none up: CPU actors"
    assert actor_resources(cluster(CPU=8.0), args("--ray-gpus-per-actor", "1")) == Resources(1.0, 1.0), \
        "asked for even when no GPU is up, so that an autoscaler adds one"
    half = actor_resources(gpus, args("--ray-gpus-per-actor", "0.5", "--ray-cpus-per-actor", "2"))
    assert half == Resources(2.0, 0.5) and half.words() == "2 CPU, 0.5 GPU"
    assert actors_wanted(gpus, args(), half, photos=100) == 8, "two actors on each of the four GPUs"
    assert actors_wanted(gpus, args(), half, photos=3) == 3, "never more actors than photos"
    assert actors_wanted(cluster(CPU=8.0), args(), Resources(1.0, 1.0), photos=100) == 1, "no room now: one"
    assert actors_wanted(cluster(CPU=2.0), args("--ray-actors", "3"), Resources(1.0, 0.0), photos=100) == 3, \
        "more than fit may be asked for: the others wait for room"


def test_a_base_directory_made_by_another_checkout_loads_this_one(tmp_path):
    """The pack's link in custom_nodes (and the models link) follow the checkout that runs."""
    from diffpriv_client.embedded import PACK_DIR, PACK_LINK_NAME, prepare_base_directory

    base, elsewhere, models = tmp_path / "base", tmp_path / "other-checkout", tmp_path / "models"
    elsewhere.mkdir()
    models.mkdir()
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_LINK_NAME).symlink_to(elsewhere, target_is_directory=True)
    (base / "models").symlink_to(elsewhere, target_is_directory=True)
    prepare_base_directory(base, models)
    assert (base / "custom_nodes" / PACK_LINK_NAME).resolve() == PACK_DIR.resolve()
    assert (base / "models").resolve() == models.resolve()
    (base / "custom_nodes" / PACK_LINK_NAME).unlink()
    (base / "custom_nodes" / PACK_LINK_NAME).mkdir()  # a folder of its own is never replaced
    with pytest.raises(RuntimeError, match="is a folder of its own"):
        prepare_base_directory(base)
