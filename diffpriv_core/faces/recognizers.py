"""Differentiable, frozen face recognisers (the ``FaceEmbedder`` protocol) and their loader.

These formats are accepted, all read without pickle and without any download:
- ONNX recognisers: SFace (OpenCV model zoo, installed by the setup: the default) and the
  ArcFace files of insightface model packs (``buffalo_l/w600k_r50.onnx``,
  ``antelopev2/glintr100.onnx``), converted to torch with onnx2torch;
- IR-SE50 (``model_ir_se50.pth``, TreB1eN's InsightFace_Pytorch ``Backbone(50, mode='ir_se')``,
  the network of the reference code), as .pth or .safetensors;
- FaceNet InceptionResnetV1 state dicts (facenet-pytorch's layout): the CASIA-WebFace one
  the setup converts, or facenet-pytorch's VGGFace2 file, as .pt/.pth or .safetensors.

Each recogniser carries its own alignment (five-point template or MTCNN box crop) and its
same-person threshold, as a cosine similarity of its unit embeddings. The threshold of a
file is known by its content (its sha256, whatever its name: a renamed SFace is still
SFace); any other file needs its threshold stated by the caller.

onnx, onnx2torch and facenet-pytorch are imported only when a file needs them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
# torch's own layers, not comfy.ops (comfy-test's rule): frozen recognisers rebuilt from their own
# files, in the core, which imports no ComfyUI.
from torch.nn import Conv2d, Linear

from .align import FACENET_BOX, FIVE_POINT, Alignment
from .detect import SCRFD_FILES
from .model_files import KnownModel, find_face_model
from .wheel_models import FACENET_CASIA, SFACE, WHEEL_RECOGNIZERS, check_installed, sha256

ONNX_SUFFIXES = (".onnx",)
STATE_DICT_SUFFIXES = (".pth", ".pt", ".safetensors")


@dataclass(frozen=True)
class InputRange:
    """How a network wants its [0, 1] RGB input standardised: (x - mean) / std."""

    mean: float
    std: float


ARCFACE_RANGE = InputRange(0.5, 0.5)  # insightface: (pixel - 127.5) / 127.5, RGB
PIXEL_RANGE = InputRange(0.0, 1.0 / 255.0)  # mxnet-era packs standardise inside the graph
FACENET_RANGE = InputRange(127.5 / 255.0, 128.0 / 255.0)  # facenet-pytorch fixed_image_standardization


def cosine_of_distance(distance: float) -> float:
    """The cosine of two unit vectors at Euclidean ``distance``: |a - b|^2 = 2 - 2 cos."""
    return 1.0 - distance**2 / 2.0


# Same-person thresholds, as cosine similarities: SFace's published one (OpenCV's
# FaceRecognizerSF: cosine 0.363, i.e. L2 1.128); the paper's for FaceNet (L2 1.1) and
# ArcFace (L2 0.8), which it uses to count a protection as successful.
SFACE_THRESHOLD = 0.363
FACENET_THRESHOLD = cosine_of_distance(1.1)
ARCFACE_THRESHOLD = cosine_of_distance(0.8)


class FaceRecognizer(nn.Module):
    """A frozen recogniser as a ``FaceEmbedder``: [B, 3, S, S] aligned RGB faces in [0, 1]
    -> [B, D] unit embeddings, differentiable w.r.t. the faces."""

    def __init__(self, net: nn.Module, input_size: int, input_range: InputRange, name: str,
                 alignment: Alignment = FIVE_POINT, threshold: float = ARCFACE_THRESHOLD):
        super().__init__()
        self.net = net.requires_grad_(False)
        self.input_size = input_size
        self.input_range = input_range
        self.name = name
        self.alignment = alignment
        self.threshold = threshold  # same person when the cosine is at least this
        self.eval()

    def train(self, mode: bool = True) -> "FaceRecognizer":
        # A frozen recogniser must never normalise with batch statistics.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where the weights are: a sampler moves the recogniser to its model's device."""
        weight = next(itertools.chain(self.net.parameters(), self.net.buffers()), None)
        return torch.device("cpu") if weight is None else weight.device

    def forward(self, aligned: torch.Tensor) -> torch.Tensor:
        # Faces may come from anywhere (a reference photo on the CPU, a decoded sample on
        # the GPU): they follow the weights, and so do the embeddings.
        aligned = aligned.to(self.device)
        size = (self.input_size, self.input_size)
        if tuple(aligned.shape[-2:]) != size:
            aligned = F.interpolate(aligned, size=size, mode="bilinear", align_corners=False, antialias=True)
        # The networks hold float32 weights; decoders may hand over half precision.
        x = (aligned.float() - self.input_range.mean) / self.input_range.std
        return F.normalize(self.net(x).flatten(1).float(), dim=-1)


