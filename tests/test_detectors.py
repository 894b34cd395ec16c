"""insightface's SCRFD detector, when the user has its file: found in the model folders,
run through insightface's own SCRFD class, coordinates back in photo pixels.

No real SCRFD weights exist here, so the test builds an ONNX file with SCRFD's interface
(input [1, 3, H, W], nine outputs: scores, box distances and landmark offsets at strides 8,
16 and 32, two anchors per cell) whose "face" is any bright region: the detections must
land on the bright square of a test image."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffpriv_core.faces.detect import detect_faces, find_detector
from diffpriv_core.faces.model_files import MissingFaceModelError

pytest.importorskip("insightface", reason="insightface is an optional extra")
KEYPOINTS = torch.tensor([[-1.0, -0.5], [1.0, -0.5], [0.0, 0.0], [-0.7, 1.0], [0.7, 1.0]])  # in cells


class BrightSquareSCRFD(nn.Module):
    """Fires at stride 16 where the red channel is bright over a 7-cell window (highest
    where the window lies wholly inside a bright region); boxes reach 3 cells each way from
    the cell's anchor."""

    def forward(self, x):
        scores, boxes, points = [], [], []
        for stride in (8, 16, 32):
            red = F.avg_pool2d(x[:, :1], 7 * stride, stride=stride, padding=3 * stride)  # [1, 1, H/s, W/s]
            score = torch.sigmoid(20 * (red - 0.5)) * (1.0 if stride == 16 else 0.0)
            per_anchor = score.repeat(1, 2, 1, 1).permute(0, 2, 3, 1).reshape(-1, 1)
            ones = torch.ones_like(per_anchor)
            scores.append(per_anchor)
            boxes.append(ones.repeat(1, 4) * 3.0)
            points.append(ones * KEYPOINTS.reshape(1, 10))
        return (*scores, *boxes, *points)


def write_scrfd(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    torch.onnx.export(BrightSquareSCRFD(), torch.zeros(1, 3, 640, 640), str(path), input_names=["input.1"],
                      output_names=names, dynamic_axes={"input.1": {2: "h", 3: "w"}}, opset_version=17,
                      dynamo=False)
    return path


def test_scrfd_detections_come_back_in_photo_pixels(tmp_path):
    path = write_scrfd(tmp_path / "insightface" / "models" / "buffalo_l" / "det_10g.onnx")
    photo = torch.zeros(320, 480, 3)
    photo[120:216, 192:288] = 1.0  # a white 96 px square, centre (240, 168)
    faces = detect_faces(photo, min_score=0.5, min_size=20, detector=path)
    assert faces, "the bright square is found"
    x1, y1, x2, y2 = faces[0].box
    assert abs((x1 + x2) / 2 - 240) < 16 and abs((y1 + y2) / 2 - 168) < 16
    # 3 cells of 16 px each way in the 640 px input, which is 480 * 4/3: 72 px each way here.
    assert abs((x2 - x1) - 72) < 4 and abs((y2 - y1) - 72) < 4
    (lx, ly), (rx, ry) = faces[0].landmarks[:2]
    assert lx < rx and abs(ly - ry) < 1 and abs(lx - (x1 + x2) / 2 + 12) < 1
    assert detect_faces(torch.zeros(320, 480, 3), min_score=0.5, detector=path) == []


def test_a_missing_detector_names_the_folders_and_where_to_get_it(tmp_path):
    with pytest.raises(MissingFaceModelError) as err:
        find_detector("det_10g.onnx", [str(tmp_path)])
    message = str(err.value)
    assert "face detector file 'det_10g.onnx' not found" in message and str(tmp_path) in message
    assert "models/insightface/models/buffalo_l/det_10g.onnx" in message and "insightface model zoo" in message
    target = write_scrfd(tmp_path / "buffalo_l" / "det_10g.onnx")
    assert find_detector("det_10g.onnx", [str(tmp_path)]) == target


def test_face_detect_offers_and_uses_the_detector_files_it_finds(comfy_inproc, tmp_path, monkeypatch):
    import folder_paths

    nodes = comfy_inproc.pack.nodes.faces
    write_scrfd(tmp_path / "models" / "buffalo_l" / "det_10g.onnx")
    paths = folder_paths.folder_names_and_paths["insightface"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(tmp_path), *paths[0]], paths[1]))
    options = nodes.detector_options()
    assert options[0] == "mtcnn" and "insightface/models/buffalo_l/det_10g.onnx" in options
    photo = torch.zeros(1, 320, 480, 3)
    photo[:, 120:216, 192:288] = 1.0
    (faces,), mask = nodes.FaceDetect.execute(photo, "all", 0, 20, 0.5, "error",
                                              "insightface/models/buffalo_l/det_10g.onnx").args
    assert faces and mask[0, 168, 240] == 1
    with pytest.raises(MissingFaceModelError, match="antelopev2/scrfd_10g_bnkps.onnx"):
        nodes.FaceDetect.execute(photo, "all", 0, 20, 0.5, "error", "insightface/models/antelopev2/scrfd_10g_bnkps.onnx")
