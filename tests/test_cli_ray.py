"""`diffpriv protect|recover --ray` on a local Ray cluster of CPU actors (test-size models).

The cluster is started once in this process for the module (2 CPUs: two actors, each with
its own embedded ComfyUI); the command, run in-process, uses it as a running cluster. The
Ctrl-C test runs the command as a child process that starts a cluster of its own, as a user's
`diffpriv protect ... --ray` does. Graphs and photos are those of test_cli_host.py.
The module took 5 to 9 minutes on a busy, shared 2-core machine (about 2 GB for the cluster and its
two servers), most of it ComfyUI start-ups: each command starts its actors' servers.
"""
from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from diffpriv_client import cli, cluster, demo
from diffpriv_client.summary import latest_run
from diffpriv_testmodels import cache
from conftest import ROOT, _models_folder
from test_cli_demo import RECOVERY_LINE
from test_cli_host import (PASSPHRASE, SLOW_STEPS, WORKFLOWS, install_key_e, ok_entries,  # noqa: F401
                           passphrase_env, photos, protect_args, recover_args, results, run_in_thread, wait_for)

pytestmark = pytest.mark.host
FACES = ["astronaut", "hanks", "astronaut_mirrored", "hanks_mirrored"]


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory) -> Path:
    """The actors' XDG_CACHE_HOME: --demo-weights finds its models there (demo_cache)."""
    return tmp_path_factory.mktemp("ray-cache-home")


@pytest.fixture(scope="module")
def ray_cluster(cache_home):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20,
             runtime_env={"env_vars": {"XDG_CACHE_HOME": str(cache_home)}})
    try:
        yield ray.util.get_node_ip_address()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory, test_models, face_models) -> Path:
    """The models folder every actor links in (--models): test models and the test key-E."""
    root = tmp_path_factory.mktemp("ray-models")
    _models_folder(root, test_models, face_models)
    install_key_e(root)
    return root / "models"


@pytest.fixture
def demo_cache(cache_home) -> None:
    """--demo-weights on the actors uses the tests' demo models (the same generator, seed and
    files), linked where the command looks for them, rather than generating its own."""
    folder = demo.models_folder(cache_home / "diffpriv")
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.symlink_to(cache.demo_models(), target_is_directory=True)


def ray_args(models: Path, bases: Path, actors: int = 2) -> list[str]:
    return ["--ray", "--ray-actors", str(actors), "--models", str(models), "--base", str(bases)]


def comfy_processes(bases: Path) -> dict[int, str]:
    """pid -> command line of the ComfyUI servers run by actors whose folders are in ``bases``."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=True)
    found = {}
    for line in ps.stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "main.py" in args and f"--base-directory {bases}/diffpriv-actor-" in args:
            found[int(pid)] = args
    return found


def busy_servers(bases: Path) -> int:
    """How many of the actors' ComfyUI servers are running a prompt, read from their logs."""
    busy = 0
    for log in bases.glob("diffpriv-actor-*/comfy/comfyui.log"):
        text = log.read_text(errors="replace")
        busy += text.count("got prompt") > text.count("Prompt executed in")
    return busy


def descendants(pid: int) -> set[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True)
    children: dict[int, list[int]] = {}
    for line in ps.stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,stat="], capture_output=True, text=True, check=True)
    running = {int(p) for p, s in (line.split() for line in ps.stdout.splitlines()) if not s.startswith("Z")}
    return pids & running


def output_files(out: Path, name: str) -> list[str]:
    return sorted(p.name for p in (out / name).iterdir())


