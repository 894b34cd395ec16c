"""Stage I: the MSI module (multi-scale image features -> one pseudo-token per stage) and
key-E, the per-stage conditionings it produces for one image.

Architecture (method.md, "Stage I - MSI"): five CLIP ViT-L/14 hidden states; stage i reads
layer i // 2; per layer mean over tokens -> Linear(1024, 768) -> Linear(768, 768) (no
biases) -> L2-normalise = v; u = E[i] * v with a learned Embedding(10, 768); self-attention
then cross-attention (8 heads x 64, q/k/v without bias, dropout 0.05); Dropout + Linear(768,
768) -> the pseudo-token that replaces the placeholder "*" in the text encoder's input.

Each stage reads one vector, so both attentions act on a sequence of length 1, as in the
reference code (its ``Attentions`` block): the softmax over a single key is 1, so the
attention mixes nothing. The self-attention's output only feeds the cross-attention's query,
which no longer matters, so it gets no gradient; the cross-attention reduces to its value and
output projections. We keep the structure (and its ~10.6 M parameters) because it is the
module the paper describes and its code trains.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
# torch's own layers, not comfy.ops (comfy-test's rule): MSI is trained per image from their
# initialisation, which comfy.ops' layers skip, and the core imports no ComfyUI.
from torch.nn import Embedding, Linear

from .adapters.protocols import TextEncoder
from .clip_features import FEATURE_BLOCKS
from .key_types import KeyE
from .schedule import STAGES


@dataclass(frozen=True)
class MSIShape:
    """Widths of the module; the defaults are the reference code's (CLIP ViT-L/14 in, SD1.x text
    out, 8 heads of 64).
    Tests shrink them to run tiny host models."""

    feature_dim: int = 1024
    token_dim: int = 768
    heads: int = 8
    head_dim: int = 64
    dropout: float = 0.05
    one_embedding: bool = False  # the "Ours-OE" ablation: last layer only, one C for every stage


class Attention(nn.Module):
    """Multi-head attention as in latent diffusion's CrossAttention: q/k/v without bias, an
    output projection with bias followed by dropout."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = Linear(dim, inner, bias=False)
        self.to_k = Linear(dim, inner, bias=False)
        self.to_v = Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (proj(src).view(b, -1, self.heads, proj.out_features // self.heads).transpose(1, 2)
                   for proj, src in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        # The sequences here have length 1, so the softmax is trivially 1 and attention reduces
        # to the value/output projections: q and k never matter, and since the self-attention
        # output only feeds the cross-attention's query, the whole self-attention block gets no
        # gradient. The structure is kept because it is the paper's module (~10.6 M params).
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class MSI(nn.Module):
    """Maps the CLIP features of one image to the pseudo-token of each requested stage."""

    def __init__(self, shape: MSIShape = MSIShape()):
        super().__init__()
        self.shape = shape
        layers = 1 if shape.one_embedding else len(FEATURE_BLOCKS)
        self.project = nn.ModuleList(
            nn.Sequential(Linear(shape.feature_dim, shape.token_dim, bias=False),
                          Linear(shape.token_dim, shape.token_dim, bias=False))
            for _ in range(layers))
        self.stage_embedding = None if shape.one_embedding else Embedding(STAGES, shape.token_dim)
        self.self_attn = Attention(shape.token_dim, shape.heads, shape.head_dim, shape.dropout)
        self.cross_attn = Attention(shape.token_dim, shape.heads, shape.head_dim, shape.dropout)
        self.out = nn.Sequential(nn.Dropout(shape.dropout), Linear(shape.token_dim, shape.token_dim))

    def layer_vectors(self, features: list[torch.Tensor]) -> torch.Tensor:
        """v of every layer the module reads: [B, layers, token_dim], unit length."""
        if len(features) != len(FEATURE_BLOCKS):
            raise ValueError(f"MSI takes {len(FEATURE_BLOCKS)} CLIP hidden states, got {len(features)}")
        used = features[-1:] if self.shape.one_embedding else features
        v = torch.stack([proj(f.mean(dim=1)) for proj, f in zip(self.project, used)], dim=1)
        return F.normalize(v, dim=-1)

    def forward(self, features: list[torch.Tensor], stages: torch.Tensor) -> torch.Tensor:
        """Pseudo-tokens [N, token_dim] for ``stages`` [N] (0..9). ``features`` are the five
        hidden states [B, tokens, feature_dim] with B = N, or B = 1 shared by all stages."""
        v = self.layer_vectors(features).expand(stages.shape[0], -1, -1)
        if self.stage_embedding is None:
            u = v[:, 0]
        else:
            layer = (stages // 2).view(-1, 1, 1).expand(-1, 1, v.shape[-1])
            u = self.stage_embedding(stages) * v.gather(1, layer).squeeze(1)
        u = u.unsqueeze(1)
        h = self.cross_attn(self.self_attn(u), context=u)
        return self.out(h).squeeze(1)


@contextmanager
def evaluating(module: nn.Module):
    """Dropout off for the block, then the module's previous mode back."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def make_key_e(msi: MSI, features: list[torch.Tensor], text: TextEncoder,
               meta: dict[str, str] | None = None) -> KeyE:
    """key-E of the image whose (unflipped) CLIP features are ``features``: C^0..C^9 from the
    trained module in eval mode (no dropout), and UC from the empty prompt."""
    with evaluating(msi), torch.no_grad():
        conds = text.encode_with_token(msi(features, torch.arange(STAGES, device=features[0].device)))
        uc = text.encode_empty()
    return KeyE(conds.detach().float().cpu().contiguous(), uc.detach().float().cpu().contiguous(),
                dict(meta or {}))
