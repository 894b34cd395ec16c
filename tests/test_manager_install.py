"""The pack installed the way ComfyUI-Manager 4.3 installs a new pack, into a ComfyUI that
holds only its own requirements, then used: one shipped workflow runs, with the test
models and the real recogniser and detector the install brought.

What Manager 4.3 runs for a pack it clones (comfyui_manager/glob/manager_core.py,
``gitclone_install`` -> ``execute_install_script``): ``git clone`` into custom_nodes; for
each line of requirements.txt, ``python -m pip install <line>`` (torch, torchvision,
torchaudio and torchsde skipped); then ``python install.py`` in the pack's folder, with
COMFYUI_PATH and COMFYUI_FOLDERS_BASE_PATH set. comfy-cli's ``comfy node install`` and
comfy-test's installer run the same two files.

The host's environment is hard-linked from the test venv (tests/fixtures/host_env.py), so
it costs seconds, not a torch install; what the pack adds comes from the package index."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT
from diffpriv_client import demo, graphs
from diffpriv_client.comfy_http import ComfyClient, PromptFailed
from diffpriv_client.embedded import PACK_LINK_NAME, find_comfyui, free_port
from diffpriv_testmodels.comfy_models import CHECKPOINT, CLIP_VISION
from host_env import copy_checkout, host_only_env

pytestmark = pytest.mark.host
MANAGER_SKIPS = {"torch", "torchaudio", "torchsde", "torchvision"}  # cm_global.pip_blacklist in Manager 4.3
HELD = ("torch", "torchvision", "torchaudio", "numpy")


def manager_installs(python: Path, pack: Path, comfy: Path) -> str:
    """What Manager's execute_install_script runs for a new pack; returns the log."""
    env = dict(os.environ, COMFYUI_PATH=str(comfy), COMFYUI_FOLDERS_BASE_PATH=str(comfy))
    commands = []
    requirements = pack / "requirements.txt"
    if requirements.exists():
        for line in requirements.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and re.split(r"[<>=!~ ]", line)[0] not in MANAGER_SKIPS:
                commands.append([str(python), "-m", "pip", "install", line])
    if (pack / "install.py").exists():
        commands.append([str(python), "install.py"])
    log = []
    for command in commands:
        done = subprocess.run(command, cwd=pack, env=env, capture_output=True, text=True)
        log.append(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, "\n".join(log)[-6000:]
    return "\n".join(log)


def versions(python: Path, names) -> dict[str, str]:
    code = f"import json; from importlib.metadata import version; print(json.dumps({{n: version(n) for n in {list(names)!r}}}))"
    return json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


class Server:
    """ComfyUI started as a user starts it: its main.py, the pack found in custom_nodes."""

    def __init__(self, python: Path, comfy: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = comfy / f"comfyui-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(
            [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none",
             "--database-url", "sqlite:///:memory:"],
            cwd=comfy, env=env, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.client = ComfyClient(self.url, timeout=60)
        deadline = time.monotonic() + 180
        while not self.client.is_up():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.3)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def small_anonymize_faces() -> dict:
    """The shipped anonymize_faces workflow as it is (its example photo, the SFace
    recogniser, MTCNN), on the test models at the demo's small sizes and step counts."""
    graph = graphs.load_workflow(graphs.default_workflow("anonymize_faces"))
    graphs.set_models(graph, {str(Path(rel).parent): Path(rel).name for rel in (CHECKPOINT, CLIP_VISION)})
    demo.apply_settings(graph)
    for node in graphs.nodes_of(graph, "DiffPrivacyGuidedDDIMSampler"):
        node["inputs"].update(preset="custom", samples=2)
    return graph


def test_a_manager_install_gives_a_pack_whose_workflow_runs(tmp_path, test_models):
    python, comfy = host_only_env(tmp_path, find_comfyui())
    for rel in (CHECKPOINT, CLIP_VISION):
        (comfy / "models" / rel).parent.mkdir(parents=True, exist_ok=True)
        (comfy / "models" / rel).symlink_to(test_models / rel)
    pack = comfy / "custom_nodes" / PACK_LINK_NAME
    copy_checkout(ROOT, pack)  # the clone
    graph = small_anonymize_faces()
    before = versions(python, HELD)

    server = Server(python, comfy)  # cloned, nothing installed yet
    try:
        with pytest.raises(PromptFailed) as err:
            server.client.run(graph)
    finally:
        server.stop()
    assert "Diff-Privacy needs the Python package" in str(err.value) and "install.py" in str(err.value)

    log = manager_installs(python, pack, comfy)
    assert versions(python, HELD) == before, log[-4000:]

    server = Server(python, comfy)
    try:
        result = server.client.run(graph, timeout=900)
    finally:
        server.stop()
    assert "Cannot import" not in server.log()
    keys = result.files("17", "diffprivacy_keys")
    pictures = result.files("15")
    assert keys and len(pictures) == 2, json.dumps(result.outputs)[:2000]
    assert all((comfy / "output" / p["subfolder"] / p["filename"]).is_file() for p in pictures)
