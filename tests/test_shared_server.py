"""Another client of the same ComfyUI attacks the command's run, with HTTP access only: it
reads /queue, /history and /view, deletes, and queues a swapped graph under the command's
prompt id (the attacks that worked before jobs, issue 27). Each attack fails and the
command's results stay right; a local process cannot use the command's embedded server."""
from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import requests
import websocket

from diffpriv_client import cli
from diffpriv_client.embedded import EmbeddedComfy, prepare_base_directory
from diffpriv_core.keys import load_key

from test_cli_host import (PASSPHRASE, install_key_e, passphrase_env, photos, protect_args,  # noqa: F401 (fixtures)
                           recover_args, results, server_state, wait_for)

pytestmark = pytest.mark.host


class Attacker(threading.Thread):
    """Polls /queue and /history; tries every attack once on every prompt it sees."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.http = requests.Session()
        # The session server's earlier prompts are other tests': left alone.
        self.earlier = set(self.http.get(f"{url}/history", timeout=10).json())
        self.stopped = threading.Event()
        self.polled: list[str] = []  # every /queue and /history answer, as text
        self.tried: dict[str, dict[str, int]] = {}  # prompt id -> attack -> HTTP status
        self.views: list[tuple[dict, int]] = []  # file records of others' prompts, and /view's status

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                queue = self.http.get(f"{self.url}/queue", timeout=10)
                history = self.http.get(f"{self.url}/history", timeout=10)
            except requests.RequestException:
                continue
            self.polled += [queue.text, history.text]
            for item in queue.json()["queue_running"] + queue.json()["queue_pending"]:
                self.attack(item[1], item[2])
                self.listen(item[1], item[3].get("client_id"))
            for prompt_id, entry in history.json().items():
                if prompt_id not in self.earlier:
                    self.attack(prompt_id, entry["prompt"][2])
                    self.read(entry)
            time.sleep(0.05)

    def attack(self, prompt_id: str, graph: dict) -> None:
        if prompt_id in self.tried or prompt_id in self.earlier:
            return
        tried = self.tried[prompt_id] = {}
        post = lambda path, body: self.http.post(f"{self.url}{path}", json=body, timeout=60).status_code  # noqa: E731
        tried["cleanup"] = post("/diffprivacy/cleanup", {"prompt_id": prompt_id, "inputs": [], "outputs": True})
        tried["delete history"] = post("/history", {"delete": [prompt_id]})
        loads = [(i, n) for i, n in graph.items() if n.get("class_type") == "LoadImage"]
        saves = [i for i, n in graph.items() if n.get("class_type") == "SaveImage"]
        if loads and saves:
            (load_id, load), save_id = loads[0], saves[0]
            swap = {load_id: load, save_id: {"class_type": "SaveImage", "inputs": {
                "images": [load_id, 0], "filename_prefix": graph[save_id]["inputs"]["filename_prefix"]}}}
            tried["swap"] = post("/prompt", {"prompt": swap, "prompt_id": prompt_id, "number": -1})
            plain = {"e": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                 "color": 0}},
                     save_id: {"class_type": "SaveImage", "inputs": {"images": ["e", 0], "filename_prefix": "swap"}}}
            tried["same id"] = post("/prompt", {"prompt": plain, "prompt_id": prompt_id, "number": -1})
            name = load["inputs"]["image"]
            tried["view upload"] = self.http.get(f"{self.url}/view", params={
                "filename": os.path.basename(name), "subfolder": os.path.dirname(name), "type": "input"},
                timeout=10).status_code

    def listen(self, prompt_id: str, client_id) -> None:
        """Take over the websocket session of the prompt's client (its progress, file names)."""
        tried = self.tried.get(prompt_id, {})
        if "websocket" in tried or not client_id or prompt_id in self.earlier:
            return
        try:
            websocket.create_connection(f"{self.url.replace('http', 'ws', 1)}/ws?clientId={client_id}",
                                        timeout=10).close()
            tried["websocket"] = 101
        except websocket.WebSocketBadStatusException as exc:
            tried["websocket"] = exc.status_code

    def read(self, entry: dict) -> None:
        for output in entry.get("outputs", {}).values():
            for records in output.values():
                for record in records if isinstance(records, list) else []:
                    if isinstance(record, dict) and "filename" in record and record.get("type") == "output":
                        status = self.http.get(f"{self.url}/view", params=record, timeout=10).status_code
                        self.views.append((record, status))

    def stop(self) -> None:
        self.stopped.set()
        self.join(30)