# --- IR-SE (TreB1eN InsightFace_Pytorch), module names as in its state dicts ---------------

class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth),
        )

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


# units per stage of IR-SE 50 / 100 / 152 (get_blocks in the reference code)
IR_SE_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
IR_SE_WIDTHS = (64, 128, 256, 512)


class IRSEBackbone(nn.Module):
    """``Backbone(num_layers, drop_ratio, mode='ir_se')`` for 112 x 112 input (eval only)."""

    def __init__(self, num_layers: int = 50):
        super().__init__()
        self.input_layer = nn.Sequential(Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        units, in_channels = [], 64
        for depth, count in zip(IR_SE_WIDTHS, IR_SE_UNITS[num_layers]):
            for k in range(count):
                units.append(BottleneckIRSE(in_channels, depth, 2 if k == 0 else 1))
                in_channels = depth
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(), nn.Flatten(), Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512))

    def forward(self, x):
        return self.output_layer(self.body(self.input_layer(x)))


def ir_se_depth(state: dict[str, torch.Tensor]) -> int:
    """50, 100 or 152, from the number of residual units in an IR-SE state dict."""
    count = len({k.split(".")[1] for k in state if k.startswith("body.")})
    for layers, units in IR_SE_UNITS.items():
        if sum(units) == count:
            return layers
    raise ValueError(f"an IR-SE state dict with {count} residual units matches no IR-SE 50/100/152")


# --- state-dict formats ---------------------------------------------------------------------

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pt/.pth file (never unpickling code), as float32 on CPU,
    without a DataParallel ``module.`` prefix."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path.name} is not a plain state dict of tensors")
    return {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in state.items()}


def ir_se_recognizer(state: dict[str, torch.Tensor], name: str) -> FaceRecognizer:
    net = IRSEBackbone(ir_se_depth(state))
    net.load_state_dict(state)
    return FaceRecognizer(net, 112, ARCFACE_RANGE, name)


def facenet_recognizer(state: dict[str, torch.Tensor], name: str) -> FaceRecognizer:
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

    net = InceptionResnetV1()  # no ``pretrained``: it would download
    # The VGGFace2 file also holds the training classifier, which embeddings do not use.
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("logits.")})
    # Its forward already L2-normalises; FaceRecognizer's second normalisation is a no-op.
    return FaceRecognizer(net, 160, FACENET_RANGE, name, FACENET_BOX, FACENET_THRESHOLD)


# --- ArcFace ONNX (insightface packs) -------------------------------------------------------

def bypass_identity_nodes(graph) -> None:
    """Rewire every consumer of an Identity node to the Identity's input, and drop the node.

    torch's TorchScript exporter de-duplicates equal initializers by routing the copies
    through Identity nodes; onnx2torch's Conv/Gemm converters then miss their weights.
    """
    keep = {o.name for o in graph.output}
    source = {}
    for node in list(graph.node):
        if node.op_type == "Identity" and node.output[0] not in keep:
            source[node.output[0]] = node.input[0]
            graph.node.remove(node)
    for node in graph.node:
        for k, name in enumerate(node.input):
            while name in source:  # Identity chains
                name = source[name]
            node.input[k] = name


def standardises_inside(graph) -> bool:
    """insightface's rule (ArcFaceONNX): mxnet-converted packs begin with Sub and Mul nodes
    and take raw 0..255 pixels; the others take (pixel - 127.5) / 127.5."""
    names = [node.name for node in graph.node[:8]]
    return any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names)


def onnx_input_size(graph) -> int:
    dims = graph.input[0].type.tensor_type.shape.dim
    return int(dims[2].dim_value) if len(dims) == 4 and dims[2].dim_value else 112


def onnx_recognizer(path: Path) -> FaceRecognizer:
    """An ONNX recogniser (SFace, an insightface pack's ArcFace) as a torch module. Both are
    fed RGB: insightface's and OpenCV's cv2 BGR images go through ``blobFromImage(s)`` with
    ``swapRB=True``. SFace takes raw 0..255 pixels, as the mxnet-era packs do."""
    import onnx
    from onnx2torch import convert

    model = onnx.load(str(path))
    bypass_identity_nodes(model.graph)
    input_range = PIXEL_RANGE if standardises_inside(model.graph) else ARCFACE_RANGE
    return FaceRecognizer(convert(model), onnx_input_size(model.graph), input_range, path.name, FIVE_POINT)


