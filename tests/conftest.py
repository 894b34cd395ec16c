"""Shared fixtures: generated test-size models and the real ComfyUI server on CPU."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffpriv_client.embedded import EmbeddedComfy, prepare_base_directory  # noqa: E402
from diffpriv_testmodels import cache  # noqa: E402
from diffpriv_testmodels.comfy_models import CHECKPOINT, CLIP_VISION  # noqa: E402
from diffpriv_testmodels.face_models import ARCFACE_ONNX  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "fixtures"))


def pack_node_ids() -> set[str]:
    """Every node id the pack defines, read from the node sources."""
    ids = set()
    for path in (ROOT / "nodes").glob("*.py"):
        ids.update(re.findall(r'node_id="(DiffPrivacy\w+)"', path.read_text()))
    return ids


@pytest.fixture(scope="session")
def test_models() -> Path:
    """A models/ folder with the seeded random-weight SD1.5 checkpoint and CLIP vision."""
    return cache.comfy_test_models()


@pytest.fixture(scope="session")
def face_models() -> Path:
    """A models/ folder with seeded random-weight face recognisers in the real file formats."""
    return cache.face_test_models()


def _models_folder(base: Path, test_models: Path, face_models: Path) -> None:
    for folder, rel in ((test_models, CHECKPOINT), (test_models, CLIP_VISION), (face_models, ARCFACE_ONNX)):
        link = base / "models" / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(folder / rel)


def keys_folder(base: Path) -> Path:
    """A server's models/diffprivacy_keys, where Load Privacy Key finds key files."""
    folder = base / "models" / "diffprivacy_keys"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Host:
    def __init__(self, server: EmbeddedComfy):
        self.server = server
        self.client = server.client(timeout=60)
        self.base = server.base_dir

    @property
    def keys(self) -> Path:
        return keys_folder(self.base)

    def saved_file(self, record: dict) -> Path:
        """Where a file a node reported in /history (a key, a picture) lies on the server."""
        root = self.base / "output" if record["type"] == "output" else self.keys
        return root / record["subfolder"] / record["filename"]

    def log(self) -> str:
        return self.server.log()

    def upload(self, image: np.ndarray, name: str) -> str:
        path = self.base / "uploads" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(path)
        return self.client.upload_image(path)


def start_host(base: Path, test_models: Path, face_models: Path,
               extra_args: tuple[str, ...] = ("--disable-metadata",), token: str | None = None) -> EmbeddedComfy:
    """A test server: by default as a shared ComfyUI is, without a token (any local client
    may use it: the command's own embedded server has one, ``token="new"``)."""
    prepare_base_directory(base)
    _models_folder(base, test_models, face_models)
    server = EmbeddedComfy(base, extra_args=list(extra_args), token=token).start()
    log = server.log()
    info = server.client(timeout=60).object_info()
    missing = sorted(pack_node_ids() - set(info))
    pack_failed = re.search(r"Cannot import \S*comfyui-diffprivacy", log)
    if missing or pack_failed:
        server.stop()
        pytest.fail(f"pack nodes missing from /object_info: {missing}\n--- server log ---\n{log}")
    return server


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory, test_models, face_models) -> Host:
    """The real ComfyUI server, headless on CPU, with the pack and the test models."""
    server = start_host(tmp_path_factory.mktemp("comfy"), test_models, face_models)
    try:
        yield Host(server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


@pytest.fixture(scope="session")
def comfy_inproc():
    """ComfyUI's modules and this pack, imported in the test process (see inprocess.py)."""
    from diffpriv_testmodels.inprocess import load_host_in_process

    return load_host_in_process()


@pytest.fixture(scope="session")
def installed_models() -> Path:
    """The models folder of the embedded ComfyUI, where ./scripts/setup installed the real
    recognisers that ship in PyPI wheels (SFace, FaceNet-CASIA)."""
    from diffpriv_client.embedded import find_comfyui
    from diffpriv_core.faces.wheel_models import WHEEL_MODELS

    models = find_comfyui() / "models"
    missing = [f"{m.folder}/{m.file}" for m in WHEEL_MODELS if not (models / m.folder / m.file).is_file()]
    if missing:
        pytest.fail(f"{missing} not installed in {models}: run ./scripts/setup")
    return models
