"""The knowledge-extraction head: learnable query tokens that read the backbone's image tokens.

Each of L layers is self-attention over the queries, cross-attention from the queries to the
image tokens, and a feed-forward block, each followed by a residual and LayerNorm (post-LN). The
query outputs are projected C -> D into the text space (`projection`, initialised from the
backbone's own visual projection), giving query features [B, Nq, D].

`memory_norm` puts a LayerNorm on the image tokens before the decoder reads them. open_clip's tokens
already come out of one (almost the identity then); the lite backbone's have a per-dimension scale
of about 0.04, which next to the unit-scale queries left cross-attention nearly inert for the first
hundred steps (benchmarks/RESULTS.md).

`layers=0` is the projection-only ablation: no queries and no decoder; every image token goes through
the projection, so the "query features" are [B, N, D] and each label takes its best location.

`zero_shot` gives the head two buffers (qks/model.py): `zero_shot_weight`, how much of the backbone's
own zero-shot score is added to the head's, and `zero_shot_offset` [D], a reference feature whose score
is subtracted first, so that the added term is about zero on average and probabilities keep their
meaning. Neither is trained by gradient: training sets the offset from the training images before the
first epoch and fits the weight after every epoch on the validation split (qks/validation.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import HeadConfig


class Attention(nn.Module):
    """Multi-head attention on `F.scaled_dot_product_attention` (exports to plain ONNX ops)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"head width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        return x.reshape(b, n, self.heads, w // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(query)), self._split(self.k(memory)), self._split(self.v(memory))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        b, h, n, d = x.shape
        return self.out(x.transpose(1, 2).reshape(b, n, h * d))


class DecoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(width, heads, dropout)
        self.norm1 = nn.LayerNorm(width)
        self.cross_attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, width))
        self.norm3 = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.norm1(q + self.drop(self.self_attn(q, q)))
        q = self.norm2(q + self.drop(self.cross_attn(q, memory)))
        return self.norm3(q + self.drop(self.ffn(q)))


class QueryHead(nn.Module):
    """Image tokens [B, N, C] -> query features [B, Nq, D] ([B, N, D] with layers=0)."""

    def __init__(self, cfg: HeadConfig, token_dim: int, embed_dim: int, projection: torch.Tensor | None = None):
        super().__init__()
        width = cfg.width or token_dim
        if cfg.layers < 0:
            raise ValueError(f"head layers must be >= 0, got {cfg.layers}")
        # No parameter the forward does not use: queries only with layers, token_proj only when the
        # head is narrower or wider than the tokens.
        self.projection_only = cfg.layers == 0
        if not self.projection_only:
            self.queries = nn.Parameter(torch.randn(cfg.queries, width) * 0.02)
            self.query_norm = nn.LayerNorm(width)
            self.query_drop = nn.Dropout(cfg.dropout)
        self.token_proj = nn.Linear(token_dim, width) if width != token_dim else None
        self.memory_norm = nn.LayerNorm(width) if cfg.memory_norm and not self.projection_only else None
        self.layers = nn.ModuleList(
            DecoderLayer(width, cfg.heads, cfg.ffn, cfg.dropout) for _ in range(cfg.layers)
        )
        if cfg.zero_shot:
            self.register_buffer("zero_shot_weight", torch.tensor(0.0))
            self.register_buffer("zero_shot_offset", torch.zeros(embed_dim))
        self.projection = nn.Parameter(torch.empty(width, embed_dim))
        if projection is not None and tuple(projection.shape) == (width, embed_dim):
            with torch.no_grad():
                self.projection.copy_(projection)
        else:
            nn.init.normal_(self.projection, std=width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        memory = tokens if self.token_proj is None else self.token_proj(tokens)
        if self.projection_only:
            return memory @ self.projection
        if self.memory_norm is not None:
            memory = self.memory_norm(memory)
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        q = self.query_drop(self.query_norm(q))
        for layer in self.layers:
            q = layer(q, memory)
        return q @ self.projection
