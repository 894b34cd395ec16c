"""Registry-ready: the licence pyproject names, an icon, an archive that ships the nodes and
not the tests, and the registry's and comfy-test's checks clean (comfy-cli's
``comfy node validate``, comfy-test's ``lint``, both pinned and installed from PyPI into a
tools venv of their own, cached in .cache/tools/)."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT
from host_env import copy_checkout

TOOLS = ("comfy-cli==1.23.0", "comfy-test==0.4.15")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
QUIET = dict(os.environ, DO_NOT_TRACK="1")  # comfy-cli's telemetry off


@pytest.fixture(scope="session")
def tools() -> Path:
    """bin/ of a venv holding the pinned tools (made once)."""
    venv = ROOT / ".cache" / "tools" / "-".join(t.replace("==", "") for t in TOOLS)
    if not (venv / "bin" / "comfy-test").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *TOOLS],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"could not install {TOOLS} from the package index:\n{done.stderr[-3000:]}")
    return venv / "bin"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """The checkout's files (as a clone has them) in a git repository of their own, for the
    tools that read git's file list and write into the folder they run in."""
    folder = tmp_path_factory.mktemp("pack") / "comfyui-diffprivacy"
    copy_checkout(ROOT, folder)
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run(["git", "add", "-A"], cwd=folder, check=True)
    return folder


def test_the_licence_is_the_one_pyproject_names():
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text


def test_the_icon_is_a_square_picture_in_the_repository():
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    repository = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    assert icon.startswith(prefix)
    with Image.open(ROOT / icon.removeprefix(prefix)) as picture:
        assert picture.size[0] == picture.size[1] >= 256


def test_comfy_node_validate_is_clean(tools, checkout):
    done = subprocess.run([str(tools / "comfy"), "node", "validate"], cwd=checkout, env=QUIET,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "All validation checks passed" in out, out
    assert "Warning" not in out and "Security warnings" not in out, out


def test_comfy_test_lint_is_clean(tools, checkout):
    done = subprocess.run([str(tools / "comfy-test"), "lint", str(checkout)], env=QUIET, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_registry_archive_ships_the_nodes_and_not_the_tests(tools, checkout):
    done = subprocess.run([str(tools / "comfy"), "node", "pack"], cwd=checkout, env=QUIET,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    with zipfile.ZipFile(checkout / "node.zip") as archive:
        names = set(archive.namelist())
    for shipped in ("__init__.py", "install.py", "LICENSE", "pyproject.toml", "README.md", "NODES.md",
                    "nodes/guidance.py", "diffpriv_core/msi.py", "web/icon.png", "web/docs/DiffPrivacyMSIInversion.md",
                    "example_workflows/anonymize_faces.json", "example_workflows/input/astronaut.png"):
        assert shipped in names, shipped
    for left_out in ("tests/", "benchmarks/", ".ci/", "scripts/", "diffpriv_client/", "diffpriv_eval/",
                     "diffpriv_testmodels/"):
        assert not any(n.startswith(left_out) for n in names), left_out
