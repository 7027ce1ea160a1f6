"""Configuration as dataclasses that round-trip through JSON (torch-free)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class HeadConfig:
    """The knowledge-extraction head: learnable queries reading the backbone's image tokens."""

    layers: int = 7  # decoder layers L: self-attention -> cross-attention -> feed-forward; 0 = projection only
    queries: int = 12  # learnable query tokens Nq
    width: int | None = None  # model width; None = the backbone's token width (768 for ViT-B-16)
    heads: int = 12  # attention heads; must divide the width
    ffn: int = 3072  # hidden size of the feed-forward block
    dropout: float = 0.1  # dropout on the queries' entry and inside every block
    memory_norm: bool = True  # LayerNorm on the image tokens before the decoder (qks/head.py)
    zero_shot: bool = False  # add the backbone's own zero-shot scores, weighted, to the head's (qks/model.py)


# The paper's recipes (Zhu et al., section 4): NUS-WIDE L=7, Nq=12; Open Images L=8, Nq=22.
RECIPES: dict[str, HeadConfig] = {
    "nuswide": HeadConfig(layers=7, queries=12),
    "openimages": HeadConfig(layers=8, queries=22),
}


@dataclass
class ModelConfig:
    """A QKS model: a frozen backbone, the head, and how labels are scored."""

    backbone: str = "openclip:ViT-B-16:openai"  # registry spec, see qks.backbones
    head: HeadConfig = field(default_factory=HeadConfig)
    drop_cls: bool = False  # drop the CLS token from the image tokens the head reads
    scoring: str = "max"  # "max" over queries (the paper) or "topk" (sum of the k best; ablation)
    scoring_k: int = 1  # k for "topk" scoring
    prompts: str = "default"  # prompt pool: "default" (shipped) or a path to a text file

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        head = dict(d.pop("head", {}))
        # Checkpoints from before memory_norm and zero_shot existed were trained without them.
        head.setdefault("memory_norm", False)
        head.setdefault("zero_shot", False)
        head = HeadConfig(**head)
        return cls(head=head, **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))
