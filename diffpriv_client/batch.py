"""Run one prompt per job over one or more ComfyUI servers and download what each produced.

All jobs are queued up front, at most ``max_in_flight`` per server at a time, each next
one to the server with the shortest queue. A failing prompt is recorded and the rest go
on; the jobs of a server that dies are queued again on the others.

Each job runs in a job of the pack's routes on its server (diffpriv_core/job_protocol.py):
its uploads and outputs in a folder only its token opens, its prompt queued under an id
the command chose. A result is checked before it is trusted: the history entry must hold
the very graph the command queued, from its own client. The command names every file it
writes itself, inside the job's folder: a server's file names only say which files to
fetch, and a name that could point anywhere else fails the job before anything is
written. After each prompt (finished, failed, withdrawn or given up) the job's cleanup
removes what it uploaded and what its prompt wrote, with the prompt's history, unless
asked to keep it; a removal that fails is reported.

A job may hold several photos in one prompt (photos_job, photo_batches): each photo's
part of the result is then checked, written and recorded as its own prompt's would be,
and a photo whose part fails, or all of them when the prompt itself fails, is done again
alone, so that every failure lands on the photo that caused it.
"""
from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import requests
from tqdm import tqdm

from diffpriv_core.files import write_new_file
from diffpriv_core.job_protocol import prompt_digest
from diffpriv_core.key_format import KEY_SUFFIX, KeyFileError, face_crop_summary, read_container

from . import graphs, photo_batches
from .comfy_http import ComfyClient, PackRouteMissing, PromptFailed, PromptRejected, PromptResult, ServerJob
from .pictures import PhotoError, read_photo
from .progress import ProgressBoard, stage_title
from .servers import Executing, Finished, GaveUp, Lost, Progress, Server, choose_server
from .summary import Summary
from .verify import NotProtected, describe

POLL_S = 0.2
REDRAW_S = 1.0  # the progress line is redrawn this often even without news, so its clocks move


@dataclass
class JobSession:
    """One job on one server: where its uploads go and what its graph may name."""

    client: ComfyClient
    job: ServerJob

    @property
    def folder(self) -> str:
        """The job's folder (``diffpriv-jobs/<name>``): its outputs' filename prefixes."""
        return self.job.folder

    def upload_image(self, data: bytes, suffix: str = ".png") -> str:
        return self.client.upload_to_job(self.job, "image", data, suffix)

    def upload_key(self, data: bytes) -> str:
        return self.client.upload_to_job(self.job, "key", data)


@dataclass(eq=False)
class Job:
    name: str  # the output folder DIR/<name>/ and the summary entry
    source: Path
    # Uploads what the job needs into its session's job on the server; returns the
    # filled-in graph (removed from the server afterwards, with the uploads).
    build: Callable[[JobSession], dict]
    # Protect jobs: check(graph, result, pictures, keys) checks what came back before any of
    # it is written and returns the summary's report of it (verify.check_protected).
    check: Callable[..., dict] | None = None
    # A job for several photos in one prompt (photos_job): the jobs of its photos. Its
    # build returns a photo_batches.PhotosPrompt.
    photos: list["Job"] = field(default_factory=list)


@dataclass
class Downloaded:
    outputs: list[Path]
    keys: list[Path]
    report: dict = field(default_factory=dict)  # what the job's check found (summary fields)


@dataclass(frozen=True)
class Cleanup:
    """What is removed from a server after each prompt."""

    keep_files: bool = False  # --keep-on-server: keep uploads, outputs and history


class UnsafeDownload(RuntimeError):
    """The server listed a file the command will not write (a name that could leave the
    output folder, a key file that is not one)."""


class UntrustedResult(RuntimeError):
    """The server's history entry is not the prompt the command queued."""


def photos_job(jobs: list[Job]) -> Job:
    """One job for the photos of ``jobs`` in one prompt (photo_batches): their faces share
    the batches of the stages between Face Crop and Face Paste; each photo's result is its
    own, written and recorded as its job's would be."""
    def build(session: JobSession) -> photo_batches.PhotosPrompt:
        return photo_batches.photos_prompt([job.build(session) for job in jobs])
    return Job(" + ".join(job.name for job in jobs), jobs[0].source, build, photos=list(jobs))