def test_two_actors_share_a_batch_a_faceless_photo_fails_alone_and_keys_recover(
        ray_cluster, models, photos, tmp_path, passphrase_env, capsys):
    out, bases = tmp_path / "out", tmp_path / "bases"
    names = ["astronaut", "chelsea", "hanks"]
    # Three actors asked on a 2-CPU cluster: the batch runs on the two that fit.
    argv = protect_args([photos[n] for n in names], out) + ray_args(models, bases, actors=3)
    assert cli.main(argv + ["--passphrase-env", passphrase_env]) == 1, "one photo failed"

    got = results(out)
    assert got["chelsea"]["status"] == "failed" and "no face found in image 0" in got["chelsea"]["error"]
    for name in ("astronaut", "hanks"):
        entry = got[name]
        assert entry["status"] == "ok" and entry["node"] == ray_cluster and entry["seconds"] > 0, entry
        assert len(entry["outputs"]) == 2 and len(entry["keys"]) == 1, entry
        assert len(output_files(out, name)) == 3, "each file once"
        key = out / entry["keys"][0]
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert PASSPHRASE.encode() not in key.read_bytes() and b'"dtype":"F32"' not in key.read_bytes()
    assert len({got[n]["server"] for n in names}) == 2, "both actors took part"
    assert not comfy_processes(bases) and not list(bases.iterdir()), "actors stopped, their folders removed"
    printed = capsys.readouterr()
    assert "1 failed, 2 ok" in printed.out
    assert re.search(rf"2/3 actors up, \d in flight; {re.escape(ray_cluster)}: [12] done, [\d.]+/min",
                     printed.err), "one bar"
    assert "asking the Ray cluster for 3 ComfyUI actor(s), 1 CPU each" in printed.err
    assert "(2 of 3 up; 1 starting or waiting for room on the cluster)" in printed.out

    # Recovery on the cluster: the key file travels to the actor, the picture back.
    key = out / got["hanks"]["keys"][0]
    recovered = tmp_path / "recovered"
    assert cli.main(recover_args([key], recovered, passphrase_env=passphrase_env)
                    + ray_args(models, bases, actors=1)) == 0
    (entry,) = results(recovered).values()
    assert entry["status"] == "ok" and entry["node"] == ray_cluster and len(entry["outputs"]) == 1


def test_a_killed_actor_loses_no_photo_and_none_is_done_twice(ray_cluster, models, photos, tmp_path, capsys):
    out, bases = tmp_path / "out", tmp_path / "bases"
    argv = protect_args([photos[n] for n in FACES], out, steps=SLOW_STEPS) + ray_args(models, bases)
    thread, outcome = run_in_thread(argv)
    wait_for(lambda: ok_entries(out) and busy_servers(bases) == 2)  # so the victim has a photo running
    (victim,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("-0")]
    servers_before = comfy_processes(bases)
    assert len(servers_before) == 2
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]))
    wait_for(lambda: len(comfy_processes(bases)) == 1, timeout=30)  # its ComfyUI died with it
    thread.join(600)

    assert outcome["rc"] == 0
    final = results(out)
    assert all(final[n]["status"] == "ok" for n in FACES), final
    for name in FACES:
        assert len(output_files(out, name)) == 3, f"{name}: each file once"
    printed = capsys.readouterr().out
    assert re.search(r"the actor on \S+ died .*; \w+ goes to another actor", printed)
    assert "a replacement actor is asked for" in printed
    assert not comfy_processes(bases)
    assert not list(bases.iterdir()), "no folder left on the node: not the killed actor's, with its photo"

    kept = {n: sorted((out / p).stat().st_mtime_ns for p in final[n]["outputs"]) for n in FACES}
    assert cli.main(argv) == 0, "a rerun has nothing left to do"
    assert all(e["status"] == "skipped" for e in results(out).values())
    assert kept == {n: sorted((out / p).stat().st_mtime_ns for p in final[n]["outputs"]) for n in FACES}


def test_each_node_checks_its_models_first_and_names_what_it_lacks(ray_cluster, models, photos, tmp_path,
                                                                   capsys):
    workflow = json.loads((WORKFLOWS / "protect.json").read_text())
    workflow["ckpt"]["inputs"]["ckpt_name"] = "v1-5-pruned-emaonly.safetensors"
    (tmp_path / "real.json").write_text(json.dumps(workflow))
    out, bases = tmp_path / "out", tmp_path / "bases"
    argv = protect_args([photos["astronaut"]], out) + ray_args(models, bases, actors=1)
    argv[argv.index("--workflow") + 1] = str(tmp_path / "real.json")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"node {ray_cluster}: Missing model files" in err and "checkpoints/v1-5-pruned-emaonly.safetensors" in err
    assert json.loads((out / "summary.json").read_text())["results"] == {}, "nothing ran"
    assert not comfy_processes(bases) and not list(bases.iterdir())


