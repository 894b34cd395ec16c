"""A batch on a Ray cluster: `diffpriv protect|recover ... --ray [ADDRESS]`.

Each actor owns one embedded ComfyUI with the pack, with the GPUs and CPUs it asks for
(--ray-gpus-per-actor, fractions allowed; --ray-cpus-per-actor), started once and used for
many photos. Every actor is asked for at once: those the cluster has room for start, the
others wait for room (an autoscaler adds nodes for what they ask), and the batch starts
with the actors that are up and takes the others as they come. The driver sends one photo
at a time to each idle actor; the actor runs it through its own server exactly as the
command does on one machine (the command's jobs, run_batch, its downloads) and sends the
files back (with --ray-shared, the photos and --out are the same paths on every node: the
actor reads the photo and writes the files there itself). The driver alone writes the run
record, so a rerun resumes as without Ray. A photo whose actor dies goes to another
actor, at most MAX_ATTEMPTS times; the dead actor is replaced, and its folder (which may
hold the photo it was running) is removed on its node, by then or at the end of the run on
every node.

Ray is imported here only, and this module only when --ray is given.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from diffpriv_core.files import write_new_file
from diffpriv_core.job_protocol import JOBS_FOLDER
from diffpriv_core.key_format import KEY_SUFFIX, KeyFileError

from . import cli, demo
from .batch import rewrite_named, run_batch
from .preflight import PreflightError
from .summary import RECORD_NAME, Summary, latest_run

# Tries per photo whose actor died under it (node lost, ComfyUI crashed, out of memory).
MAX_ATTEMPTS = 3
# An actor slot whose actors die this many times in a row, without finishing a photo in
# between, is given up (a node that kills every actor it gets); any finished photo resets it.
MAX_DEATHS_IN_A_ROW = 3
# How long the batch waits for a first actor to be up (placed on the cluster, perhaps on a
# node an autoscaler adds, and its ComfyUI started) before it gives up.
START_TIMEOUT_S = 900.0
# After this long without an actor up, the command says what the actors wait for.
WAITING_NOTICE_S = 60.0
# How long stopping actors (and their ComfyUI servers) may take before they are killed.
STOP_TIMEOUT_S = 60.0
# A cluster address that does not answer in this time is refused with one message.
CONNECT_TIMEOUT_S = 10.0
POLL_S = 1.0
FOLDER_PREFIX = "diffpriv-actor-"


class ServerLost(RuntimeError):
    """The actor's ComfyUI stopped answering: the photo goes to another actor."""


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise cli.UsageError("--ray needs Ray on this machine and every node: "
                             'pip install "comfyui-diffprivacy[ray]" (or pip install ray)') from exc
    return ray