def in_prompts(jobs: list[Job], photos_per_prompt: int) -> list[Job]:
    """``jobs`` in prompts of at most ``photos_per_prompt`` photos each (a lone one stays as it is)."""
    chunks = [jobs[i:i + photos_per_prompt] for i in range(0, len(jobs), max(1, photos_per_prompt))]
    return [chunk[0] if len(chunk) == 1 else photos_job(chunk) for chunk in chunks]


def upload_photo(session: JobSession, path: Path) -> str:
    """Upload the photo as the command sends every photo (pictures.read_photo: upright, 8-bit
    sRGB, none of the file's metadata) into the job's folder, under a new random name the
    server chooses."""
    return session.upload_image(read_photo(path).png(), ".png")


def run_batch(jobs: list[Job], servers: list[Server], summary: Summary, cleanup: Cleanup = Cleanup(),
              seal_key: Callable[[bytes], bytes] | None = None) -> list[str]:
    """Run every job; each result lands in ``summary`` as soon as it is known. ``seal_key``
    is applied to each key file downloaded before it is written (sealing it under the
    passphrase, here). Returns what could not be removed from the servers afterwards
    (empty when all went)."""
    return _Batch(jobs, servers, summary, cleanup, seal_key).run()


class _Batch:
    def __init__(self, jobs: list[Job], servers: list[Server], summary: Summary, cleanup: Cleanup,
                 seal_key: Callable[[bytes], bytes] | None = None):
        self.seal_key = seal_key
        self.pending = deque(jobs)
        self.servers = servers
        self.summary = summary
        self.cleanup = cleanup
        self.cleanup_failures: list[str] = []
        self.submitted: dict[Job, tuple[dict, JobSession]] = {}  # graph and server job, per job on a server
        self.running: dict[Job, Server] = {}
        self.graphs: dict[Job, dict] = {}  # what each running job's server runs: names its stages
        self.prompts: dict[Job, photo_batches.PhotosPrompt] = {}  # jobs of several photos: how each maps in
        self.board = ProgressBoard()
        self.bar = tqdm(total=sum(len(job.photos) or 1 for job in jobs), unit="image", dynamic_ncols=True)
        self.drawn = 0.0

    def run(self) -> list[str]:
        try:
            while self.pending or self.running:
                self._dispatch()
                live = [s for s in self.servers if not s.dead]
                if not live:
                    self._fail_pending("no server left: " + ", ".join(s.url for s in self.servers)
                                       + " stopped answering")
                    break
                for server in live:
                    for event in server.poll(POLL_S / len(live)):
                        self._handle(server, event)
                if time.monotonic() - self.drawn >= REDRAW_S:
                    self._draw()
            return self.cleanup_failures
        except BaseException:
            # Ctrl-C, SIGTERM or a bug: leave no orphans running on the servers, and no
            # uploads, outputs or history of ours; the summary already has what finished.
            for server in self.servers:
                in_flight = dict(server.in_flight)
                server.cancel_all()
                for job in in_flight.values():
                    self._clean(server, job)
            raise
        finally:
            self.bar.set_postfix_str("", refresh=True)  # no finished photo's step left on screen
            self.bar.close()
            for server in self.servers:
                server.close()

    def _dispatch(self) -> None:
        while self.pending:
            server = choose_server(self.servers)
            if server is None:
                return
            job = self.pending.popleft()
            try:
                session = JobSession(server.client, server.client.start_job())
                self.submitted[job] = ({}, session)
                graph = job.build(session)
                if job.photos:
                    self.prompts[job], graph = graph, graph.graph
                self.submitted[job] = (graph, session)
                server.submit(job, graph, session.job)
                self.running[job] = server
                self.graphs[job] = graph
            except PromptRejected as exc:
                self._fail(job, server, f"the server refused the workflow: {exc}")
                self._clean(server, job)
            except requests.ConnectionError:
                self.submitted.pop(job, None)
                self.pending.appendleft(job)
                self._requeue(server, server.give_up().jobs)
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                self._fail(job, server, f"{type(exc).__name__}: {exc}")
                self._clean(server, job)

    def _handle(self, server: Server, event) -> None:
        if isinstance(event, Executing):
            self.board.stage(event.job.name, stage_title(self.graphs.get(event.job, {}), event.node))
            self._draw()
        elif isinstance(event, Progress):
            self.board.step(event.job.name, event.value, event.max)
            self._draw()
        elif isinstance(event, Finished):
            self.board.finished(event.job.name)
            del self.running[event.job]
            self.graphs.pop(event.job, None)
            self._finish(server, event)
            self._draw()
        elif isinstance(event, GaveUp):
            self.board.finished(event.job.name)
            self.running.pop(event.job, None)
            self.graphs.pop(event.job, None)
            self._fail(event.job, server, event.reason)
            self._clean(server, event.job)
        elif isinstance(event, Lost):
            self._requeue(server, event.jobs)

    def _draw(self) -> None:
        self.bar.set_postfix_str(self.board.line(), refresh=True)
        self.drawn = time.monotonic()

    def _finish(self, server: Server, event: Finished) -> None:
        job = event.job
        graph, session = self.submitted[job]
        try:
            check_entry(event.entry, event.prompt_id, graph, server.client.client_id)
            result = ComfyClient.result_of(event.prompt_id, event.entry)
        except PromptFailed as exc:
            self._fail(job, server, exc.message or "the prompt failed")
        except UntrustedResult as exc:
            self._fail(job, server, str(exc))
        else:
            try:
                if job.photos:
                    self._finish_photos(server, event, job, result, session)
                else:
                    self._finish_photo(server, event, job, graph, result, session)
            finally:  # even when recording fails (a full disk): nothing of the job stays on the server
                self._clean(server, job)
            return
        self._clean(server, job)

    def _finish_photo(self, server: Server, event: Finished, job: Job, graph: dict, result: PromptResult,
                      session: JobSession) -> None:
        try:
            files = self._download(server, job, graph, result, session)
        except requests.ConnectionError:
            self.submitted.pop(job, None)
            self.pending.appendleft(job)  # finished, but the server died before we had the files
            return
        except NotProtected as exc:
            self._fail(job, server, str(exc), **exc.report)
            self.bar.write(describe(job.name, self.summary.results[job.name]))
        except (UnsafeDownload, UntrustedResult, KeyFileError, PhotoError, OSError) as exc:
            self._fail(job, server, str(exc))
        else:
            self._record_ok(server, event, job, graph, result, files)

    def _finish_photos(self, server: Server, event: Finished, job: Job, result: PromptResult,
                       session: JobSession) -> None:
        """Each photo of a shared prompt gets its own result (photo_batches.PhotosPrompt),
        checked, written and recorded as its own prompt's would be; a photo whose part
        cannot be had or fails its check is done again alone, so that a failure is its own."""
        prompt = self.prompts.pop(job)
        names = [photo.name for photo in job.photos]
        alone = []
        for k, photo in enumerate(job.photos):
            try:
                own = prompt.photo_result(result, k)
                files = self._download(server, photo, prompt.photos[k], own, session)
            except requests.ConnectionError:
                alone.append(photo)  # the server died before we had its files
                continue
            except (NotProtected, UnsafeDownload, UntrustedResult, KeyFileError, PhotoError, OSError,
                    ValueError) as exc:
                self.bar.write(f"{photo.name}: its part of the prompt it shared failed ({exc}); done again alone")
                alone.append(photo)
                continue
            self._record_ok(server, event, photo, prompt.photos[k], own, files, shared_prompt=names)
        self.pending.extendleft(reversed(alone))

    def _download(self, server: Server, job: Job, graph: dict, result: PromptResult,
                  session: JobSession) -> Downloaded:
        return download(server.client, result, self.summary.out_dir / job.name, graphs.output_labels(graph),
                        session.job, self.seal_key, expect_keys=bool(graphs.nodes_of(graph, "DiffPrivacySaveKey")),
                        check=partial(job.check, graph) if job.check else None)

    def _record_ok(self, server: Server, event: Finished, job: Job, graph: dict, result: PromptResult,
                   files: Downloaded, shared_prompt: list[str] | None = None) -> None:
        """``shared_prompt``: every photo of the prompt, when it held several: its seconds and
        its shared stages' calls are the whole prompt's, counted once for all of them."""
        self.summary.record(job.name, job.source, "ok", files.outputs, files.keys,
                            seconds=prompt_seconds(event.entry), server=server.url,
                            identity=identity_of(result), passes=passes_of(result, graph),
                            calls=calls_of(result, graph), ablations=graphs.ablations(graph),
                            shared_prompt=shared_prompt, **files.report)
        if job.check:
            self.bar.write(describe(job.name, self.summary.results[job.name]))
        self.bar.update(1)

    def _clean(self, server: Server, job: Job) -> None:
        """Remove what the job made on the server (its uploads, its prompt's outputs and
        history) unless ``cleanup`` keeps it; a removal that fails is reported."""
        _graph, session = self.submitted.pop(job, ({}, None))
        if session is None or self.cleanup.keep_files:
            return
        try:
            problems = server.client.cleanup_job(session.job)["failed"]
        except (requests.RequestException, PackRouteMissing, ValueError, KeyError) as exc:
            problems = [str(exc)]
        for problem in problems:
            message = f"{job.name}: could not remove from {server.url}: {problem}"
            self.cleanup_failures.append(message)
            self.bar.write(message)

    def _requeue(self, server: Server, jobs: list[Job]) -> None:
        for job in jobs:
            self.running.pop(job, None)
            self.graphs.pop(job, None)
            self.board.forget(job.name)
            self.pending.appendleft(job)
        self.bar.write(f"{server.url} stopped answering; {len(jobs)} unfinished job(s) go to the other servers")

    def _fail_pending(self, message: str) -> None:
        while self.pending:
            self._fail(self.pending.popleft(), None, message)

    def _fail(self, job: Job, server: Server | None, message: str, **report) -> None:
        """``report``: what the job's check found of the photo (summary fields). A prompt of
        several photos that fails is not their failure: each is done again alone, so a
        failure lands on the photo that caused it."""
        if job.photos:
            self.prompts.pop(job, None)
            self.bar.write(f"{job.name}: the prompt they shared failed ({message.splitlines()[0] if message else ''}); "
                           "each photo is done again alone")
            self.pending.extendleft(reversed(job.photos))
            return
        self.summary.record(job.name, job.source, "failed", server=server.url if server else None, error=message,
                            **report)
        self.bar.write(f"{job.name}: failed: {message}")
        self.bar.update(1)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_entry(entry: dict, prompt_id: str, graph: dict, client_id: str) -> None:
    """Refuse a history entry that is not the prompt the command queued: another id, graph
    or client (another client may queue any graph under an id it saw)."""
    prompt = entry.get("prompt")
    ours = (isinstance(prompt, list) and len(prompt) > 3 and prompt[1] == prompt_id and isinstance(prompt[2], dict)
            and prompt_digest(prompt[2]) == prompt_digest(graph) and isinstance(prompt[3], dict)
            and prompt[3].get("client_id") == client_id)
    if not ours:
        raise UntrustedResult(f"the server's history entry for prompt {prompt_id} is not the prompt this command "
                              "queued (another graph, or another client's, under its id): its result is not used and "
                              "nothing of this job was written")


