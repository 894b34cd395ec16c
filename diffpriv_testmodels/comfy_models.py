"""Generate seeded random-weight models with the real shapes, for the demo, tests and benchmarks.

Run in its own process, since it imports ComfyUI: ``python -m diffpriv_testmodels.comfy_models
OUT_DIR`` (COMFYUI_DIR or the embedded host is found automatically). The `diffpriv
--demo-weights` option, the tests and the benchmarks use it. The models are built with ComfyUI's own classes, so
ComfyUI's loaders accept them exactly as they accept real files:

- ``checkpoints/dp-test-sd15.safetensors``: an SD1.5 checkpoint (real text encoder and VAE
  shapes; the UNet keeps model_channels 320 and context_dim 768 so it is detected as SD1.5,
  but has one level and one res block); with ``--unet sd15`` the UNet has SD1.5's full
  architecture (860 M parameters, for benchmarks at the real cost);
- ``clip_vision/dp-test-vitl14.safetensors``: a CLIP ViT-L/14 @224 image encoder;
- ``insightface/models/dp-test/dp-test-arcface.onnx``: a small IResNet (insightface's ArcFace
  family) exported by torch's TorchScript exporter in the pack layout: input ``input.1``
  [N, 3, 112, 112], 512-d output. Like real exports it holds de-duplicated initializers
  routed through Identity nodes (equal PReLU slopes).

Random weights make no pictures: the files exist to exercise code paths for real.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn
# torch's own layers, not comfy.ops (comfy-test's rule): these networks only give state-dict files
# the real shapes; none runs inside ComfyUI.
from torch.nn import Conv2d, Linear

GENERATOR_VERSION = "1"
CHECKPOINT = "checkpoints/dp-test-sd15.safetensors"
DEMO_CHECKPOINT = "checkpoints/dp-demo-sd15.safetensors"  # the checkpoint's name with --unet demo
CLIP_VISION = "clip_vision/dp-test-vitl14.safetensors"
ARCFACE_ONNX = "insightface/models/dp-test/dp-test-arcface.onnx"
# Random weights have no operating point of their own: the tests and --demo-weights state ArcFace's
# (the paper's L2 0.8), as a user states the threshold of a recogniser file the pack does not know.
TEST_THRESHOLD = 0.68

UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
    context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
    use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    use_temporal_resblock=False, use_temporal_attention=False,
)
# ComfyUI's own SD1.5 UNet configuration (comfy/model_detection.py), for real-cost benchmarks.
SD15_UNET_CONFIG = dict(
    UNET_CONFIG, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
)
UNETS = {"test": UNET_CONFIG, "sd15": SD15_UNET_CONFIG, "demo": UNET_CONFIG}
# A random UNet's noise prediction swings far more with its input than a trained one's, so
# key-I's fixed-point inversion only converges over many small steps (50 for the test UNet).
# The demo's UNet has its output layer scaled down: its prediction is gentle, and a key-I of
# a few steps gives the original back exactly, which the demo can then show in seconds.
DEMO_OUTPUT_SCALE = 0.01
VAE_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
                'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


def _import_comfy() -> Path:
    from diffpriv_client.embedded import find_comfyui

    comfy_dir = find_comfyui()
    sys.path.insert(0, str(comfy_dir))
    from comfy.cli_args import args

    args.cpu = True  # the generator needs no accelerator, and must not ask for one
    return comfy_dir


@torch.no_grad()
def init_weights(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Deterministic init by module type: norms to identity, embeddings N(0, 0.02),
    everything else U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with zero bias. Many of ComfyUI's
    GroupNorms are not named "norm", so go by type, not name."""
    for m in module.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        elif isinstance(m, torch.nn.Embedding):
            m.weight.normal_(0.0, 0.02, generator=generator)
        else:
            for name, p in m.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_()
                elif p.ndim >= 2:
                    fan_in = p[0].numel()
                    p.uniform_(-fan_in**-0.5, fan_in**-0.5, generator=generator)
                else:  # class embeddings, position embeddings held as parameters, scales
                    p.normal_(0.0, 0.02, generator=generator)


