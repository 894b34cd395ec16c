"""What API clients get from the pack's nodes: over the websocket, no pictures but the real
previews (none when previews are off); the MSI loss curve as a picture on the node (a
temporary file in its history entry, which the editor shows), not as a preview frame."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import websocket

from test_host_foundation import fetch_image
from test_host_msi import msi_graph

pytestmark = pytest.mark.host


def run_listening(client, graph: dict, timeout: float = 300.0) -> tuple[dict, list[str], int]:
    """Queue ``graph`` with a websocket open: (its history entry, the message types, the
    number of binary frames) until the prompt finished."""
    ws = websocket.create_connection(client.websocket_url(), timeout=timeout)
    try:
        prompt_id = client.queue(graph)
        kinds, frames = [], 0
        while True:
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_BINARY:
                frames += 1
                continue
            msg = json.loads(data)
            if msg.get("data", {}).get("prompt_id") not in (None, prompt_id):
                continue
            kinds.append(msg["type"])
            if msg["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                break
    finally:
        ws.close()
    # ComfyUI sends execution_success before it files the prompt in its history.
    deadline = time.monotonic() + 30
    while (entry := client.history(prompt_id)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return entry, kinds, frames


def test_msi_sends_no_picture_over_the_websocket_and_shows_its_loss_curve_on_the_node(comfy_host, astronaut):
    face = comfy_host.upload(np.ascontiguousarray(astronaut[40:232:3, 160:352:3]), "api-clients.png")
    graph = msi_graph([face], steps=1, seed=11)  # its one step was a preview frame
    entry, kinds, frames = run_listening(comfy_host.client, graph)
    assert kinds[-1] == "execution_success" and "progress" in kinds
    assert frames == 0, "the server runs with --preview-method none: no preview frames"
    (record,) = entry["outputs"]["20"]["images"]
    assert record["type"] == "temp"
    curve = fetch_image(comfy_host, record)
    assert curve.shape == (256, 512, 3) and (curve < 250).any()