def download(client: ComfyClient, result: PromptResult, folder: Path, labels: dict[str, str],
             job: ServerJob | None = None, seal_key: Callable[[bytes], bytes] | None = None,
             expect_keys: bool = False, check: Callable[..., dict] | None = None) -> Downloaded:
    """The saved pictures ('images') and key files ('diffprivacy_keys') of the nodes in
    ``labels``, written as new owner-only files named ``<label>_00001_.png`` and
    ``<label>[_face<N>]_00001.dpkey.safetensors`` in ``folder``; ``job``: the server job
    whose files they are; ``seal_key``: applied to each key file before it is written;
    ``expect_keys``: the workflow saves keys, so a result without one is refused.

    Every record is checked and every file fetched before anything is written: an unsafe
    record or a damaged key raises UnsafeDownload and writes nothing, and so does a result
    with no key from a workflow that saves keys, and whatever ``check(result, pictures,
    keys)`` raises (pictures: (node id, bytes); keys: as the server sent them); what it
    returns is the download's report. Previews (type 'temp') are skipped.
    """
    fetched, pictures, sent_keys = [], [], []
    for node_id, label in labels.items():
        for kind in ("images", "diffprivacy_keys"):
            for record in result.files(node_id, kind):
                check_record(record)
                if record.get("type") == "output":
                    data = client.view(record, job)
                    (pictures if kind == "images" else sent_keys).append((node_id, data))
                    if kind == "diffprivacy_keys" and seal_key is not None:
                        data = seal_key(data)
                    fetched.append((kind, safe_label(label), record, data))
    if expect_keys and not any(kind == "diffprivacy_keys" for kind, *_ in fetched):
        raise UnsafeDownload("the server's result holds no key file, though the workflow saves keys: without one "
                             "the protected picture could never be undone, so nothing of this job was written")
    named = [(kind, *file_name(kind, label, record, data), data) for kind, label, record, data in fetched]
    report = check(result, pictures, [data for _, data in sent_keys]) if check else {}
    folder.mkdir(parents=True, exist_ok=True)
    got = Downloaded([], [], report)
    for kind, stem, tail, data in named:
        (got.keys if kind == "diffprivacy_keys" else got.outputs).append(write_numbered(folder, stem, tail, data))
    return got


