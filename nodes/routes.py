"""The pack's HTTP routes, under /diffprivacy/, and its guard over the server it loads into.

What the `diffpriv` command needs and ComfyUI's API lacks (diffpriv_core/job_protocol.py):

- ``POST /diffprivacy/jobs`` (JSON ``{"client_id"}``): a new job; answers ``{"job": token,
  "folder": "diffpriv-jobs/<name>"}``. The token is the job's capability: whoever holds it
  may use the job's files and remove them, nobody else.
- ``POST /diffprivacy/jobs/upload`` (header ``X-DiffPrivacy-Job``; multipart field
  ``image`` or ``key``): store a picture in ``input/diffpriv-jobs/<name>/`` or a key file
  (checked to be a key file's container first) in the key folder's
  ``diffpriv-jobs/<name>/``, under a new name the server chooses, owner-only; answers
  ``{"name"}`` for Load Image or Load Privacy Key.
- ``POST /diffprivacy/cleanup`` (header ``X-DiffPrivacy-Job``): remove the job's folders,
  the previews its prompts reported and their history entries (waiting for a withdrawn
  prompt to leave the queue), then forget the job. Answers ``{"removed", "failed"}``.

The guard (an aiohttp middleware) makes every request that names a job's folder (a
``/view`` of its files, an upload into it, a prompt reading from or writing into it)
carry that job's token, and so must a websocket that takes the session of a job's client
id (its progress and file names); refuses a prompt id that is already queued or in the history (a
client cannot queue another graph under the command's id); records which prompts a job
queued, and strips the token from the prompt before ComfyUI stores it. When the server
was started with DIFFPRIV_SERVER_TOKEN (the command's embedded ComfyUI is), every request
must carry that token too, or gets 401.
"""
from __future__ import annotations

import hmac
import json
import os
import secrets
from urllib.parse import unquote

from aiohttp import web

from diffpriv_core.files import write_new_file
from diffpriv_core.job_protocol import (JOB_EXTRA, JOB_HEADER, JOBS_FOLDER, TOKEN_COOKIE, TOKEN_ENV,
                                        job_folders_named, prompt_digest)
from diffpriv_core.key_format import KEY_SUFFIX, MAX_FILE_BYTES, KeyFileError, read_container

from .jobs import JOBS, MAX_UPLOAD_BYTES, MAX_UPLOADS_PER_JOB, clean, job_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_PROMPT_ID = 128


def register(server) -> None:
    routes = server.routes
    server.app.middlewares.append(guard_middleware(server, os.environ.get(TOKEN_ENV) or None))
    server.add_on_prompt_handler(strip_job_token)

    @routes.post("/diffprivacy/jobs")
    async def create_job(request: web.Request) -> web.Response:
        body, error = await _json_body(request, allow_empty=True)
        if error:
            return error
        client_id = body.get("client_id")
        if client_id is not None and not (isinstance(client_id, str) and 0 < len(client_id) <= 128):
            return _error(400, "client_id must be a short string")
        token, job = JOBS.create(client_id)
        return web.json_response({"job": token, "folder": f"{JOBS_FOLDER}/{job.folder}"})

    @routes.post("/diffprivacy/jobs/upload")
    async def upload(request: web.Request) -> web.Response:
        job = JOBS.get(request.headers.get(JOB_HEADER))
        if job is None:
            return _error(403, f"an upload needs the {JOB_HEADER} header of a job of this server "
                               "(POST /diffprivacy/jobs)")
        try:
            form = await request.post()
        except Exception as exc:  # noqa: BLE001 - aiohttp raises several kinds for a bad body
            return _error(400, f"the body is not a readable multipart form ({type(exc).__name__})")
        fields = [(kind, form.get(kind)) for kind in ("image", "key") if isinstance(form.get(kind), web.FileField)]
        if len(fields) != 1:
            return _error(400, "send one file, as the multipart field 'image' (a picture) or 'key' (a key file)")
        kind, file_field = fields[0]
        data = file_field.file.read(MAX_FILE_BYTES + 1)
        if len(job.uploads) >= MAX_UPLOADS_PER_JOB:
            return _error(413, f"a job holds at most {MAX_UPLOADS_PER_JOB} uploads")
        if JOBS.held_bytes() + len(data) > MAX_UPLOAD_BYTES:
            return _error(507, "the server holds too many uploads of running jobs: try again later")
        if kind == "key":
            try:
                read_container(data)
            except KeyFileError as exc:
                return _error(400, str(exc))
            name = f"{secrets.token_hex(12)}{KEY_SUFFIX}"
        else:
            suffix = os.path.splitext(file_field.filename or "")[1].lower()
            name = f"{secrets.token_hex(12)}{suffix if suffix in IMAGE_SUFFIXES else '.png'}"
        path = write_new_file(job_path(job, "keys" if kind == "key" else "input", name), data)
        job.uploads.append(path)
        job.upload_bytes += len(data)
        return web.json_response({"name": f"{JOBS_FOLDER}/{job.folder}/{name}"})

    @routes.post("/diffprivacy/cleanup")
    async def cleanup(request: web.Request) -> web.Response:
        token = request.headers.get(JOB_HEADER)
        job = JOBS.get(token)
        if job is None:
            return _error(403, f"cleanup needs the {JOB_HEADER} header of a job of this server: it removes only "
                               "what that job made (an unknown job: the server restarted, or the job was cleaned)")
        removed, failed = await clean(server, job)
        JOBS.forget(token)
        return web.json_response({"removed": removed, "failed": failed})


