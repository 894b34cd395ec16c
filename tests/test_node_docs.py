"""The editor's help: every node has a page (web/docs/<NodeId>.md, which the frontend asks
for) and a section of NODES.md, both generated from docs/nodes/ and what the nodes declare,
so they cannot drift; every input and output has a tooltip and a row in its node's tables;
one category scheme."""
from __future__ import annotations

import re

import pytest
import requests

from diffpriv_client import nodedocs
from diffpriv_client.embedded import PACK_LINK_NAME

pytestmark = pytest.mark.host
GROUPS = ("protect", "keys", "faces", "image", "evaluation")


@pytest.fixture(scope="module")
def object_info(comfy_host):
    return comfy_host.client.object_info()


@pytest.fixture(scope="module")
def nodes(object_info):
    return nodedocs.pack_nodes(object_info)


def test_the_generated_docs_are_up_to_date(object_info):
    files = nodedocs.outputs(object_info)
    stale = [str(path.relative_to(nodedocs.PACK_DIR)) for path, text in files.items()
             if not path.is_file() or path.read_text() != text]
    extra = sorted(set(nodedocs.WEB_DOCS_DIR.glob("*.md")) - set(files))
    assert not stale and not extra, (f"{stale} {extra}: run python -m diffpriv_client.nodedocs --write "
                                     "(edit docs/nodes/, never the generated files)")


def declared(info: dict) -> tuple[list[tuple[str, dict]], list[tuple[str, str | None]]]:
    inputs = [(name, spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
              for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()]
    tooltips = info.get("output_tooltips") or [None] * len(info["output_name"])
    return inputs, list(zip(info["output_name"], tooltips))


def test_every_input_and_output_has_a_tooltip_and_a_row_in_its_docs(nodes):
    missing = []
    for node_id, info in nodes.items():
        rows = {name for cell in re.findall(r"^\| ([\w ,]+?) \|", nodedocs.source(node_id), flags=re.M)
                for name in cell.split(", ")}  # a row may hold several: "model, vae"
        inputs, outputs = declared(info)
        missing += [f"{node_id} input {name}: tooltip" for name, options in inputs if not options.get("tooltip")]
        missing += [f"{node_id} output {name}: tooltip" for name, tip in outputs if not tip]
        missing += [f"{node_id} {name}: no row in docs/nodes/{node_id}.md"
                    for name in [n for n, _ in inputs] + [n for n, _ in outputs] if name not in rows]
    assert not missing, "\n".join(missing)


def test_one_category_scheme_which_the_reference_states(nodes):
    index = (nodedocs.SOURCE_DIR / "index.md").read_text()
    for node_id, info in nodes.items():
        group = info["category"].removeprefix("Diff-Privacy/")
        assert info["category"].startswith("Diff-Privacy/") and group in GROUPS, (node_id, info["category"])
        listed = re.search(rf"^\| {re.escape(info['category'])} \| (.+) \|$", index, flags=re.M)
        assert listed and nodedocs.title(info).split(" (")[0] in listed[1], (node_id, info["category"])


def test_the_server_serves_each_page_where_the_frontend_asks(comfy_host, nodes):
    """The 1.58 frontend asks /extensions/<custom_nodes folder>/docs/<NodeId>.md (its
    NodeHelpService, for nodes whose python_module is custom_nodes.<folder>)."""
    for node_id, info in nodes.items():
        assert info["python_module"] == f"custom_nodes.{PACK_LINK_NAME}"
        page = requests.get(f"{comfy_host.server.url}/extensions/{PACK_LINK_NAME}/docs/{node_id}.md", timeout=10)
        assert page.status_code == 200 and "text/html" not in page.headers["content-type"], node_id
        assert page.text == (nodedocs.WEB_DOCS_DIR / f"{node_id}.md").read_text()