def _save(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # One metadata key only: the file's bytes must not change from run to run.
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, path)


def make_checkpoint(path: Path, seed: int, unet: str = "test") -> None:
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.sd1_clip import SDClipModel

    ops = comfy.ops.disable_weight_init
    g = torch.Generator().manual_seed(seed)
    state = {}
    model = UNetModel(**UNETS[unet], dtype=torch.float32, device="cpu", operations=ops)
    init_weights(model, g)
    if unet == "demo":
        with torch.no_grad():
            for p in model.out.parameters():
                p.mul_(DEMO_OUTPUT_SCALE)
    state.update({f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()})
    vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    init_weights(vae, g)
    state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    clip = SDClipModel(device="cpu", dtype=torch.float32)
    init_weights(clip.transformer, g)
    state.update({f"cond_stage_model.transformer.{k}": v for k, v in clip.transformer.state_dict().items()})
    _save(state, path)


def make_clip_vision(path: Path, seed: int) -> None:
    import json

    import comfy.clip_model
    import comfy.ops

    config_path = Path(comfy.clip_model.__file__).parent / "clip_vision_config_vitl.json"
    config = json.loads(config_path.read_text())
    model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    init_weights(model, torch.Generator().manual_seed(seed))
    _save(model.state_dict(), path)


class IBasicBlock(nn.Module):
    """insightface's IResNet block (recognition/arcface_torch/backbones/iresnet.py)."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.prelu = nn.PReLU(width)
        self.conv2 = Conv2d(width, width, 3, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.downsample = nn.Sequential(Conv2d(in_channels, width, 1, 2, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        return self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x)))))) + self.downsample(x)


class SmallIResNet(nn.Module):
    """IResNet with one block per stage and narrow widths: 112 px -> 7 x 7 -> 512-d."""

    def __init__(self, widths=(16, 16, 32, 32)):
        super().__init__()
        self.conv1 = Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.prelu = nn.PReLU(widths[0])
        blocks, channels = [], widths[0]
        for width in widths:
            blocks.append(IBasicBlock(channels, width))
            channels = width
        self.layers = nn.Sequential(*blocks)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = Linear(channels * 7 * 7, 512)
        self.features = nn.BatchNorm1d(512)

    def forward(self, x):
        x = self.bn2(self.layers(self.prelu(self.bn1(self.conv1(x)))))
        return self.features(self.fc(torch.flatten(x, 1)))


@torch.no_grad()
def randomise_batch_norms(module: nn.Module) -> None:
    """Trained-looking running statistics, so the eval-mode networks are not trivial."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.1)


def make_arcface_onnx(path: Path) -> None:
    net = SmallIResNet()
    randomise_batch_norms(net)
    # PReLU slopes keep their 0.25 initialisation: equal slopes of equal width are
    # de-duplicated by the exporter into Identity nodes, as in real exports.
    net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter, as for real insightface files (onnx2torch cannot convert the
    # dynamo exporter's ReduceMean-18); its deprecation notice is no news for the user.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False, opset_version=11,
                          input_names=["input.1"], output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "None"}, "embedding": {0: "None"}})


def make_arcface_file(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    make_arcface_onnx(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a models/ folder to write into")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--unet", choices=list(UNETS), default="test",
                        help="test: one-level UNet (fast); sd15: SD1.5's full UNet (real cost, 1.7 GB file); "
                             "demo: the test UNet with a gentle output (--demo-weights)")
    args = parser.parse_args(argv)
    _import_comfy()
    checkpoint = DEMO_CHECKPOINT if args.unet == "demo" else CHECKPOINT
    for rel, make in ((checkpoint, partial(make_checkpoint, unet=args.unet)), (CLIP_VISION, make_clip_vision),
                      (ARCFACE_ONNX, make_arcface_file)):
        target = args.out / rel
        if not target.exists():
            make(target, args.seed)
            print(f"wrote {target}")


if __name__ == "__main__":
    main()
