"""The README's demo on the real server: the --demo-weights workflow and settings protect the
astronaut's face, then the recovery check recovers it and compares it with the VAE's
reconstruction. The session's server is reused (--demo-weights itself starts its own), with
the demo's checkpoint linked into its models folder. The same run checks the progress each
node reports over the websocket: 0/N at once, then every step to N, N the node's whole loop."""
from __future__ import annotations

import json
import re

import pytest

from diffpriv_client import batch, cli, demo, graphs
from diffpriv_client.batch import Cleanup
from diffpriv_client.embedded import PACK_DIR
from diffpriv_client.progress import ProgressBoard
from diffpriv_client.servers import Server
from diffpriv_client.summary import latest_run
from diffpriv_testmodels import cache
from diffpriv_testmodels.comfy_models import DEMO_CHECKPOINT

pytestmark = pytest.mark.host
ASTRONAUT = PACK_DIR / "example_workflows" / "input" / "astronaut.png"


class RecordingBoard(ProgressBoard):
    """The progress line's board, keeping every step reported, by job and stage."""

    steps: dict[tuple[str, str], list[tuple[int, int]]] = {}

    def stage(self, name, title):
        super().stage(name, title)
        self.steps[name, title] = []

    def step(self, name, step, steps):
        super().step(name, step, steps)
        self.steps[name, self.running[name].stage].append((step, steps))


def demo_template(host) -> dict:
    """The shipped anonymize_faces workflow with the demo's models and settings, as
    --demo-weights runs it, on ``host`` (the demo's checkpoint linked into its models)."""
    link = host.base / "models" / DEMO_CHECKPOINT
    if not link.exists():
        link.symlink_to(cache.demo_models() / DEMO_CHECKPOINT)
    template = graphs.load_workflow(graphs.default_workflow("anonymize_faces"))
    demo.use_demo_models(template)
    demo.apply_settings(template)
    return template


RECOVERY_LINE = re.compile(r"recovery check: (\w+?)_face(\d+)_00001: recovered into the protected photo vs VAE "
                           r"reconstruction ([\d.]+|inf) dB \((\d+) pixels off by more than 20/255\); protected "
                           r"candidates vs VAE reconstruction ([\d., ]+) dB; .* \(over the (\d+) pixels the "
                           r"protection changed")


def checked_recoveries(summary, template: dict, url: str, capsys) -> list[dict]:
    """The demo's recovery check of a protect run's faces, as it prints it: per face, the
    PSNR to the VAE reconstruction, the pixels off, the candidates' PSNRs, the pixels changed."""
    assert demo.check_recovery(summary, template, cli.KeySecrets(), [Server(url, 4)], Cleanup(),
                               cli._recover_graph) == []
    printed = capsys.readouterr().out
    found = [{"photo": m[1], "face": int(m[2]), "db": float(m[3]), "off": int(m[4]),
              "candidates": [float(c) for c in m[5].split(", ")], "changed": int(m[6])}
             for m in RECOVERY_LINE.finditer(printed)]
    assert found, printed
    return found


def counted(total: int) -> list[tuple[int, int]]:
    return [(k, total) for k in range(total + 1)]


def test_the_demo_protects_and_proves_recovery_and_its_nodes_report_progress(comfy_host, tmp_path, capsys,
                                                                             monkeypatch):
    monkeypatch.setattr(batch, "ProgressBoard", RecordingBoard)
    template = demo_template(comfy_host)
    workflow = tmp_path / "demo.json"
    workflow.write_text(json.dumps(template))
    out, url = tmp_path / "demo", comfy_host.server.url
    assert cli.main(["protect", str(ASTRONAUT), "--task", "anonymize", "--out", str(out), "--workflow", str(workflow),
                     "--server", url]) == 0
    capsys.readouterr()

    summary = latest_run(out)
    (found,) = checked_recoveries(summary, template, url, capsys)
    assert (found["photo"], found["face"]) == ("astronaut", 0)
    assert len(found["candidates"]) == 4, "the anonymize preset's four candidates"
    assert found["db"] > 40 and found["db"] > max(found["candidates"]) + 20, found
    assert found["off"] == 0 and found["changed"] > 10_000, found
    check = latest_run(out / demo.CHECK_FOLDER)
    assert {name: entry["status"] for name, entry in check.results.items()} == {
        "astronaut_reconstruction": "ok", "astronaut_face0_00001": "ok"}

    settings, sampled = demo.SETTINGS, round(demo.SETTINGS.sampling_steps * 0.6)  # anonymize's S_ns
    steps = {(name, stage): got for (name, stage), got in RecordingBoard.steps.items() if got}
    assert steps == {("astronaut", "Face Detect"): counted(1), ("astronaut", "Identity Energy Guidance"): counted(1),
                     ("astronaut", "MSI Inversion"): counted(settings.msi_steps),
                     ("astronaut", "Guided DDIM Sampler"): counted(sampled),
                     ("astronaut", "DDIM Inversion Key"): counted(settings.key_i_steps),
                     ("astronaut_reconstruction", "Face Detect"): counted(1),
                     # BDIA recovery starts from key-I's two states: one UNet call fewer than key-I.
                     ("astronaut_face0_00001", "Recover"): counted(settings.key_i_steps - 1)}, steps
