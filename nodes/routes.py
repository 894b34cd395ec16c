"""The pack's HTTP routes, under /diffprivacy/ (added to ComfyUI's route table, as packs do).

What the `diffpriv` command needs and ComfyUI's API lacks:

- ``POST /diffprivacy/keys`` (multipart field ``key``): store a key file in
  ``models/diffprivacy_keys/diffpriv-cli/`` under a new name the server chooses, owner-only;
  answers ``{"key_name": ...}`` for Load Privacy Key. The bytes must be a key file's
  container (checked before anything is written).
- ``POST /diffprivacy/cleanup`` (JSON ``{"prompt_id", "outputs", "inputs"}``): remove the
  named uploads (only the command's own: ``input/diffpriv/...`` pictures and
  ``diffpriv-cli/...`` keys), the files the prompt wrote when ``outputs`` is true, and
  the prompt's history entry (waiting for a cancelled prompt to leave the queue). Answers
  what was removed and what could not be.
"""
from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import folder_paths
from aiohttp import web

from diffpriv_core.files import write_new_file
from diffpriv_core.key_format import KEY_SUFFIX, MAX_FILE_BYTES, KeyFileError, read_container

from .keyfiles import KEYS_FOLDER, keys_dir

UPLOAD_SUBFOLDER = "diffpriv"  # input/diffpriv/: pictures the command uploads
KEY_UPLOAD_SUBFOLDER = "diffpriv-cli"  # models/diffprivacy_keys/diffpriv-cli/: keys it uploads
QUEUE_WAIT_S = 30.0  # how long cleanup waits for a cancelled prompt to leave the queue


def register(server) -> None:
    routes = server.routes

    @routes.post("/diffprivacy/keys")
    async def upload_key(request: web.Request) -> web.Response:
        field = (await request.post()).get("key")
        if not isinstance(field, web.FileField):
            return web.json_response({"error": "send the key file as the multipart field 'key'"}, status=400)
        data = field.file.read(MAX_FILE_BYTES + 1)
        try:
            read_container(data)
        except KeyFileError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        folder = Path(keys_dir()) / KEY_UPLOAD_SUBFOLDER
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{secrets.token_hex(12)}{KEY_SUFFIX}"
        write_new_file(folder / name, data)
        return web.json_response({"key_name": f"{KEY_UPLOAD_SUBFOLDER}/{name}"})

    @routes.post("/diffprivacy/cleanup")
    async def cleanup(request: web.Request) -> web.Response:
        body = await request.json()
        prompt_id, inputs = body.get("prompt_id"), body.get("inputs", [])
        if not (prompt_id is None or isinstance(prompt_id, str)) or not isinstance(inputs, list):
            return web.json_response({"error": "prompt_id must be a string, inputs a list of names"}, status=400)
        paths = [upload_path(name) for name in inputs]
        if prompt_id is not None:
            await wait_until_not_queued(server.prompt_queue, prompt_id)
            entry = server.prompt_queue.get_history(prompt_id=prompt_id).get(prompt_id)
            if entry is not None and body.get("outputs", True):
                paths += output_paths(entry)
            server.prompt_queue.delete_history_item(prompt_id)
        removed, failed = [], []
        for path in paths:
            if path is None:
                failed.append("a name outside the command's upload folders (not removed)")
                continue
            try:
                path.unlink()
                removed.append(path.name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed.append(f"{path.name}: {exc.strerror}")
        return web.json_response({"removed": removed, "failed": failed})


async def wait_until_not_queued(queue, prompt_id: str) -> None:
    deadline = asyncio.get_running_loop().time() + QUEUE_WAIT_S
    while asyncio.get_running_loop().time() < deadline:
        running, pending = queue.get_current_queue_volatile()
        if not any(item[1] == prompt_id for item in (*running, *pending)):
            return
        await asyncio.sleep(0.1)


def _inside(root: str, *parts: str) -> Path | None:
    """``root/parts``, or None when the parts are not plain names leading inside root."""
    if not all(isinstance(p, str) for p in parts):
        return None
    base = Path(root).resolve()
    path = Path(os.path.normpath(os.path.join(base, *parts)))
    if any(p.startswith("/") or "\\" in p or "\x00" in p or ".." in Path(p).parts for p in parts) \
            or base not in path.parents:
        return None
    return path


def upload_path(name) -> Path | None:
    """Where an upload of the command lies: input/diffpriv/<name> or the keys folder's
    diffpriv-cli/<name>; None for anything else (never removed)."""
    if not isinstance(name, str):
        return None
    if name.startswith(f"{UPLOAD_SUBFOLDER}/"):
        return _inside(folder_paths.get_input_directory(), name)
    if name.startswith(f"{KEY_UPLOAD_SUBFOLDER}/"):
        return _inside(keys_dir(), name)
    return None


def output_paths(entry: dict) -> list[Path | None]:
    """The files a finished prompt reported writing (pictures, previews, keys)."""
    roots = {"output": folder_paths.get_output_directory(), "temp": folder_paths.get_temp_directory(),
             KEYS_FOLDER: keys_dir()}
    paths = []
    for node_output in (entry.get("outputs") or {}).values():
        for records in node_output.values():
            for record in records if isinstance(records, list) else []:
                if isinstance(record, dict) and record.get("type") in roots:
                    paths.append(_inside(roots[record["type"]], record.get("subfolder", ""), record.get("filename")))
    return paths