# --- connecting ----------------------------------------------------------------------
def cluster_address(given: str) -> str | None:
    """The address to give ray.init, checked to answer within CONNECT_TIMEOUT_S: Ray itself
    retries a dead address for minutes, printing a line per try. None: start a local cluster."""
    wanted = given or os.environ.get("RAY_ADDRESS") or None
    if wanted is None or wanted == "local" or ("://" in wanted and not wanted.startswith("ray://")):
        return wanted  # a local cluster, or an address of a kind Ray resolves itself (a job's http://...)
    address = wanted.removeprefix("ray://")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        address = canonicalize_bootstrap_address("auto")
        if address is None:
            raise cli.UsageError("--ray auto: no running Ray cluster found on this machine (start one with "
                                 "`ray start --head`, or give its address)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise cli.UsageError(f"--ray {wanted}: not an address (auto, HOST:PORT or ray://HOST:10001)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise cli.UsageError(f"--ray {wanted}: no Ray cluster answers at {host}:{port} within "
                             f"{CONNECT_TIMEOUT_S:.0f} s ({exc.strerror or exc}); is `ray start --head` running "
                             "there, and the port open to this machine?") from None
    return wanted if wanted != "auto" else address


# --- the actor -----------------------------------------------------------------------
class ComfyActor:
    """One embedded ComfyUI on one node, run by a Ray actor (see _Slot)."""

    def __init__(self, args, template: dict, secrets, make_jobs, photo: tuple[str, bytes] | None,
                 folder_prefix: str):
        import ray

        self.args = args  # the actor's own copy: start() points its paths at this node
        self.template = template
        self.secrets = secrets  # cli.KeySecrets: for protect, the recipient only
        self.make_jobs = make_jobs
        self.photo = photo
        self.folder_prefix = folder_prefix
        self.node = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.base: Path | None = None
        self.keeper: _ServerKeeper | None = None

    def start(self) -> dict:
        """Start the server and check this node's models; {"node", "node_id", "server",
        "folder"}, or PreflightError naming the node and what it lacks."""
        import ray

        parent = actor_parent(self.args.base)
        parent.mkdir(parents=True, exist_ok=True)
        self.base = Path(tempfile.mkdtemp(prefix=self.folder_prefix, dir=parent))
        (self.base / "work").mkdir()
        self.args.base = self.base / "comfy"
        if not self.args.demo_weights:
            self.args.models = Path(self.args.models or cli.CACHE_DIR / "comfy" / "models")
            if not self.args.models.is_dir():
                raise PreflightError(f"node {self.node}: no models folder {self.args.models} (docs/cluster.md)")
        if self.photo is not None:
            self.args.photo = write_new_file(self.base / "work" / self.photo[0], self.photo[1])
        self.keeper = _ServerKeeper(self.args, gpu=bool(ray.get_gpu_ids()))
        with contextlib.redirect_stderr(io.StringIO()):  # the demo's banner: the driver prints it
            conn = self.keeper.open()
        try:
            cli.preflight_models(conn, self.template, self.args)
        except PreflightError as exc:
            raise PreflightError(f"node {self.node}: {exc}") from None
        return {"node": self.node, "node_id": self.node_id, "server": conn.servers[0].url, "folder": self.base.name}

    def run(self, name: str, filename: str, data: bytes | None, shared_out: str | None = None,
            keys_to_driver: bool = True) -> dict:
        """One photo (or key) through this actor's server: its summary entry, its files and,
        with --demo-weights, its recovery check. ``data`` None: ``filename`` is the photo's
        path on every node (--ray-shared). With ``shared_out`` (--ray-shared), the files are
        written under it here, nothing replaced, and their paths sent back in place of their
        bytes (keys too, unless ``keys_to_driver``: the driver seals them under its passphrase)."""
        work = Path(tempfile.mkdtemp(dir=self.base / "work"))
        try:
            source = Path(filename) if data is None else write_new_file(work / Path(filename).name, data)
            summary = Summary(work / "out", self.args.command)
            conn = self.keeper.conn
            jobs = self.make_jobs(self.args, self.template, self.secrets, conn, {name: source})
            not_removed = run_batch(jobs, conn.servers, summary, cli.cleanup_of(self.args))
            check = self._recovery_check(summary) if self.args.demo_weights and self.args.command == "protect" else {}
            if conn.servers[0].dead or not conn.servers[0].client.is_up():
                raise ServerLost(f"the ComfyUI of the actor on {self.node} stopped answering")
            entry = summary.results[name]
            files = {rel: (summary.out_dir / rel).read_bytes() for rel in entry["outputs"] + entry["keys"]}
            summary.close()
            if shared_out is not None:
                files = write_shared(Path(shared_out), files, lambda rel: keys_to_driver and rel.endswith(KEY_SUFFIX))
                if check.get("files"):
                    check["files"] = write_shared(Path(shared_out) / demo.CHECK_FOLDER, check["files"])
            return {"entry": entry, "files": files, "not_removed": not_removed + check.get("not_removed", []),
                    "check": check}
        finally:
            # Nothing of the photo stays on the node once it is sent back: not the photo, not
            # its key (an actor killed outright leaves its folder to the others: remove_folders).
            for folder in (work, *(self.args.base / sub / JOBS_FOLDER for sub in ("input", "output"))):
                shutil.rmtree(folder, ignore_errors=True)

    def _recovery_check(self, summary: Summary) -> dict:
        """--demo-weights: the demo's recovery check, on this actor's server (demo.check_recovery):
        the lines it prints, its files ({path in the check's folder: bytes}), its entries."""
        if self.secrets.recipient:  # sealed to a recipient whose identity stays with the driver
            return {"lines": ["recovery check: not on a cluster with --passphrase-env or --recipient (the actors "
                              "cannot open the keys)"]}
        printed = io.StringIO()
        conn = self.keeper.conn
        with contextlib.redirect_stdout(printed):
            not_removed = demo.check_recovery(summary, self.template, self.secrets, conn.servers,
                                              cli.cleanup_of(self.args), cli._recover_graph)
        folder = summary.out_dir / demo.CHECK_FOLDER
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
                 if p.is_file() and p.parent != folder}
        results = {}
        if (folder / RECORD_NAME).is_file():
            check = latest_run(folder)
            results = check.results
            check.close()
        return {"lines": [line for line in printed.getvalue().splitlines() if line.startswith("recovery check")],
                "files": files, "results": results, "not_removed": not_removed}

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