def identity_of(result: PromptResult) -> list[dict]:
    """What the Guided DDIM Sampler, or an Identity Similarity node, reported of each image
    (their ``identity_similarity``); a server's answer is checked, not trusted, as in passes_of."""
    return [entry for output in result.outputs.values() if isinstance(output, dict)
            for entry in output.get("identity_similarity") or [] if isinstance(entry, dict)]


# Stock nodes in the pack's workflows and the pass each makes per latent or picture.
STOCK_PASSES = {"VAEEncode": ("VAE Encode", "pixels", "vae_encode"),
                "VAEDecode": ("VAE Decode", "samples", "vae_decode_forward")}
REPORT_DETAILS = ("candidates", "decode_region", "decoded")  # what a node says of a face besides its counts


def passes_of(result: PromptResult, graph: dict) -> list[dict]:
    """The network passes each face cost, stage by stage: what the pack's nodes reported
    (their ``passes``) per image of the batch they ran (a face crop, or the one photo of a
    whole-image run), plus one pass per picture or latent of the stock VAE Encode and VAE
    Decode nodes in ``graph`` (a latent of the Guided DDIM Sampler holds its candidates)."""
    reports = {node_id: [e for e in output.get("passes", []) if _is_report(e)] if isinstance(output, dict) else []
               for node_id, output in result.outputs.items()}
    faces: dict[int, dict[str, dict]] = {}
    for entries in reports.values():
        for entry in entries:
            stage = faces.setdefault(entry["image"], {}).setdefault(entry["stage"], {"passes": {}})
            stage["passes"] = _added(stage["passes"], entry["passes"])
            stage.update({k: entry[k] for k in REPORT_DETAILS if k in entry})
    for node in graph.values():
        if node.get("class_type") not in STOCK_PASSES:
            continue
        name, source_input, pass_name = STOCK_PASSES[node["class_type"]]
        source = node.get("inputs", {}).get(source_input)
        per_face = {e["image"]: e.get("candidates", 1) for e in reports.get(str(source[0]), [])} \
            if isinstance(source, list) else {}
        for index, stages in faces.items():
            stage = stages.setdefault(name, {"passes": {}})
            stage["passes"] = _added(stage["passes"], {pass_name: per_face.get(index, 1)})
    return [{"face": index, "total": _added(*(s["passes"] for s in stages.values())), "stages": stages}
            for index, stages in sorted(faces.items())]


