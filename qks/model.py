"""The QKS model: a frozen backbone, the knowledge-extraction head, and knowledge-sharing scoring."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import create_backbone
from .config import ModelConfig
from .head import QueryHead
from .scoring import score


class QKSModel(nn.Module):
    def __init__(self, config: ModelConfig, backbone=None):
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else create_backbone(config.backbone)
        self.backbone.eval().requires_grad_(False)
        self.head = QueryHead(config.head, self.backbone.token_dim, self.backbone.embed_dim,
                              projection=self.backbone.projection())

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout or batch-norm updates, ever
        return self

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.backbone.image_tokens(pixels)
        return tokens[:, 1:] if self.config.drop_cls else tokens

    def query_features_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens)

    def query_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> query features [B, Nq, D]: the deployed image graph."""
        return self.head(self.image_tokens(pixels))

    def logits(self, query_features: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        return score(query_features, label_embeddings, self.config.scoring, self.config.scoring_k)

    def forward(self, pixels: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        return self.logits(self.query_features(pixels), label_embeddings)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the head only, never the frozen backbone's weights."""
        return {k: v.detach().cpu() for k, v in self.head.state_dict().items()}
