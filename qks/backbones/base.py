"""The `Backbone` protocol: what the QKS head and the exporter need from a frozen encoder pair."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the backbone's input; the runtime reproduces it without torch."""

    size: int  # output side in pixels (square)
    resize_mode: str  # "shortest": shortest side to `size`, then centre crop; "squash": both sides
    interpolation: str  # "bicubic" | "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ZeroShotRule:
    """How a backbone alone scores an image against a label text: `logit = scale * s + bias`,
    probability `sigmoid(logit)`, where `s` is the cosine of the two embeddings (`normalize`) or their
    raw dot product. `trained_with` says what that probability means: "sigmoid" (SigLIP's per-pair loss:
    a calibrated probability per label), "softmax" (CLIP's contrastive loss: a score, not calibrated),
    "none" (a backbone never trained on pairs, such as lite)."""

    trained_with: str
    scale: float
    bias: float
    calibrated: bool
    normalize: bool

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Backbone(Protocol):
    """A frozen vision-language pair.

    `image_tokens(pixels) -> [B, N, C]` and `encode_text(token_ids) -> [L, D]`; `projection` is the
    backbone's own C -> D image projection (or None when it has none), used to initialise the head's.
    `zero_shot_features(tokens) -> [B, M, D]` are the image features the backbone alone scores labels
    with (`max_m <z_m, e>`): its zero-shot classifier, which the head's scores can be added to.
    """

    spec: str  # the registry name it was built from
    family: str  # the image tower's family ("openclip-vit", "timm", "modified-resnet", "lite")
    prefix_tokens: int  # leading non-spatial tokens (CLS, registers) of image_tokens
    token_dim: int  # C
    embed_dim: int  # D
    context_length: int  # T, tokens per text
    preprocess: Preprocess

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor: ...

    def tokenize(self, texts: list[str]) -> torch.Tensor: ...

    def projection(self) -> torch.Tensor | None: ...

    def zero_shot_features(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def zero_shot_rule(self) -> ZeroShotRule: ...

    def text_fingerprint(self) -> str: ...

    def tokenizer_json(self) -> str:
        """The tokenizer as Hugging Face `tokenizers` JSON, with truncation and padding set so that
        `Tokenizer.from_str(s).encode_batch(texts)` gives exactly `tokenize(texts)` (ids [N, T])."""
        ...


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers: identifies the exact weights (cache keys)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