def test_ctrl_c_stops_the_cluster_work_and_leaves_no_process(models, photos, tmp_path):
    """The command starts its own local cluster here (no address), as a user's would."""
    bases = tmp_path / "bases"
    argv = [sys.executable, "-m", "diffpriv_client.cli", *protect_args([photos["hanks"]], tmp_path / "out", steps=50),
            *ray_args(models, bases, actors=1)]
    command = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: any("got prompt" in log.read_text() for log in bases.glob("*/comfy/comfyui.log")), timeout=300)
    started = descendants(command.pid)
    assert comfy_processes(bases).keys() <= started, "the ComfyUI runs under the command's cluster"
    command.send_signal(signal.SIGINT)
    assert command.wait(120) == 130, command.stdout.read()
    wait_for(lambda: not alive(started), timeout=30)
    assert not comfy_processes(bases)


def test_a_cluster_address_that_does_not_answer_fails_at_once_with_one_message(photos, tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "diffpriv_client.cli",
                           *protect_args([photos["hanks"]], tmp_path / "out"), "--ray", "127.0.0.1:1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and time.monotonic() - started < 60
    assert "--ray 127.0.0.1:1: no Ray cluster answers at 127.0.0.1:1" in done.stderr
    assert "Failed to connect" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_shared_storage_with_demo_weights_runs_the_demo_on_an_actor_that_writes_into_out(
        ray_cluster, demo_cache, photos, tmp_path, capsys, monkeypatch):
    """--ray-shared: the actor reads the photo where it lies and writes its files into --out
    itself (the driver writes none, only the run record); --demo-weights: the demo's models,
    settings and recovery check, printed and kept as on one machine."""
    written_here, rewrite_named = [], cluster.rewrite_named
    monkeypatch.setattr(cluster, "rewrite_named", lambda *a: written_here.append(a[:2]) or rewrite_named(*a))
    out, bases = tmp_path / "out", tmp_path / "bases"
    argv = ["protect", str(photos["astronaut"]), "--task", "anonymize", "--out", str(out), "--demo-weights",
            "--ray", "--ray-shared", "--ray-actors", "1", "--base", str(bases)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()

    assert f"--demo-weights: {demo.SETTINGS.describe(None)}" in printed.err and demo.BANNER in printed.err
    entry = results(out)["astronaut"]
    assert entry["status"] == "ok" and entry["node"] == ray_cluster, entry
    assert len(entry["outputs"]) == 4 and len(entry["keys"]) == 1, "the anonymize preset's four candidates, one key"
    (face,) = entry["passes"]
    assert face["stages"]["Guided DDIM Sampler"]["decoded"] == [f"{demo.SETTINGS.crop}x{demo.SETTINGS.crop}"]
    assert sorted(entry["outputs"] + entry["keys"]) == [f"astronaut/{n}" for n in output_files(out, "astronaut")]
    assert stat.S_IMODE((out / entry["keys"][0]).stat().st_mode) == 0o600
    assert written_here == [], "the actor wrote every file itself"

    (found,) = RECOVERY_LINE.finditer(printed.out)
    assert found.group(1, 2) == ("astronaut", "0") and len(found[5].split(", ")) == 4, found[0]
    assert float(found[3]) > 40 and int(found[4]) == 0 and int(found[6]) > 10_000, found[0]
    check = latest_run(out / demo.CHECK_FOLDER)
    try:
        checked = check.results
    finally:
        check.close()
    assert {name: e["status"] for name, e in checked.items()} == {
        "astronaut_reconstruction": "ok", "astronaut_face0_00001": "ok"}, checked
    assert all((out / demo.CHECK_FOLDER / e["outputs"][0]).is_file() for e in checked.values())
    assert checked["astronaut_face0_00001"]["source"] == str(out / entry["keys"][0])
    assert json.loads((out / demo.CHECK_FOLDER / "summary.json").read_text())["results"].keys() == checked.keys()
    assert "1 ok" in printed.out
    assert not comfy_processes(bases) and not list(bases.iterdir()), "the actor stopped, its folder removed"