def test_another_client_can_neither_delete_swap_nor_read_a_run(comfy_host, photos, tmp_path, passphrase_env):
    install_key_e(comfy_host.base)
    url = comfy_host.server.url
    before = server_state(comfy_host)
    attacker = Attacker(url)
    # A UI user saves a key into models/diffprivacy_keys, as SECURITY.md recommends.
    ui_key = comfy_host.client.run({
        "load": {"class_type": "DiffPrivacyLoadKey", "inputs": {"key_name": "cli-test-e.dpkey.safetensors",
                                                               "passphrase": ""}},
        "save": {"class_type": "DiffPrivacySaveKey", "inputs": {"key_e": ["load", 0], "filename_prefix": "ui/key",
                                                               "folder": "keys", "passphrase": ""}}})
    (record,) = ui_key.files("save", "diffprivacy_keys")
    ui_key_file = comfy_host.saved_file(record)

    attacker.start()
    try:
        out = tmp_path / "out"
        assert cli.main(protect_args([photos["hanks"]], out, url, steps=10) + ["--passphrase-env", passphrase_env]) == 0
        key = out / results(out)["hanks"]["keys"][0]
        recovered = tmp_path / "recovered"
        assert cli.main(recover_args([key], recovered, url, passphrase_env=passphrase_env)) == 0
        wait_for(lambda: len(attacker.tried) >= 3, timeout=30)
    finally:
        attacker.stop()

    assert results(out)["hanks"]["status"] == "ok" and load_key(key, PASSPHRASE)[1] is not None
    (picture,) = results(recovered).values()
    assert picture["status"] == "ok"
    commands = {p: t for p, t in attacker.tried.items() if p != ui_key.prompt_id}
    assert len(commands) >= 2, f"the attacker saw the protect and the recover prompts: {attacker.tried}"
    for prompt_id, tried in attacker.tried.items():
        assert tried["cleanup"] == 403, (prompt_id, tried)  # cleanup needs the job's capability
    for tried in commands.values():
        assert tried["delete history"] == 403 and tried.get("swap", 403) == 403, tried
        assert tried.get("same id", 400) in (400, 403), tried  # the command's id is taken
        assert tried.get("view upload", 403) == 403 and tried.get("websocket", 403) == 403, tried
    assert any("view upload" in t for t in commands.values()), "the original was tried"
    assert any("websocket" in t for t in commands.values()), "the command's websocket session was tried"
    assert all(status == 403 for record, status in attacker.views if "diffpriv-jobs" in record["subfolder"])
    assert not any(PASSPHRASE in text for text in attacker.polled), "the passphrase never reached the server"
    assert not any("diffprivacy_job" in text for text in attacker.polled), "job tokens never reach the queue"
    assert ui_key_file.is_file(), "the UI user's key is still there"
    files, history = server_state(comfy_host)
    # (ComfyUI lets any client delete a UI user's history entry; the key file is what matters.)
    assert files - before[0] == {ui_key_file} and history - before[1] <= {ui_key.prompt_id}, \
        "the command's cleanups left nothing, and removed nothing of the UI user's"
    ui_key_file.unlink()
    comfy_host.client.delete_history([ui_key.prompt_id])


def test_a_prompt_withdrawn_by_another_client_fails_its_photo_in_bounded_time(comfy_host, photos, tmp_path, capsys):
    """Another client withdraws the command's queued prompt: the photo fails, saying so,
    instead of the command waiting for ever."""
    install_key_e(comfy_host.base)
    url = comfy_host.server.url
    blocker = comfy_host.client.queue(comfy_host_graph(photos, comfy_host))
    out = tmp_path / "out"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(rc=cli.main(protect_args([photos["astronaut"]], out, url))))
    thread.start()
    try:
        wait_for(lambda: len(comfy_host.client.queued_prompt_ids()) > 1, timeout=60)
        ours = comfy_host.client.queued_prompt_ids() - {blocker}
        requests.post(f"{url}/queue", json={"delete": list(ours)}, timeout=10)
        started = time.monotonic()
        thread.join(120)
        assert time.monotonic() - started < 60
    finally:
        comfy_host.client.cancel([blocker])
    assert outcome["rc"] == 1
    assert "gone from the server" in results(out)["astronaut"]["error"]
    assert "gone from the server" in capsys.readouterr().out
    wait_for(lambda: not comfy_host.client.queued_prompt_ids(), timeout=60)
    comfy_host.client.delete_history([blocker])