def calls_of(result: PromptResult, graph: dict) -> dict:
    """The network calls the photo took one after another, stage by stage and in total:
    what the pack's nodes reported of each batch they ran (the faces a batch held share its
    calls, counted once), plus one call of each stock VAE Encode and VAE Decode node in
    ``graph`` (a node encodes or decodes its whole batch at once)."""
    stages: dict[str, dict] = {}
    seen = set()
    for node_id, output in result.outputs.items():
        entries = output.get("passes", []) if isinstance(output, dict) else []
        for entry in entries if isinstance(entries, list) else []:
            if not (_is_report(entry) and _is_counts(entry.get("calls")) and isinstance(entry.get("batch"), list)
                    and all(type(i) is int for i in entry["batch"])):
                continue
            run = (node_id, entry["stage"], tuple(entry["batch"]))
            if run not in seen:
                seen.add(run)
                stages[entry["stage"]] = _added(stages.get(entry["stage"], {}), entry["calls"])
    for node in graph.values():
        if node.get("class_type") in STOCK_PASSES:
            name, _source, pass_name = STOCK_PASSES[node["class_type"]]
            stages[name] = _added(stages.get(name, {}), {pass_name: 1})
    return {"total": _added(*stages.values()), "stages": stages}


def _is_counts(counts) -> bool:
    return isinstance(counts, dict) and all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in counts.items())