def write_shared(root: Path, files: dict[str, bytes], kept=lambda rel: False) -> dict:
    """--ray-shared: ``files`` ({path under ``root``: bytes}) written under ``root`` on the
    storage every node sees, each a new file (the next free number, nothing replaced); their
    paths under ``root`` come back in place of their bytes, except for those ``kept(rel)``."""
    sent = {}
    for rel, data in files.items():
        if kept(rel):
            sent[rel] = data
            continue
        folder = root / Path(rel).parent
        folder.mkdir(parents=True, exist_ok=True)
        sent[rel] = str(rewrite_named(folder, Path(rel).name, data).relative_to(root))
    return sent


def written_files(root: Path, files: dict) -> dict[str, Path]:
    """The driver's side of write_shared: {rel: where it now is}, writing under ``root``
    those that came back as bytes."""
    written = {}
    for rel, data in files.items():
        if isinstance(data, str):  # written by the actor (--ray-shared)
            written[rel] = root / data
            continue
        folder = root / Path(rel).parent
        folder.mkdir(parents=True, exist_ok=True)
        written[rel] = rewrite_named(folder, Path(rel).name, data)
    return written


def actor_parent(base) -> Path:
    """The folder, on a node, that holds the actors' own folders (--base, or the temporary folder)."""
    return Path(base) if base else Path(tempfile.gettempdir())


def remove_folders(base, prefix: str) -> list[str]:
    """Remove, on this node, the actor folders whose names start with ``prefix`` (a run's,
    or one actor's); returns what was removed."""
    removed = []
    for folder in actor_parent(base).glob(f"{prefix}*"):
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(str(folder))
    return removed


