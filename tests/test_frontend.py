"""The real ComfyUI frontend in headless Chromium, in two releases: the one the host pins
and the newest on PyPI (served with --front-end-root). Each shipped workflow opens as the
template browser opens it (its JSON and thumbnail fetched from the server's template
route), loads with every node known, and the editor turns it into exactly its API-format
twin. Screenshots land in test-artifacts/."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import requests

from cdp import Browser
from conftest import ROOT, Host, start_host
from diffpriv_client.embedded import PACK_LINK_NAME, free_port
from diffpriv_client.workflows import WORKFLOWS_DIR, load_api, workflow_names
from frontends import NEWEST, PINNED, frontend_root, installed_version

pytestmark = pytest.mark.host
ARTIFACTS = ROOT / "test-artifacts"


@dataclass
class Editor:
    host: Host
    browser: Browser
    version: str


@pytest.fixture(scope="module", params=[PINNED, NEWEST])
def editor(request, comfy_host, tmp_path_factory, test_models, face_models):
    server = None
    if request.param == PINNED:
        host, version = comfy_host, installed_version()
    else:
        server = start_host(tmp_path_factory.mktemp("comfy-frontend"), test_models, face_models,
                            ("--disable-metadata", "--front-end-root", str(frontend_root(request.param))))
        host, version = Host(server), request.param
    # A first visit opens the template browser over the canvas; a returning user's does not.
    requests.post(f"{host.server.url}/settings/Comfy.TutorialCompleted", json=True, timeout=10)
    browser = Browser(free_port())
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=host.server.url)
        browser.wait_for("window.app && window.app.graph && window.LiteGraph && true", timeout=120)
        assert browser.evaluate("window.__COMFYUI_FRONTEND_VERSION__") == version
        yield Editor(host, browser, version)
    finally:
        browser.close()
        if server is not None:
            server.stop()


def test_the_workflows_are_in_the_template_browser(comfy_host):
    templates = comfy_host.client.get("/api/workflow_templates")
    assert set(templates[PACK_LINK_NAME]) >= set(workflow_names())


@pytest.mark.parametrize("name", workflow_names())
def test_the_editor_opens_the_template_and_queues_its_api_twin(editor, name):
    ui = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
    opened = editor.browser.evaluate(f"""(async () => {{
        const base = "/api/workflow_templates/{PACK_LINK_NAME}/{name}";
        const template = await fetch(base + ".json");
        const thumbnail = await fetch(base + ".jpg");
        const result = {{template: template.status, thumbnail: thumbnail.status,
                         thumbnail_type: thumbnail.headers.get("content-type")}};
        if (!template.ok) return result;
        const workflow = await template.json();
        await window.app.loadGraphData(workflow);
        const nodes = window.app.graph._nodes;
        const prompt = await window.app.graphToPrompt();
        return {{...result, workflow, count: nodes.length, links: window.app.graph.serialize().links.length,
                 prompt: prompt.output,
                 unknown: nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type)}};
    }})()""")
    assert (opened["template"], opened["thumbnail"], opened["thumbnail_type"]) == (200, 200, "image/jpeg")
    assert opened["workflow"] == ui
    assert opened["unknown"] == []
    assert (opened["count"], opened["links"]) == (len(ui["nodes"]), len(ui["links"]))
    info = editor.host.client.object_info()
    # The editor also queues its display-only widgets (Preview as Text's `preview`), which
    # the server does not declare and ignores: the twin holds what the server takes.
    queued = {node_id: {"class_type": n["class_type"], "inputs": declared_inputs(info[n["class_type"]], n["inputs"]),
                        "title": n["_meta"]["title"]}
              for node_id, n in opened["prompt"].items()}
    twin = {node_id: {"class_type": n["class_type"], "inputs": n["inputs"], "title": n["_meta"]["title"]}
            for node_id, n in load_api(name).items()}
    assert queued == twin
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"frontend-{editor.version}-{name}.png"
    editor.browser.screenshot(shot)
    assert shot.stat().st_size > 10_000


def declared_inputs(info: dict, inputs: dict) -> dict:
    declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    return {name: value for name, value in inputs.items() if name in declared}
