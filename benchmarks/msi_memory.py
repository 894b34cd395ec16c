"""Memory an MSI training call holds per latent: what MSI Inversion's batch_size can be on a card.

    python benchmarks/msi_memory.py [--dtype bf16 fp32]

MSI backpropagates through the frozen SD1.5 UNet to the conditioning, so each latent of a
call keeps the activations its backward needs until the backward runs. This builds
ComfyUI's own SD1.5 UNet (full shape, random weights: the bytes do not depend on the
values) on the CPU in bf16 (as ComfyUI runs it in half precision on a card) and in fp32,
runs one forward on 1 and on 2 latents of 64 x 64 (a 512 px face crop) with the
conditioning requiring a gradient, and adds up the distinct storages autograd
saves for the backward. The growth from 1 to 2 latents is the memory per latent; what does
not grow is the weights the backward needs (the model's own). Attention probability matrices (tokens x
tokens) are counted apart: the UNet runs ComfyUI's default attention on a CUDA card,
PyTorch's scaled_dot_product_attention, whose fused CUDA kernels keep none (the CPU's kernel
keeps some).

The figures are a lower bound of a card's peak (the backward's own temporaries come on
top), so the batch they imply is halved for headroom in the last line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2 ** 30
TOKEN_COUNTS = (64 * 64, 32 * 32, 16 * 16, 8 * 8)  # the UNet's attention levels on a 64 x 64 latent
CARD_GIB = 24
# Besides the UNet: SD1.5's text encoder (123 M parameters), CLIP ViT-L/14's vision tower
# (304 M) and the VAE (84 M) in fp16, the CUDA context and allocator slack (about 1 GiB).
OTHERS_GIB = (123 + 304 + 84) * 1e6 * 2 / GIB + 1.0


def saved_bytes(unet, latents: int) -> tuple[float, float]:
    """(GiB saved for the backward apart from attention matrices, GiB of attention matrices)
    of one forward on ``latents`` latents."""
    import torch

    kept: dict[int, int] = {}
    attention: dict[int, int] = {}
    alive = []  # held until counted, so that no storage's address is reused by another

    def pack(t):
        alive.append(t)
        storage = t.untyped_storage()
        square = t.ndim >= 2 and t.shape[-1] == t.shape[-2] and t.shape[-1] in TOKEN_COUNTS
        (attention if square else kept)[storage.data_ptr()] = storage.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randn(latents, 4, 64, 64, generator=g).to(unet.dtype)
    context = torch.randn(latents, 77, 768, generator=g).to(unet.dtype).requires_grad_()
    timesteps = torch.full((latents,), 500.0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, timesteps, context=context)
    return sum(kept.values()) / GIB, sum(attention.values()) / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    args = parser.parse_args()
    import torch

    from diffpriv_testmodels.comfy_models import SD15_UNET_CONFIG
    from diffpriv_testmodels.inprocess import load_host_in_process

    load_host_in_process()
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    # ComfyUI's default attention on a CUDA card. On the CPU it would choose by free memory
    # (split or sub-quadratic chunks), which moves what is kept from run to run.
    attention.optimized_attention = attention.attention_pytorch

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    torch.manual_seed(0)
    unets = {name: UNetModel(**SD15_UNET_CONFIG, dtype=dtypes[name], operations=comfy.ops.disable_weight_init)
             .to(dtypes[name]).requires_grad_(False) for name in args.dtype}
    weights_fp16 = sum(p.numel() for p in next(iter(unets.values())).parameters()) * 2 / GIB
    print(f"SD1.5 UNet ({weights_fp16 * GIB / 2 / 1e6:.0f} M parameters, {weights_fp16:.2f} GiB in fp16), one "
          "forward with the conditioning requiring a gradient, 64 x 64 latents; GiB that autograd keeps for the "
          "backward (CPU, counted, not timed).\n")
    print("| MSI call in | per latent | per latent, attention matrices (not kept on CUDA) | weights kept |")
    print("|---|---|---|---|")
    per_latent, weights_kept = {}, {}
    for dtype, unet in unets.items():
        one, two = saved_bytes(unet, 1), saved_bytes(unet, 2)
        per_latent[dtype], weights_kept[dtype] = two[0] - one[0], 2 * one[0] - two[0]
        print(f"| {dtype} | {per_latent[dtype]:.2f} | {two[1] - one[1]:.2f} | {weights_kept[dtype]:.2f} |")
    if "bf16" in per_latent:  # the weights it keeps are the model's own
        room = CARD_GIB - OTHERS_GIB - weights_fp16
        print(f"\nOn a {CARD_GIB} GiB card with ComfyUI's fp16 models (UNet {weights_fp16:.1f} GiB, text encoder, CLIP "
              f"vision and VAE, context: {OTHERS_GIB:.1f} GiB): about {room:.0f} GiB for activations, "
              f"{room / per_latent['bf16']:.0f} latents of bf16 MSI at {per_latent['bf16']:.2f} GiB each; half of "
              f"that for the backward's temporaries: **{int(room / per_latent['bf16'] / 2)} latents per call**.")


if __name__ == "__main__":
    main()
