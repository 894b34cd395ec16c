"""Keys made in the test process that the test server accepts: random tensors with the
metadata the pack writes (the test checkpoint's fingerprint, the grid, key-I bound to its
key-E)."""
from __future__ import annotations

import functools

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from diffpriv_core import key_format as fmt
from diffpriv_core import keys

from diffpriv_core.key_types import PAIR, KeyE, KeyI, key_e_id
from diffpriv_core.schedule import ddim_grid

UNET_PREFIX = "model.diffusion_model."  # where an SD 1.x checkpoint keeps the UNet


@functools.cache
def test_fingerprint() -> str:
    """The fingerprint the server computes for the test checkpoint's UNet."""
    from diffpriv_testmodels import cache
    from diffpriv_testmodels.comfy_models import CHECKPOINT

    return checkpoint_fingerprint(str(cache.comfy_test_models() / CHECKPOINT))


@functools.cache
def checkpoint_fingerprint(path: str) -> str:
    """The fingerprint the server computes for the UNet of the checkpoint at ``path``."""
    with safe_open(path, "pt") as f:
        unet = [(k[len(UNET_PREFIX):], f.get_tensor(k)) for k in f.keys() if k.startswith(UNET_PREFIX)]
    return keys.model_fingerprint(unet)


def random_key_e(seed: int, checkpoint: str | None = None) -> KeyE:
    g = torch.Generator().manual_seed(seed)
    return KeyE(torch.randn(10, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g),
                {"checkpoint": checkpoint or test_fingerprint()})


def key_i_for(key_e: KeyE, steps: int, latent: torch.Tensor | None = None, mode: str = "ddim", refine: int = 0,
              below: torch.Tensor | None = None, **meta: str) -> KeyI:
    """A key-I bound to ``key_e`` (random 8 x 8 latent unless given); a bdia key-I also gets
    its second latent, ``below`` (random, of the latent's shape, unless given)."""
    latent = torch.randn(4, 8, 8) if latent is None else latent
    if mode == fmt.BDIA and below is None:
        below = torch.randn(latent.shape, generator=torch.Generator().manual_seed(steps))
    meta = {"checkpoint": key_e.meta["checkpoint"], "grid": ddim_grid(steps).describe(), PAIR: key_e_id(key_e),
            **meta}
    return KeyI(latent, steps, mode, refine, meta, below=below)


def forge(tensors: dict, version: str = fmt.VERSION, **meta) -> bytes:
    """A plain key file with a valid digest around whatever tensors and metadata are given
    (what anyone can write: the digest detects damage, not forgery)."""
    meta = {"format": fmt.FORMAT, "version": version, **meta}
    meta[fmt.DIGEST] = keys._digest(meta, tensors)
    return save_bytes(tensors, metadata={fmt.META_KEY: fmt.canonical_json(meta)})


def install_key_e(path, seed: int) -> None:
    """A random key-E at ``path`` on a test server, once (key files are never replaced)."""
    if not path.exists():
        keys.save_key(path, random_key_e(seed))