# --- files ------------------------------------------------------------------------------

@dataclass(frozen=True)
class KnownFile:
    what: str
    threshold: float  # same person at this cosine or above


# Recogniser files known by the sha256 of their bytes, with their published thresholds.
KNOWN_FILES = {
    SFACE.file_sha256: KnownFile(SFACE.what, SFACE_THRESHOLD),
    FACENET_CASIA.file_sha256: KnownFile(FACENET_CASIA.what, FACENET_THRESHOLD),
    "4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43":
        KnownFile("ArcFace R50 of insightface's buffalo_l pack (w600k_r50.onnx)", ARCFACE_THRESHOLD),
}


class UnknownRecognizerError(ValueError):
    """A recogniser file not known by its content, loaded without a stated threshold."""

    def __init__(self, path: Path, digest: str, family: FaceRecognizer):
        super().__init__(
            f"{path.name} (sha256 {digest}) is not a face recogniser this pack knows by its content, so its "
            f"same-person threshold is unknown and must be stated: the cosine similarity of two embeddings "
            f"from which it takes them for one person (the paper counts this kind of network, "
            f"{family.alignment.kind} alignment and {family.input_size} px input, as the same person from "
            f"{family.threshold:.3f})")
        self.path, self.digest = path, digest


def load_recognizer(path: str | Path, threshold: float | None = None) -> FaceRecognizer:
    """The recogniser in ``path``, its format told by suffix and by the state dict's keys,
    and its same-person ``threshold``: the one stated, else the one its content is known by
    (UnknownRecognizerError when neither)."""
    path = Path(path)
    digest = sha256(path)
    check_installed(path, digest)
    model = _read_recognizer(path)
    known = KNOWN_FILES.get(digest)
    if threshold is None and known is None:
        raise UnknownRecognizerError(path, digest, model)
    model.threshold = threshold if threshold is not None else known.threshold
    return model


def _read_recognizer(path: Path) -> FaceRecognizer:
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return onnx_recognizer(path)
    if suffix not in STATE_DICT_SUFFIXES:
        raise ValueError(f"{path.name}: face recognisers are {ONNX_SUFFIXES + STATE_DICT_SUFFIXES} files")
    state = read_state_dict(path)
    if "input_layer.0.weight" in state:
        return ir_se_recognizer(state, path.name)
    if "conv2d_1a.conv.weight" in state:
        return facenet_recognizer(state, path.name)
    raise ValueError(f"{path.name} is neither an IR-SE (InsightFace_Pytorch) nor a FaceNet "
                     f"InceptionResnetV1 state dict (first keys: {list(state)[:4]})")


KNOWN_MODELS = (
    *(KnownModel(m.folder, m.file, m.what, m.source, m.licence) for m in WHEEL_RECOGNIZERS),
    KnownModel("insightface", "models/buffalo_l/w600k_r50.onnx", "ArcFace R50 of insightface's buffalo_l pack",
               "insightface model zoo (github.com/deepinsight/insightface, python-package README)",
               "non-commercial research only"),
    KnownModel("insightface", "models/antelopev2/glintr100.onnx", "ArcFace R100 of insightface's antelopev2 pack",
               "insightface model zoo", "non-commercial research only"),
    KnownModel("arcface", "model_ir_se50.pth", "IR-SE50 ArcFace of the reference code",
               "the InsightFace_Pytorch release (github.com/TreB1eN/InsightFace_Pytorch, 'IR-SE50')",
               "MIT code; weights trained on MS1M, check their terms"),
    KnownModel("facenet", "20180402-114759-vggface2.pt", "FaceNet InceptionResnetV1, VGGFace2",
               "facenet-pytorch releases (github.com/timesler/facenet-pytorch/releases, v2.2.9)",
               "MIT code; VGGFace2-trained weights, check their terms"),
)

# The recogniser the nodes and workflows use unless told otherwise: trained, differentiable,
# Apache-2.0, installed by the setup.
DEFAULT_RECOGNIZER = f"{SFACE.folder}/{SFACE.file}"

# Files of insightface packs that are not recognisers (detectors, landmarks, swappers).
NOT_RECOGNISERS = SCRFD_FILES | {"1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "inswapper_128.onnx"}


def is_recognizer_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in ONNX_SUFFIXES + STATE_DICT_SUFFIXES and path.name not in NOT_RECOGNISERS


def find_recognizer(name: str, folders: list[str]) -> Path:
    return find_face_model(name, folders, KNOWN_MODELS, "face recogniser")