def _is_report(entry) -> bool:
    """A pass report as the pack's nodes write it (a server's answer is checked, not trusted)."""
    return (isinstance(entry, dict) and type(entry.get("image")) is int and isinstance(entry.get("stage"), str)
            and _is_counts(entry.get("passes")) and type(entry.get("candidates", 1)) is int)


def _added(*counts: dict) -> dict:
    total: dict[str, int] = {}
    for count in counts:
        for name, n in count.items():
            total[name] = total.get(name, 0) + n
    return total


def check_record(record) -> None:
    """Refuse a file record whose name or folder could point outside where it belongs."""
    if not isinstance(record, dict):
        raise UnsafeDownload(f"the server listed a malformed file record {record!r}: nothing of this job was written")
    name, sub = record.get("filename"), record.get("subfolder", "")
    plain_name = isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
    plain_sub = isinstance(sub, str) and not sub.startswith("/") and not any(c in sub for c in "\\\0") \
        and ".." not in Path(sub).parts
    if not (plain_name and plain_sub):
        raise UnsafeDownload(f"the server listed an unsafe file name {name!r} in folder {sub!r}: nothing of this job "
                             "was written (the command names its files itself and never follows a server's path)")


def safe_label(label: str) -> str:
    return re.sub(r"[^\w.-]", "_", label).lstrip(".") or "output"


def file_name(kind: str, label: str, record: dict, data: bytes) -> tuple[str, str]:
    """(stem, tail) of a downloaded file's name; key files are checked and named by their face."""
    if kind != "diffprivacy_keys":
        suffix = Path(record["filename"]).suffix.lower()
        return label, f"_{suffix if suffix in IMAGE_SUFFIXES else '.png'}"
    try:
        face = face_crop_summary(read_container(data).meta)
    except KeyFileError as exc:
        raise UnsafeDownload(f"the server sent a key file that is not a valid key ({exc}): nothing of this job was "
                             "written") from None
    return (f"{label}_face{face['face']}" if face else label), KEY_SUFFIX


def rewrite_named(folder: Path, name: str, data: bytes) -> Path:
    """Write again, in ``folder``, a file named ``stem_00001<tail>`` by download (a Ray
    actor's download, sent to the driver): the next free number there, nothing replaced."""
    stem, tail = re.fullmatch(r"(.*)_\d{5}(_\.\w+|\.dpkey\.safetensors)", name).groups()
    return write_numbered(folder, stem, tail, data)


def write_numbered(folder: Path, stem: str, tail: str, data: bytes) -> Path:
    """A new owner-only file ``stem_00001<tail>`` (the next free number; nothing replaced),
    in ``folder`` itself: a link planted at the folder's name is refused, never followed."""
    if folder.is_symlink() or not folder.is_dir():
        raise UnsafeDownload(f"{folder} is a link or not a folder: nothing of this job was written there")
    number = 1
    while True:
        try:
            return write_new_file(folder / f"{stem}_{number:05d}{tail}", data, 0o600)
        except FileExistsError:
            number += 1


def prompt_seconds(entry: dict) -> float | None:
    """Time the server spent on the prompt (execution_start to its end), not time in the queue."""
    stamps = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])}
    start = stamps.get("execution_start")
    end = next((stamps[k] for k in ("execution_success", "execution_error", "execution_interrupted")
                if stamps.get(k) is not None), None)
    return None if start is None or end is None else (end - start) / 1000.0