def comfy_host_graph(photos, host) -> dict:
    """A slow prompt of another client (the test workflow with many steps)."""
    from diffpriv_client import graphs

    from test_cli_host import WORKFLOWS

    uploaded = host.client.upload_image(photos["hanks"])
    return graphs.protect_graph(graphs.load_workflow(WORKFLOWS / "protect.json"), uploaded, "blocker", steps=400)


def test_the_embedded_server_answers_only_its_own_command(tmp_path):
    """A local process that finds the embedded server's port gets 401 on HTTP and the
    websocket; the command's client, carrying the run's token, is answered; what the
    server writes is owner-only in an owner-only base folder."""
    base = prepare_base_directory(tmp_path / "base")
    with EmbeddedComfy(base) as server:
        for headers in ({}, {"Authorization": "Bearer not-the-token"}):
            for path in ("/system_stats", "/queue", "/history", "/view?filename=x.png&type=input", "/api/prompt"):
                assert requests.get(f"{server.url}{path}", headers=headers, timeout=10).status_code == 401, path
            assert requests.post(f"{server.url}/prompt", json={}, headers=headers, timeout=10).status_code == 401
        with pytest.raises(websocket.WebSocketBadStatusException, match="401"):
            websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId=x", timeout=10)
        client = server.client()
        assert client.is_up()
        client.connect_websocket(timeout=10).close()
        saved = client.run({"e": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                         "color": 0}},
                            "s": {"class_type": "SaveImage", "inputs": {"images": ["e", 0], "filename_prefix": "t"}}})
        (record,) = saved.files("s")
        written = base / "output" / record["subfolder"] / record["filename"]
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
        # A browser opens the UI with the token once; it then holds it as a cookie.
        browser = requests.Session()
        opened = browser.get(f"{server.url}/?diffpriv_token={server.token}", timeout=10)
        assert opened.status_code == 200 and browser.get(f"{server.url}/queue", timeout=10).status_code == 200
    assert stat.S_IMODE(base.stat().st_mode) == 0o700
    assert all(stat.S_IMODE((base / sub).stat().st_mode) == 0o700 for sub in ("input", "output", "temp"))
    assert not json.dumps(dict(os.environ)).count(server.token)


def test_bad_bodies_get_400_and_a_job_holds_at_most_its_quota(comfy_host):
    from diffpriv_core.job_protocol import JOB_HEADER

    url, client = comfy_host.server.url, comfy_host.client
    bad_json = {"data": b"{not json", "headers": {"Content-Type": "application/json"}, "timeout": 10}
    for path in ("/diffprivacy/jobs", "/prompt"):
        answer = requests.post(f"{url}{path}", **bad_json)
        assert answer.status_code == 400 and "not JSON" in answer.json()["error"], path
    assert requests.post(f"{url}/prompt", json=[1], timeout=10).status_code == 400
    for body in (None, {"prompt_id": "anything", "inputs": [], "outputs": True}):
        answer = requests.post(f"{url}/diffprivacy/cleanup", json=body, timeout=10)
        assert answer.status_code == 403 and "job" in answer.json()["error"]
    job = client.start_job()
    garbage = requests.post(f"{url}/diffprivacy/jobs/upload", data=b"--x\r\ngarbage", timeout=10, headers={
        JOB_HEADER: job.token, "Content-Type": "multipart/form-data; boundary=x"})
    assert garbage.status_code == 400
    with pytest.raises(ValueError, match="not a key file|damaged"):
        client.upload_to_job(job, "key", b"not a key file")
    names = [client.upload_to_job(job, "image", b"\x89PNG not really", ".png") for _ in range(16)]
    assert len(set(names)) == 16 and all(n.startswith(job.folder + "/") for n in names)
    with pytest.raises(ValueError, match="at most 16"):
        client.upload_to_job(job, "image", b"one too many", ".png")
    folder = comfy_host.base / "input" / job.folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())
    assert len(client.cleanup_job(job)["removed"]) == 16 and not folder.exists()
    assert "unknown job" in client.cleanup_job(job)["failed"][0], "a job is cleaned once"