def strip_job_token(json_data):
    """ComfyUI's on_prompt hook: the job token never reaches the queue or the history."""
    extra = json_data.get("extra_data") if isinstance(json_data, dict) else None
    if isinstance(extra, dict):
        extra.pop(JOB_EXTRA, None)
    return json_data


# --- the guard -----------------------------------------------------------------------
def guard_middleware(server, server_token: str | None):
    @web.middleware
    async def guard(request: web.Request, handler):
        if server_token is not None and not _carries_server_token(request, server_token):
            if request.method == "GET" and request.query.get(TOKEN_COOKIE) == server_token:
                return _token_cookie(request, server_token)
            return _error(401, "this ComfyUI answers only the diffpriv command that started it")
        path = request.path[4:] if request.path.startswith("/api/") else request.path
        token = request.headers.get(JOB_HEADER)
        if path == "/prompt" and request.method == "POST":
            return await _guard_prompt(server, request, handler)
        if path == "/ws" and JOBS.client_is_a_jobs(request.query.get("clientId", "")):
            job = JOBS.get(token)
            if job is None or job.client_id != request.query.get("clientId"):
                return _error(403, "that websocket session belongs to the diffpriv command's jobs")
        named = job_folders_named(unquote(request.path)) | job_folders_named(list(request.query.values()))
        if request.method == "POST" and path in ("/upload/image", "/upload/mask"):
            try:
                form = await request.post()
            except Exception:  # noqa: BLE001
                return _error(400, "the body is not a readable multipart form")
            named |= job_folders_named([v for v in form.values() if isinstance(v, str)])
            named |= job_folders_named([v.filename for v in form.values() if isinstance(v, web.FileField)])
        if named - {JOBS.folder_of(token)}:
            return _error(403, "these files belong to a job of the diffpriv command: only that job may use them")
        if request.method == "POST" and path == "/history":
            body, error = await _json_body(request, allow_empty=True)
            if error:
                return error
            if _deletes_job_history(body, token):
                return _error(403, "that history entry belongs to a job of the diffpriv command: its cleanup "
                                   "removes it")
        return await handler(request)

    return guard


def _carries_server_token(request: web.Request, token: str) -> bool:
    given = request.headers.get("Authorization", "")
    given = given[len("Bearer "):] if given.startswith("Bearer ") else request.cookies.get(TOKEN_COOKIE, "")
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode())


def _token_cookie(request: web.Request, token: str) -> web.Response:
    """A browser opening /?diffpriv_token=TOKEN gets the token as a cookie, and the page."""
    response = web.Response(status=302, headers={"Location": request.path})
    response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
    return response


async def _guard_prompt(server, request: web.Request, handler):
    body, error = await _json_body(request)
    if error:
        return error
    extra = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
    token = extra.get(JOB_EXTRA)
    job = JOBS.get(token) if token is not None else None
    if token is not None and job is None:
        return _error(403, "the prompt names a job this server does not know (restarted, or cleaned)")
    if job_folders_named(body.get("prompt")) - {job.folder if job else None}:
        return _error(403, "the prompt uses files of a job of the diffpriv command: only that job may")
    prompt_id = body.get("prompt_id")
    if prompt_id is None:
        if job is not None:
            return _error(400, "a job's prompt must carry its own prompt_id")
        return await handler(request)
    if not isinstance(prompt_id, str) or not 0 < len(prompt_id) <= MAX_PROMPT_ID:
        return _error(400, f"prompt_id must be a string of 1 to {MAX_PROMPT_ID} characters")
    if not JOBS.claim(server.prompt_queue, prompt_id):
        return _error(400, f"prompt id {prompt_id} is already in use on this server: choose a new one")
    try:
        response = await handler(request)
        if job is not None and response.status == 200:
            job.prompts[prompt_id] = prompt_digest(body.get("prompt"))
        return response
    finally:
        JOBS.release(prompt_id)


def _deletes_job_history(body: dict, token) -> bool:
    own = JOBS.get(token)
    ids = body.get("delete") if isinstance(body.get("delete"), list) else []
    return any(JOBS.owner_of(i) not in (None, own) for i in ids if isinstance(i, str))


async def _json_body(request: web.Request, allow_empty: bool = False) -> tuple[dict, web.Response | None]:
    raw = await request.read()
    if not raw.strip() and allow_empty:
        return {}, None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return {}, _error(400, "the body is not JSON")
    if not isinstance(body, dict):
        return {}, _error(400, "the body must be a JSON object")
    return body, None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
