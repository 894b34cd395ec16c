"""Face recognisers: every file format loads into a frozen, differentiable FaceEmbedder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
# torch's own layers, not comfy.ops: a stand-in network for the test.
from torch.nn import Conv2d

from diffpriv_core.faces import recognizers
from diffpriv_core.faces.model_files import MissingFaceModelError
from diffpriv_core.faces.recognizers import find_recognizer, load_recognizer
from diffpriv_testmodels.face_models import ARCFACE_ONNX, FACENET, IR_SE50, TEST_THRESHOLD


@pytest.fixture(scope="module")
def arcface_onnx(face_models):
    return load_recognizer(face_models / ARCFACE_ONNX, TEST_THRESHOLD)


def faces(size: int, count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_is_face_embedder(model, size: int) -> None:
    """Unit vectors, frozen parameters, and a gradient that reaches the input."""
    assert model.input_size == size
    x = faces(size, count=1).requires_grad_(True)
    emb = model(x)
    assert emb.shape == (1, 512)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    emb[0, :8].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_arcface_onnx_pack_loads_and_matches_onnxruntime(face_models, arcface_onnx):
    import onnxruntime

    assert_is_face_embedder(arcface_onnx, 112)
    x = faces(112)
    session = onnxruntime.InferenceSession(str(face_models / ARCFACE_ONNX),
                                           providers=["CPUExecutionProvider"])
    # insightface's preprocessing: RGB, (pixel - 127.5) / 127.5
    (reference,) = session.run(None, {"input.1": ((x.numpy() * 255 - 127.5) / 127.5).astype(np.float32)})
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    with torch.no_grad():
        ours = arcface_onnx(x).numpy()
    assert np.abs(ours - reference).max() < 1e-4


def test_ir_se50_loads_from_pth_and_safetensors_alike(face_models, tmp_path):
    from safetensors.torch import save_file

    pth = face_models / IR_SE50
    from_pth = load_recognizer(pth, TEST_THRESHOLD)
    assert_is_face_embedder(from_pth, 112)
    state = torch.load(pth, weights_only=True)
    save_file(state, str(tmp_path / "model_ir_se50.safetensors"))
    from_safetensors = load_recognizer(tmp_path / "model_ir_se50.safetensors", TEST_THRESHOLD)
    x = faces(112, count=1)
    with torch.no_grad():
        assert torch.allclose(from_pth(x), from_safetensors(x), atol=1e-6)


def test_facenet_vggface2_state_dict_loads(face_models):
    model = load_recognizer(face_models / FACENET, TEST_THRESHOLD)
    assert_is_face_embedder(model, 160)
    assert model.input_range == recognizers.FACENET_RANGE


def test_other_sizes_are_resized_to_the_recognisers_input(arcface_onnx):
    with torch.no_grad():
        small = arcface_onnx(torch.nn.functional.interpolate(faces(224), size=112, mode="bilinear",
                                                             antialias=True, align_corners=False))
        large = arcface_onnx(faces(224))
    assert torch.allclose(small, large, atol=1e-5)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"input_layer.0.weight": torch.zeros(1), "payload": recognizers.KnownModel("a", "b", "c", "d", "e")},
               path)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        load_recognizer(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter is the one that writes Identity
def test_identity_routed_weights_convert(tmp_path):
    """Two equal convolutions: the exporter routes the second's weight through an Identity
    node, which onnx2torch cannot follow unless the loader bypasses it."""
    import onnx
    import onnxruntime

    class TwinConvs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Conv2d(3, 3, 3, padding=1)
            self.b = Conv2d(3, 3, 3, padding=1)
            self.b.load_state_dict(self.a.state_dict())

        def forward(self, x):
            return self.b(self.a(x)).mean((2, 3))

    path = tmp_path / "twins.onnx"
    torch.onnx.export(TwinConvs().eval(), (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False, opset_version=11,
                      input_names=["input.1"])
    assert any(n.op_type == "Identity" for n in onnx.load(str(path)).graph.node)
    model = load_recognizer(path, TEST_THRESHOLD)
    x = faces(8, count=1)
    (reference,) = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input.1": (x.numpy() - 0.5) / 0.5})
    reference = reference / np.linalg.norm(reference)
    with torch.no_grad():
        assert np.abs(model(x).numpy() - reference).max() < 1e-5


def test_missing_file_error_names_the_file_the_folders_and_where_to_get_it(tmp_path):
    folders = [str(tmp_path / "models" / "insightface"), str(tmp_path / "elsewhere" / "arcface")]
    with pytest.raises(MissingFaceModelError) as err:
        find_recognizer("w600k_r50.onnx", folders)
    message = str(err.value)
    for expected in ["'w600k_r50.onnx' not found", *folders, "model_ir_se50.pth", "20180402-114759-vggface2.pt",
                     "glintr100.onnx", "non-commercial", "InsightFace_Pytorch", "facenet-pytorch", "nothing is downloaded"]:
        assert expected in message


@pytest.mark.parametrize("layout", ["w600k_r50.onnx", "buffalo_l/w600k_r50.onnx", "models/buffalo_l/w600k_r50.onnx",
                                    "buffalo_l/buffalo_l/w600k_r50.onnx"])
def test_pack_layouts_are_found_by_file_name(tmp_path, layout):
    empty, root = tmp_path / "empty", tmp_path / "insightface"
    (root / layout).parent.mkdir(parents=True)
    (root / layout).write_bytes(b"")
    assert find_recognizer("w600k_r50.onnx", [str(empty), str(root)]) == root / layout
    assert recognizers.is_recognizer_file(root / layout)
    assert not recognizers.is_recognizer_file((root / layout).with_name("det_10g.onnx"))


def test_mxnet_era_packs_get_raw_pixels(tmp_path):
    """insightface's rule: a graph that starts with Sub and Mul standardises by itself."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Sub", ["data", "mean"], ["centred"], name="_minusscalar0"),
         helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mulscalar0"),
         helper.make_node("Flatten", ["scaled"], ["fc1"], name="flatten0")],
        "mxnet_like",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 48])],
        [helper.make_tensor("mean", TensorProto.FLOAT, [], [127.5]),
         helper.make_tensor("scale", TensorProto.FLOAT, [], [0.0078125])])
    path = tmp_path / "mxnet_like.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(path))
    model = load_recognizer(path, TEST_THRESHOLD)
    assert model.input_range == recognizers.PIXEL_RANGE and model.input_size == 4
    x = faces(4, count=1)
    expected = torch.nn.functional.normalize(((x * 255 - 127.5) * 0.0078125).flatten(1), dim=-1)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)
