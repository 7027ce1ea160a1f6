"""The QKS model: a frozen backbone, the knowledge-extraction head, and knowledge-sharing scoring.

With `head.zero_shot`, a label's logit is the head's plus the backbone's own zero-shot score, weighted:

    logit[b, l] = max_q <h[b, q], e[l]> + w * (max_m <z[b, m], e[l]> - <r, e[l]>)

(`z`: the backbone's `zero_shot_features`; `w`: the head's `zero_shot_weight`; `r`: its
`zero_shot_offset`, a reference feature: without it every label's logit would rise by w times its
typical zero-shot score, and every probability would be near 1). A sum of two maxes is one max over all
pairs, so the deployed query features are the pairs `h[b, q] + w * (z[b, m] - r)` ([B, Nq * M, D]) and
the runtime, the C++ library and Triton score them as any head's: a max of raw dot products. Training
and evaluation take the cheaper sum of the two maxes: the same numbers.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from .backbones import create_backbone
from .config import ModelConfig
from .head import QueryHead
from .scoring import score


class QKSModel(nn.Module):
    def __init__(self, config: ModelConfig, backbone=None):
        super().__init__()
        if config.head.zero_shot and config.scoring != "max":
            raise ValueError("the zero-shot term needs max scoring (a sum of maxes is a max over pairs)")
        self.config = config
        self.backbone = backbone if backbone is not None else create_backbone(config.backbone)
        self.backbone.eval().requires_grad_(False)
        self.head = QueryHead(config.head, self.backbone.token_dim, self.backbone.embed_dim,
                              projection=self.backbone.projection())

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout or batch-norm updates, ever
        return self

    @property
    def zero_shot(self) -> bool:
        return bool(self.config.head.zero_shot)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """The backbone's tokens, CLS included (what --cached-tokens stores)."""
        with torch.no_grad():
            return self.backbone.image_tokens(pixels)

    def head_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The head's query features [B, Nq, D] (the head reads the tokens without their prefix tokens,
        CLS and registers, if drop_cls)."""
        return self.head(tokens[:, self.prefix_tokens:] if self.config.drop_cls else tokens)

    @property
    def prefix_tokens(self) -> int:
        return int(getattr(self.backbone, "prefix_tokens", 1))

    def zero_shot_features(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone.zero_shot_features(tokens)

    def query_features_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The deployed query features: the head's, or with the zero-shot term every pair
        h_q + w * z_m ([B, Nq * M, D])."""
        qf = self.head_features(tokens)
        if not self.zero_shot:
            return qf
        z = self.head.zero_shot_weight * (self.zero_shot_features(tokens) - self.head.zero_shot_offset)
        return (qf.unsqueeze(2) + z.unsqueeze(1)).flatten(1, 2)

    def query_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> query features: the deployed image graph."""
        return self.query_features_from_tokens(self.image_tokens(pixels))

    def logits(self, query_features: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        return score(query_features, label_embeddings, self.config.scoring, self.config.scoring_k)

    def logit_parts(self, tokens: torch.Tensor, label_embeddings: torch.Tensor, precision=nullcontext,
                    zero_shot: bool = True):
        """(the head's logits [B, L], the backbone's zero-shot logits less the offset's [B, L], or None
        without the term or with `zero_shot=False`). The head runs under `precision()` (an autocast
        context); scoring is fp32: magnitudes matter."""
        with precision():
            qf = self.head_features(tokens)
        head = self.logits(qf.float(), label_embeddings)
        if not (self.zero_shot and zero_shot):
            return head, None
        zs = score(self.zero_shot_features(tokens.float()), label_embeddings)
        return head, zs - self.head.zero_shot_offset @ label_embeddings.T

    def logits_from_tokens(self, tokens: torch.Tensor, label_embeddings: torch.Tensor,
                           precision=nullcontext) -> torch.Tensor:
        """= logits(query_features_from_tokens(tokens)), computed as the sum of the two maxes."""
        head, zs = self.logit_parts(tokens, label_embeddings, precision)
        return head if zs is None else head + self.head.zero_shot_weight * zs

    def forward(self, pixels: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        return self.logits_from_tokens(self.image_tokens(pixels), label_embeddings)

    @torch.no_grad()
    def set_zero_shot_offset(self, features: torch.Tensor, label_embeddings: torch.Tensor) -> None:
        """The offset from the zero-shot features [N, M, D] of some training images: their mean, scaled
        so that its score matches the images' mean zero-shot score over these labels (scale 1 where
        M = 1, as for CLIP; the max over lite's 49 locations sits above the mean location's score)."""
        mean = features.float().mean(dim=(0, 1))
        typical = score(features.float(), label_embeddings).mean()
        base = (label_embeddings @ mean).mean()
        self.head.zero_shot_offset.copy_(mean * (typical / base) if base.abs() > 1e-12 else mean)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the head only, never the frozen backbone's weights."""
        return {k: v.detach().cpu() for k, v in self.head.state_dict().items()}
