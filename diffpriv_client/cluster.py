"""A batch on a Ray cluster: `diffpriv protect|recover ... --ray [ADDRESS]`.

Each actor owns one embedded ComfyUI with the pack, on one GPU (on the CPU where the
cluster has none), started once and used for many photos. The driver sends one photo's
bytes at a time to each idle actor; the actor runs it through its own server exactly as
the command does on one machine (the command's jobs, run_batch, its downloads) and sends
the files back. The driver alone writes --out and summary.json, so a rerun resumes as
without Ray. A photo whose actor dies goes to another actor, at most MAX_ATTEMPTS times.

Ray is imported here only, and this module only when --ray is given.
"""
from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from pathlib import Path

from tqdm import tqdm

from diffpriv_core.files import write_new_file
from diffpriv_core.job_protocol import JOBS_FOLDER
from diffpriv_core.key_format import KEY_SUFFIX, KeyFileError

from . import cli
from .batch import rewrite_named, run_batch
from .preflight import PreflightError
from .summary import Summary

# Tries per photo whose actor died under it (node lost, ComfyUI crashed, out of memory).
MAX_ATTEMPTS = 3
# How long actors may take to be placed on the cluster and start their ComfyUI.
START_TIMEOUT_S = 900.0
# How long stopping actors (and their ComfyUI servers) may take before they are killed.
STOP_TIMEOUT_S = 60.0
POLL_S = 1.0


class ServerLost(RuntimeError):
    """The actor's ComfyUI stopped answering: the photo goes to another actor."""


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise cli.UsageError("--ray needs Ray on this machine and every node: "
                             'pip install "comfyui-diffprivacy[ray]" (or pip install ray)') from exc
    return ray


# --- the actor -----------------------------------------------------------------------
class ComfyActor:
    """One embedded ComfyUI on one node, run by a Ray actor (see start_actors)."""

    def __init__(self, args, template: dict, secrets, make_jobs, photo: tuple[str, bytes] | None):
        import ray

        self.args = args  # the actor's own copy: start() points its paths at this node
        self.template = template
        self.secrets = secrets  # cli.KeySecrets: for protect, the recipient only
        self.make_jobs = make_jobs
        self.photo = photo
        self.node = ray.util.get_node_ip_address()
        self.base: Path | None = None
        self.keeper: _ServerKeeper | None = None

    def start(self) -> dict:
        """Start the server and check this node's models; {"node", "server"}, or
        PreflightError naming the node and what it lacks."""
        import ray

        parent = Path(self.args.base) if self.args.base else Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        self.base = Path(tempfile.mkdtemp(prefix="diffpriv-actor-", dir=parent))
        (self.base / "work").mkdir()
        self.args.base = self.base / "comfy"
        if not self.args.demo_weights:
            self.args.models = Path(self.args.models or cli.CACHE_DIR / "comfy" / "models")
            if not self.args.models.is_dir():
                raise PreflightError(f"node {self.node}: no models folder {self.args.models} (docs/cluster.md)")
        if self.photo is not None:
            self.args.photo = write_new_file(self.base / "work" / self.photo[0], self.photo[1])
        self.keeper = _ServerKeeper(self.args, gpu=bool(ray.get_gpu_ids()))
        conn = self.keeper.open()
        try:
            cli.preflight_models(conn, self.template, self.args)
        except PreflightError as exc:
            raise PreflightError(f"node {self.node}: {exc}") from None
        return {"node": self.node, "server": conn.servers[0].url}

    def run(self, name: str, filename: str, data: bytes) -> dict:
        """One photo (or key) through this actor's server: its summary entry and files."""
        work = Path(tempfile.mkdtemp(dir=self.base / "work"))
        try:
            source = write_new_file(work / Path(filename).name, data)
            summary = Summary(work / "out", self.args.command)
            conn = self.keeper.conn
            jobs = self.make_jobs(self.args, self.template, self.secrets, conn, {name: source})
            not_removed = run_batch(jobs, conn.servers, summary, cli.cleanup_of(self.args))
            if conn.servers[0].dead or not conn.servers[0].client.is_up():
                raise ServerLost(f"the ComfyUI of the actor on {self.node} stopped answering")
            entry = summary.results[name]
            files = {rel: (summary.out_dir / rel).read_bytes() for rel in entry["outputs"] + entry["keys"]}
            return {"entry": entry, "files": files, "not_removed": not_removed}
        finally:
            # Nothing of the photo stays on the node once it is sent back: not the photo, not
            # its key (an actor killed outright leaves at most the photo it was running).
            for folder in (work, *(self.args.base / sub / JOBS_FOLDER for sub in ("input", "output"))):
                shutil.rmtree(folder, ignore_errors=True)

    def stop(self) -> None:
        """Stop the server (interrupting its prompt) and remove the actor's folder."""
        if self.keeper is not None:
            self.keeper.close()
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)


