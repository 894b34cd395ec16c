"""API-format <-> UI-format workflows.

ComfyUI's editor loads the UI format (nodes with positions, widget values by position,
links); ``/prompt`` takes the API format (inputs by name). Only the frontend converts
between them, so the pack ships both: the API files in ``example_workflows/api/`` are the
source, and the UI files in ``example_workflows/`` (the folder ComfyUI's template browser
serves) are generated from them with the server's ``/object_info`` (which says which
inputs are widgets and in what order):

    python -m diffpriv_client.workflows --regenerate      # starts the embedded ComfyUI
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "example_workflows"
LINK_TYPES_ARE_WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH, NODE_WIDTH, SLOT_HEIGHT, GAP = 380, 340, 24, 40
# The model files the workflows name that users get themselves: their folder and where to get
# them, as the editor's missing-models panel reads them (a node's properties.models). The face
# recognisers are not here: install.py installs them.
MODEL_FILES = {
    "v1-5-pruned-emaonly.safetensors": (
        "checkpoints", "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
                       "v1-5-pruned-emaonly.safetensors"),
    "clip_vit_large_patch14.safetensors": (
        "clip_vision", "https://huggingface.co/openai/clip-vit-large-patch14/resolve/main/model.safetensors"),
}


def _inputs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node's inputs in the editor's order."""
    out = []
    for section in ("required", "optional"):
        spec = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(spec)):
            kind = spec[name][0]
            options = spec[name][1] if len(spec[name]) > 1 and isinstance(spec[name][1], dict) else {}
            out.append((name, kind, options))
    return out


def is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in LINK_TYPES_ARE_WIDGETS


def has_control_widget(kind, options: dict) -> bool:
    """The editor adds a 'control after generate' value after seed-like INT widgets."""
    return kind == "INT" and bool(options.get("control_after_generate"))


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            links = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(str(src)) for src in links), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def api_to_ui(api: dict, object_info: dict) -> dict:
    """A UI-format workflow with the same graph, laid out left to right by depth."""
    depths = _depths(api)
    column_bottom: dict[int, int] = {}
    nodes, links = {}, []
    for order, node_id in enumerate(sorted(api, key=lambda n: (depths[n], int(n)))):
        spec = api[node_id]
        info = object_info[spec["class_type"]]
        column = depths[node_id]
        node = {
            "id": int(node_id), "type": spec["class_type"], "pos": [column * COLUMN_WIDTH, column_bottom.get(column, 0)],
            "size": [NODE_WIDTH, 0], "flags": {}, "order": order, "mode": 0, "inputs": [],
            "outputs": [{"name": name, "type": kind, "links": [], "slot_index": i}
                        for i, (name, kind) in enumerate(zip(info["output_name"], info["output"]))],
            "properties": {"Node name for S&R": spec["class_type"]}, "widgets_values": [],
        }
        if spec.get("_meta", {}).get("title"):
            node["title"] = spec["_meta"]["title"]
        models = [{"name": value, "url": MODEL_FILES[value][1], "directory": MODEL_FILES[value][0]}
                  for value in spec["inputs"].values() if isinstance(value, str) and value in MODEL_FILES]
        if models:
            node["properties"]["models"] = models
        inputs = _inputs(info)
        for name, kind, options in inputs:
            value = spec["inputs"].get(name)
            if is_widget(kind) and not isinstance(value, list):
                node["widgets_values"].append(value)
                if has_control_widget(kind, options):
                    node["widgets_values"].append("fixed")
            elif not is_widget(kind):
                node["inputs"].append({"name": name, "type": kind, "link": None})
        # Tall enough for its sockets and widgets, stacked under the column's previous node.
        rows = max(len(node["inputs"]), len(node["outputs"])) + len(node["widgets_values"])
        node["size"][1] = SLOT_HEIGHT * (rows + 1)
        column_bottom[column] = node["pos"][1] + node["size"][1] + GAP
        nodes[node_id] = node
    link_id = 0
    for node_id, spec in api.items():
        for name, value in spec["inputs"].items():
            if not isinstance(value, list):
                continue
            link_id += 1
            src, slot = str(value[0]), int(value[1])
            target = nodes[node_id]
            target_slot = next(i for i, s in enumerate(target["inputs"]) if s["name"] == name)
            target["inputs"][target_slot]["link"] = link_id
            kind = nodes[src]["outputs"][slot]["type"]
            nodes[src]["outputs"][slot]["links"].append(link_id)
            links.append([link_id, int(src), slot, int(node_id), target_slot, kind])
    return {"last_node_id": max(int(n) for n in api), "last_link_id": link_id,
            "nodes": sorted(nodes.values(), key=lambda n: n["id"]), "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API-format graph a UI-format workflow describes (what the editor would queue)."""
    sources = {link[0]: (str(link[1]), link[2]) for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        inputs: dict = {}
        values = iter(node.get("widgets_values", []))
        linked = {s["name"]: s["link"] for s in node.get("inputs", [])}
        for name, kind, options in _inputs(info):
            if linked.get(name) is not None:
                src, slot = sources[linked[name]]
                inputs[name] = [src, slot]
            elif is_widget(kind):
                inputs[name] = next(values)
                if has_control_widget(kind, options):
                    next(values)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            api[str(node["id"])]["_meta"] = {"title": node["title"]}
    return api


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / "api" / f"{name}.json").read_text())


def workflow_names() -> list[str]:
    return sorted(p.stem for p in (WORKFLOWS_DIR / "api").glob("*.json"))


def regenerate(object_info: dict) -> list[Path]:
    """Write example_workflows/<name>.json (UI format) and its thumbnail for every API workflow."""
    from .thumbnails import draw_thumbnail

    written = []
    for name in workflow_names():
        ui = api_to_ui(load_api(name), object_info)
        path = WORKFLOWS_DIR / f"{name}.json"
        path.write_text(json.dumps(ui, indent=1) + "\n")
        draw_thumbnail(ui, WORKFLOWS_DIR / f"{name}.jpg")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regenerate", action="store_true", help="rewrite the UI workflows from example_workflows/api")
    args = parser.parse_args(argv)
    if not args.regenerate:
        parser.print_help()
        return
    for path in regenerate(embedded_object_info()):
        print(f"wrote {path}")


def embedded_object_info() -> dict:
    """What the embedded ComfyUI, with this pack, declares of every node (/object_info)."""
    import tempfile

    from .embedded import EmbeddedComfy, prepare_base_directory

    with tempfile.TemporaryDirectory() as tmp, EmbeddedComfy(prepare_base_directory(Path(tmp))) as server:
        return server.client().object_info()


if __name__ == "__main__":
    main()