# --- the driver ----------------------------------------------------------------------
def run_on_ray(args, template: dict, secrets, make_jobs, todo: dict[str, Path],
               summary: Summary, seal_key=None, open_key=None) -> list[str]:
    """Run ``todo`` ({name: photo or key file}) on the cluster; results land in ``summary``;
    ``secrets`` (cli.KeySecrets) go to the actors, ``seal_key`` is applied here to each key
    file an actor sends back, ``open_key`` here to each key file sent to an actor (recover:
    the passphrase or identity stays on this machine). Returns what the actors could not
    remove from their servers."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        address = cluster_address(args.ray)
        # Actor logs (each server's own progress bar) stay in the cluster's log files.
        ray.init(address=address, log_to_driver=False)
        if threading.current_thread() is threading.main_thread():
            # ray.init makes SIGTERM exit at once: keep it a clean stop, as Ctrl-C is.
            signal.signal(signal.SIGTERM, cli._raise_keyboard_interrupt)
    if args.demo_weights:
        print(demo.BANNER, file=sys.stderr)
        print(f"--demo-weights: {demo.MODELS_WORDS}, generated on each node", file=sys.stderr)
        if args.command == "protect":
            print(f"--demo-weights: {demo.SETTINGS.describe(args.steps)}", file=sys.stderr)
    batch = _ClusterBatch(ray, args, template, secrets, make_jobs, todo, summary, seal_key, open_key)
    try:
        return batch.run()
    finally:
        batch.stop()
        if started_here:
            ray.shutdown()


@dataclass
class Resources:
    cpus: float
    gpus: float

    def words(self) -> str:
        gpus = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.cpus:g} CPU{gpus}"


def actor_resources(ray, args) -> Resources:
    """What each actor asks for: --ray-gpus-per-actor (default: 1 on a cluster with GPUs),
    --ray-cpus-per-actor."""
    gpus = args.ray_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    return Resources(args.ray_cpus_per_actor, gpus)


def actors_wanted(ray, args, each: Resources, photos: int) -> int:
    """--ray-actors, else as many as the cluster has room for now (at least one); never more
    than photos."""
    if args.ray_actors:
        return min(args.ray_actors, photos)
    total = ray.cluster_resources()
    fits = total.get("CPU", 0) // each.cpus
    if each.gpus:
        fits = min(fits, total.get("GPU", 0) // each.gpus)
    return max(1, min(int(fits), photos))


@dataclass(eq=False)
class _Slot:
    """One actor place: its current actor, and how often its actors died in a row."""
    index: int
    actor: object = None
    info: dict | None = None  # {"node", "node_id", "server", "folder"} once started
    generation: int = 0
    deaths_in_a_row: int = 0
    given_up: bool = False


class _ClusterBatch:
    """One photo at a time per started actor, the next to whichever is free (ray.wait over
    the actors' starts and runs together)."""

    def __init__(self, ray, args, template: dict, secrets, make_jobs, todo: dict[str, Path],
                 summary: Summary, seal_key=None, open_key=None):
        self.ray = ray
        self.seal_key = seal_key
        self.open_key = open_key
        self.args = args
        self.todo = todo
        self.summary = summary
        self.shared_out = str(summary.out_dir) if getattr(args, "ray_shared", False) else None
        self.check: Summary | None = None  # --demo-weights: the recovery check's record, as the demo keeps it
        self.run_id = uuid.uuid4().hex[:8]
        self.each = actor_resources(ray, args)
        photo = (args.photo.name, args.photo.read_bytes()) if args.command == "recover" and args.photo else None
        # stop() runs in its own group, next to the photo the actor may be running.
        self.remote = ray.remote(num_cpus=self.each.cpus, num_gpus=self.each.gpus, max_restarts=0,
                                 concurrency_groups={"control": 1})(ComfyActor)
        self.actor_args = (args, template, secrets, make_jobs, photo)
        self.pending = deque(todo)
        self.running: dict = {}  # object ref -> (name, slot)
        self.starting: dict = {}  # object ref -> slot
        self.slots = [_Slot(i) for i in range(actors_wanted(ray, args, self.each, len(todo)))]
        self.attempts: Counter = Counter()
        self.done_on: Counter = Counter()  # node -> photos done there
        self.not_removed: list[str] = []
        self.dead_nodes: set[str] = set()
        self.started = time.monotonic()
        self.noticed = False
        self.bar: tqdm | None = None

    # --- actors --------------------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        name = f"diffpriv-{self.run_id}-{slot.index}" + (f".{slot.generation}" if slot.generation else "")
        prefix = f"{FOLDER_PREFIX}{self.run_id}-{slot.index}.{slot.generation}-"
        slot.actor = self.remote.options(name=name).remote(*self.actor_args, prefix)
        slot.info = None
        self.starting[slot.actor.start.remote()] = slot

    def _started(self, ref) -> None:
        slot = self.starting.pop(ref)
        try:
            slot.info = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, PreflightError) or not isinstance(exc, self.ray.exceptions.RayActorError):
                if not self.running and not self.done_on and not self._up():
                    raise PreflightError(_error_text(exc)) from None  # the models must be on every node
                self._write(f"an actor did not start: {_error_text(exc)}")
                self._give_up(slot)
            else:
                self._died(slot, _error_text(exc))
            return
        waiting = f"; {len(self.starting)} starting or waiting for room on the cluster" if self.starting else ""
        self._write(f"an actor is up on {slot.info['node']} ({len(self._up())} of {len(self.slots)} up{waiting})")

    def _died(self, slot: _Slot, reason: str) -> None:
        """The slot's actor died: remove its folder on its node, and start another (unless
        this slot's actors keep dying)."""
        self.ray.kill(slot.actor)  # it may still run, with a dead server
        if slot.info is not None:
            self._remove_on(slot.info["node_id"], slot.info["folder"])
        slot.deaths_in_a_row += 1
        if slot.deaths_in_a_row >= MAX_DEATHS_IN_A_ROW:
            self._write(f"an actor place lost {slot.deaths_in_a_row} actors in a row ({reason}); not replaced")
            self._give_up(slot)
            return
        slot.generation += 1
        self._write("a replacement actor is asked for")
        self._start(slot)

    def _give_up(self, slot: _Slot) -> None:
        slot.given_up, slot.info = True, None
        with contextlib.suppress(Exception):
            self.ray.kill(slot.actor)

    def _up(self) -> list[_Slot]:
        return [s for s in self.slots if s.info is not None and not s.given_up]

    def _remove_on(self, node_id: str, folder: str) -> None:
        """Remove a dead actor's folder on its node (no wait: the node may be gone too)."""
        try:
            self._remover(node_id).remote(self.args.base, folder)
        except Exception:  # noqa: BLE001 - the end of the run sweeps every node again
            pass

    def _remover(self, node_id: str):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return self.ray.remote(num_cpus=0, max_retries=0)(remove_folders).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))

    def stop(self) -> None:
        """Stop every started actor's ComfyUI, kill the others, then remove this run's actor
        folders on every node; no ComfyUI and no photo is left behind."""
        started = [s.actor for s in self.slots if s.info is not None and not s.given_up]
        stops = [actor.stop.options(concurrency_group="control").remote() for actor in started]
        if stops:
            self.ray.wait(stops, num_returns=len(stops), timeout=STOP_TIMEOUT_S)
        for slot in self.slots:
            if slot.actor is not None:
                with contextlib.suppress(Exception):
                    self.ray.kill(slot.actor)
        nodes = [n["NodeID"] for n in self.ray.nodes() if n.get("Alive")]
        sweeps = [self._remover(node).remote(self.args.base, f"{FOLDER_PREFIX}{self.run_id}-") for node in nodes]
        if sweeps:
            self.ray.wait(sweeps, num_returns=len(sweeps), timeout=STOP_TIMEOUT_S)
        if self.bar is not None:
            self.bar.close()
        if self.check is not None:
            self.check.finish()
            self.check.write_json()
            self.check.close()

    # --- the batch -----------------------------------------------------------------
    def run(self) -> list[str]:
        print(f"asking the Ray cluster for {len(self.slots)} ComfyUI actor(s), {self.each.words()} each ...",
              file=sys.stderr)
        for slot in self.slots:
            self._start(slot)
        self.bar = tqdm(total=len(self.todo), unit="photo", dynamic_ncols=True)
        while self.pending or self.running:
            self._dispatch()
            live = [s for s in self.slots if not s.given_up]
            if not live:
                self._fail_pending("no actor left on the cluster: every one died or could not start")
                break
            ready, _ = self.ray.wait([*self.running, *self.starting], num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref in self.starting:
                    self._started(ref)
                else:
                    self._collect(ref)
            self._check_start()
            self._show()
        return self.not_removed

    def _check_start(self) -> None:
        waited = time.monotonic() - self.started
        if not self._up() and not self.running and waited > START_TIMEOUT_S:
            raise PreflightError(f"no actor could start on the Ray cluster within {START_TIMEOUT_S:.0f} s: each asks "
                                 f"for {self.each.words()} (--ray-cpus-per-actor, --ray-gpus-per-actor); does a "
                                 "node have that much free, or can the autoscaler add one?")
        if not self.noticed and waited > WAITING_NOTICE_S and not self._up():
            self.noticed = True
            self._write(f"no actor up yet after {WAITING_NOTICE_S:.0f} s: {len(self.starting)} starting their ComfyUI "
                        f"or waiting for room on the cluster ({self.each.words()} each; an autoscaler adds nodes "
                        "for them); the batch starts with the first one up")

    def _dispatch(self) -> None:
        busy = {slot for _, slot in self.running.values()}
        for slot in self._up():
            if not self.pending:
                return
            if slot in busy:
                continue
            name = self.pending.popleft()
            path = self.todo[name]
            if self.open_key is not None:  # a key, opened here
                try:
                    data = self.open_key(path.read_bytes())
                except (KeyFileError, OSError) as exc:
                    self._record_failure(name, None, f"{path.name}: {exc}")
                    continue
                ref = slot.actor.run.remote(name, path.name, data, self.shared_out)
            elif self.shared_out is not None:
                ref = slot.actor.run.remote(name, str(path.resolve()), None, self.shared_out,
                                            keys_to_driver=self.seal_key is not None)
            else:
                ref = slot.actor.run.remote(name, path.name, path.read_bytes())
            self.running[ref] = (name, slot)

    def _collect(self, ref) -> None:
        name, slot = self.running.pop(ref)
        info = slot.info
        try:
            got = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            if isinstance(exc, self.ray.exceptions.RayActorError) or isinstance(getattr(exc, "cause", None),
                                                                               ServerLost):
                self._lose(slot, name, _error_text(exc))
            else:  # the actor is fine, this file is not (a key its server does not list, ...)
                self._record_failure(name, info, _error_text(exc))
            return
        slot.deaths_in_a_row = 0
        self.not_removed += got["not_removed"]
        written = self._record(name, info, got["entry"], got["files"])
        self._recovery_check(name, info, got.get("check") or {}, written)

    def _record(self, name: str, info: dict, entry: dict, files: dict) -> dict[str, Path]:
        """The photo's entry in the run record, with its files where they now are (returned)."""
        if self.seal_key is not None:
            files = {rel: self.seal_key(data) if rel.endswith(KEY_SUFFIX) else data for rel, data in files.items()}
        written = written_files(self.summary.out_dir, files)
        extra = {k: v for k, v in entry.items() if k not in ACTOR_ENTRY_FIELDS}
        self.summary.record(name, self.todo[name], entry["status"],
                            [written[r] for r in entry["outputs"]], [written[r] for r in entry["keys"]],
                            seconds=entry["seconds"], server=info["server"], node=info["node"],
                            error=entry["error"], identity=entry["identity"], passes=entry["passes"], **extra)
        if entry["status"] == "ok":
            self.done_on[info["node"]] += 1
        else:
            self._write(f"{name}: failed: {entry['error']}")
        self.bar.update(1)
        return written

    def _recovery_check(self, name: str, info: dict, check: dict, written: dict[str, Path]) -> None:
        """--demo-weights: the actor's recovery check of a photo, printed, and its pictures and
        entries in --out/recovery-check/ (with its own record and summary.json), as the demo's."""
        for line in check.get("lines", []):
            self._write(line)
        if not check.get("results"):
            return
        if self.check is None:
            self.check = Summary(self.summary.out_dir / demo.CHECK_FOLDER, "recover")
        pictures = written_files(self.check.out_dir, check["files"])
        sources = {f"{name}_reconstruction": self.todo[name],
                   **{demo._key_name(rel): path for rel, path in written.items()
                      if rel.endswith(KEY_SUFFIX)}}
        for job, entry in check["results"].items():
            self.check.record(job, sources.get(job, entry["source"]), entry["status"],
                              [pictures[rel] for rel in entry["outputs"]], seconds=entry["seconds"],
                              server=info["server"], node=info["node"], error=entry["error"])

    def _record_failure(self, name: str, info: dict | None, message: str) -> None:
        self.summary.record(name, self.todo[name], "failed", server=info and info["server"],
                            node=info and info["node"], error=message)
        self._write(f"{name}: failed: {message}")
        self.bar.update(1)

    def _lose(self, slot: _Slot, name: str, reason: str) -> None:
        """The actor died under this photo: give the photo to another, replace the actor."""
        node = slot.info["node"] if slot.info else "?"
        self.attempts[name] += 1
        if self.attempts[name] >= MAX_ATTEMPTS:
            self._record_failure(name, slot.info, f"lost with its actor {self.attempts[name]} times; last: {reason}")
        else:
            self.pending.appendleft(name)
            self._write(f"the actor on {node} died ({reason}); {name} goes to another actor")
        self._died(slot, reason)

    def _fail_pending(self, message: str) -> None:
        while self.pending:
            self._record_failure(self.pending.popleft(), None, message)

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stderr)

    def _show(self) -> None:
        minutes = max(time.monotonic() - self.started, 1.0) / 60
        nodes = ", ".join(f"{node}: {n} done, {n / minutes:.1f}/min" for node, n in sorted(self.done_on.items()))
        actors = f"{len(self._up())}/{len(self.slots)} actors up"
        self.bar.set_postfix_str(f"{actors}, {len(self.running)} in flight" + (f"; {nodes}" if nodes else ""),
                                 refresh=True)


# The fields of an actor's summary entry the driver records itself; the rest is kept as it is.
ACTOR_ENTRY_FIELDS = {"source", "status", "outputs", "keys", "faces", "identity", "passes", "seconds", "server",
                      "node", "error", "sha256", "settings", "run", "attempt"}


def _error_text(exc) -> str:
    """The actor's own exception message, without Ray's traceback wrapping."""
    cause = getattr(exc, "cause", None)
    return str(cause) if cause is not None else str(exc).strip().splitlines()[-1]