class _ServerKeeper(threading.Thread):
    """Holds the actor's embedded ComfyUI (cli.connect) for the actor's life.

    The server dies with the thread that started it (die_with_parent), so that an actor
    killed outright takes its server along; Ray may run each actor method on another
    thread, so this one thread starts the server and stays until close().
    """

    def __init__(self, args, gpu: bool):
        super().__init__(daemon=True, name="comfyui-keeper")
        self.args = args
        self.gpu = gpu
        self.conn: cli.Connection | None = None
        self.error: BaseException | None = None
        self._server_up = threading.Event()
        self._close_asked = threading.Event()

    def open(self) -> cli.Connection:
        self.start()
        self._server_up.wait()
        if self.error is not None:
            raise self.error
        return self.conn

    def run(self) -> None:
        try:
            with cli.connect(self.args, cpu=not self.gpu, die_with_parent=True) as conn:
                self.conn = conn
                self._server_up.set()
                self._close_asked.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to open()'s caller
            self.error = exc
        finally:
            self._server_up.set()

    def close(self) -> None:
        self._close_asked.set()
        self.join(STOP_TIMEOUT_S)


# --- the driver ----------------------------------------------------------------------
def run_on_ray(args, template: dict, secrets, make_jobs, todo: dict[str, Path],
               summary: Summary, seal_key=None, open_key=None) -> list[str]:
    """Run ``todo`` ({name: photo or key file}) on the cluster; results land in ``summary``;
    ``secrets`` (cli.KeySecrets) go to the actors, ``seal_key`` is applied here to each key
    file an actor sends back, ``open_key`` here to each key file sent to an actor (recover:
    the actors hold nothing that opens a key). Returns what the actors could not remove
    from their servers."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        # Actor logs (each server's own progress bar) stay in the cluster's log files.
        ray.init(address=args.ray or None, log_to_driver=False)
        if threading.current_thread() is threading.main_thread():
            # ray.init makes SIGTERM exit at once: keep it a clean stop, as Ctrl-C is.
            signal.signal(signal.SIGTERM, cli._raise_keyboard_interrupt)
    actors: dict = {}
    try:
        actors = start_actors(ray, args, template, secrets, make_jobs, most=len(todo))
        return _ClusterBatch(ray, actors, todo, summary, seal_key, open_key).run()
    finally:
        stop_actors(ray, list(actors))
        if started_here:
            ray.shutdown()


def start_actors(ray, args, template: dict, secrets, make_jobs, most: int) -> dict:
    """{actor: {"node", "server"}} for every actor started (``most`` at most: no more than
    photos); PreflightError with every node's problem when one did not start (the models
    must be on every node)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = min(args.ray_actors or max(gpus, 1), most)
    photo = (args.photo.name, args.photo.read_bytes()) if args.command == "recover" and args.photo else None
    # stop() runs in its own group, next to the photo the actor may be running.
    remote = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=0,
                        concurrency_groups={"control": 1})(ComfyActor)
    run_id = uuid.uuid4().hex[:8]
    actors = [remote.options(name=f"diffpriv-{run_id}-{i}").remote(args, template, secrets, make_jobs, photo)
              for i in range(count)]
    print(f"starting {count} ComfyUI actor(s) on the Ray cluster "
          f"({'1 GPU' if gpus else 'CPU'} each) ...", file=sys.stderr)
    started, problems = {}, []
    deadline = time.monotonic() + START_TIMEOUT_S
    refs = {actor.start.remote(): actor for actor in actors}
    try:
        for ref, actor in refs.items():
            try:
                started[actor] = ray.get(ref, timeout=max(deadline - time.monotonic(), 1.0))
            except ray.exceptions.GetTimeoutError:
                problems.append(f"an actor found no room on the cluster within {START_TIMEOUT_S:.0f} s "
                                f"(each needs 1 CPU{' and 1 GPU' if gpus else ''})")
            except ray.exceptions.RayError as exc:
                problems.append(_error_text(exc))
    except BaseException:
        stop_actors(ray, actors)
        raise
    if problems:
        stop_actors(ray, actors)
        raise PreflightError("\n".join(dict.fromkeys(problems)))
    return started


def stop_actors(ray, actors: list) -> None:
    """Stop every actor's ComfyUI, then the actors; none is left running."""
    stops = [actor.stop.options(concurrency_group="control").remote() for actor in actors]
    if stops:
        ray.wait(stops, num_returns=len(stops), timeout=STOP_TIMEOUT_S)
    for actor in actors:
        ray.kill(actor)


