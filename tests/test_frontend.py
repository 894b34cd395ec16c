"""The real ComfyUI frontend (its package is installed with the host) in headless Chromium:
each shipped workflow loads with every node known, and the editor turns it into exactly its
API-format twin. Screenshots land in test-artifacts/."""
from __future__ import annotations

import json

import pytest
import requests

from cdp import Browser
from conftest import ROOT
from diffpriv_client.embedded import PACK_LINK_NAME, free_port
from diffpriv_client.workflows import WORKFLOWS_DIR, load_api, workflow_names

pytestmark = pytest.mark.host
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def editor(comfy_host):
    # A first visit opens the template browser over the canvas; a returning user's does not.
    requests.post(f"{comfy_host.server.url}/settings/Comfy.TutorialCompleted", json=True, timeout=10)
    browser = Browser(free_port())
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=comfy_host.server.url)
        browser.wait_for("window.app && window.app.graph && window.LiteGraph && true", timeout=120)
        yield browser
    finally:
        browser.close()


def test_the_workflows_are_in_the_template_browser(comfy_host):
    templates = comfy_host.client.get("/api/workflow_templates")
    assert set(templates[PACK_LINK_NAME]) >= set(workflow_names())


@pytest.mark.parametrize("name", workflow_names())
def test_the_editor_loads_the_workflow_and_queues_its_api_twin(comfy_host, editor, name):
    ui = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
    loaded = editor.evaluate(f"""(async () => {{
        await window.app.loadGraphData({json.dumps(ui)});
        const nodes = window.app.graph._nodes;
        const prompt = await window.app.graphToPrompt();
        return {{count: nodes.length, prompt: prompt.output,
                 unknown: nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type)}};
    }})()""")
    assert loaded["unknown"] == []
    assert loaded["count"] == len(ui["nodes"])
    info = comfy_host.client.object_info()
    # The editor also queues its display-only widgets (Preview as Text's `preview`), which
    # the server does not declare and ignores: the twin holds what the server takes.
    queued = {node_id: {"class_type": n["class_type"], "inputs": declared_inputs(info[n["class_type"]], n["inputs"])}
              for node_id, n in loaded["prompt"].items()}
    twin = {node_id: {"class_type": n["class_type"], "inputs": n["inputs"]} for node_id, n in load_api(name).items()}
    assert queued == twin
    ARTIFACTS.mkdir(exist_ok=True)
    editor.screenshot(ARTIFACTS / f"frontend-{name}.png")
    assert (ARTIFACTS / f"frontend-{name}.png").stat().st_size > 10_000


def declared_inputs(info: dict, inputs: dict) -> dict:
    declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    return {name: value for name, value in inputs.items() if name in declared}