def _error_text(exc) -> str:
    """The actor's own exception message, without Ray's traceback wrapping."""
    cause = getattr(exc, "cause", None)
    return str(cause) if cause is not None else str(exc).strip().splitlines()[-1]


class _ClusterBatch:
    """One photo at a time per actor, the next to whichever actor is free (ray.wait)."""

    def __init__(self, ray, actors: dict, todo: dict[str, Path], summary: Summary, seal_key=None, open_key=None):
        self.ray = ray
        self.seal_key = seal_key
        self.open_key = open_key
        self.actors = dict(actors)  # live actor -> {"node", "server"}
        self.todo = todo
        self.summary = summary
        self.pending = deque(todo)
        self.running: dict = {}  # object ref -> (name, actor)
        self.attempts: Counter = Counter()
        self.done_on: Counter = Counter()  # node -> photos done there
        self.started = time.monotonic()
        self.bar = tqdm(total=len(todo), unit="photo", dynamic_ncols=True)
        self.not_removed: list[str] = []

    def run(self) -> list[str]:
        try:
            while self.pending or self.running:
                self._dispatch()
                if not self.running:
                    self._fail_pending("no actor left on the cluster: every one died")
                    break
                ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    self._collect(ref)
                self._show()
            return self.not_removed
        finally:
            self.bar.close()

    def _dispatch(self) -> None:
        busy = {actor for _, actor in self.running.values()}
        for actor in [a for a in self.actors if a not in busy]:
            if not self.pending:
                return
            name = self.pending.popleft()
            path = self.todo[name]
            data = path.read_bytes()
            if self.open_key is not None:
                try:
                    data = self.open_key(data)
                except KeyFileError as exc:
                    self._record_failure(name, self.actors[actor], f"KeyFileError: {path.name}: {exc}")
                    continue
            self.running[actor.run.remote(name, path.name, data)] = (name, actor)

    def _collect(self, ref) -> None:
        name, actor = self.running.pop(ref)
        info = self.actors[actor]
        try:
            got = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            if isinstance(exc, self.ray.exceptions.RayActorError) or isinstance(getattr(exc, "cause", None),
                                                                               ServerLost):
                self._lose(actor, name, _error_text(exc))
            else:  # the actor is fine, this file is not (a key its server does not list, ...)
                self._record_failure(name, info, _error_text(exc))
            return
        self.not_removed += got["not_removed"]
        self._record(name, info, got["entry"], got["files"])

    def _record(self, name: str, info: dict, entry: dict, files: dict[str, bytes]) -> None:
        folder = self.summary.out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        if self.seal_key is not None:
            files = {rel: self.seal_key(data) if rel.endswith(KEY_SUFFIX) else data for rel, data in files.items()}
        written = {rel: rewrite_named(folder, Path(rel).name, data) for rel, data in files.items()}
        self.summary.record(name, self.todo[name], entry["status"],
                            [written[r] for r in entry["outputs"]], [written[r] for r in entry["keys"]],
                            seconds=entry["seconds"], server=info["server"], node=info["node"],
                            error=entry["error"], identity=entry["identity"], passes=entry["passes"],
                            ablations=entry.get("ablations", []), photo=entry.get("photo"),
                            detection=entry.get("detection"))
        if entry["status"] == "ok":
            self.done_on[info["node"]] += 1
        else:
            self.bar.write(f"{name}: failed: {entry['error']}")
        self.bar.update(1)

    def _record_failure(self, name: str, info: dict | None, message: str) -> None:
        self.summary.record(name, self.todo[name], "failed", server=info and info["server"],
                            node=info and info["node"], error=message)
        self.bar.write(f"{name}: failed: {message}")
        self.bar.update(1)

    def _lose(self, actor, name: str, reason: str) -> None:
        """The actor died under this photo: drop the actor, give the photo to another."""
        info = self.actors.pop(actor)
        self.ray.kill(actor)  # it may still run, with a dead server
        self.attempts[name] += 1
        if self.attempts[name] >= MAX_ATTEMPTS:
            self._record_failure(name, info, f"lost with its actor {self.attempts[name]} times; last: {reason}")
            return
        self.pending.appendleft(name)
        self.bar.write(f"the actor on {info['node']} died ({reason}); {name} goes to another actor")

    def _fail_pending(self, message: str) -> None:
        while self.pending:
            self._record_failure(self.pending.popleft(), None, message)

    def _show(self) -> None:
        minutes = max(time.monotonic() - self.started, 1.0) / 60
        nodes = ", ".join(f"{node}: {n} done, {n / minutes:.1f}/min" for node, n in sorted(self.done_on.items()))
        self.bar.set_postfix_str(f"{len(self.running)} in flight" + (f"; {nodes}" if nodes else ""), refresh=True)
