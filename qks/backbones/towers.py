"""One adapter per open_clip image-tower family: what the QKS head and the zero-shot path need.

An adapter gives three things, through the libraries' public APIs where they have one:
- `tokens(pixels) -> [B, N, C]`: the image tokens the head reads (a ViT's final tokens after its norm,
  prefix tokens first; a conv tower's last feature map as H*W tokens);
- `pool(tokens) -> [B, D]`: the tower's own image embedding computed from those tokens (attention pool,
  CLS or average pool, the projection), i.e. what `model.encode_image` gives, unnormalised;
- `projection() -> [C, D] | None`: the linear map from a token into the embedding space that initialises
  the head's projection (None where the tower has none that is linear).

Families (`TOWERS`, tried in order; `register_tower` adds one):
- `openclip-vit`: open_clip's VisionTransformer (OpenAI CLIP, LAION ViTs, CoCa's attention pooling);
- `timm`: open_clip's TimmModel over any timm trunk with `forward_features`/`forward_head`: ViTs with
  CLS, average or MAP pooling (SigLIP, SigLIP2), EVA02, ConvNeXt, FastViT (MobileCLIP, MobileCLIP2);
- `modified-resnet`: open_clip's ModifiedResNet (the RN50 family, attention pooled).
Anything else is refused in one line that names the tower's class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class Tower(nn.Module):
    """The adapter interface; `family` names it in the manifest and in errors."""

    family = "?"
    prefix_tokens = 0  # leading non-spatial tokens (CLS, registers) in `tokens`

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def projection(self) -> torch.Tensor | None:
        return None


def _linear_t(layer) -> torch.Tensor | None:
    """A bias-free view of an nn.Linear as a [in, out] matrix (what `x @ W` needs)."""
    return layer.weight.detach().T.clone() if isinstance(layer, nn.Linear) else None


def _compose(*mats: torch.Tensor | None) -> torch.Tensor | None:
    if any(m is None for m in mats):
        return None
    out = mats[0]
    for m in mats[1:]:
        out = out @ m
    return out


def _as_map(tokens: torch.Tensor) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W] for a square grid (inputs are square crops)."""
    b, n, c = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} image tokens do not form a square feature map")
    return tokens.transpose(1, 2).reshape(b, c, side, side)


def _as_tokens(fmap: torch.Tensor) -> torch.Tensor:
    return fmap.flatten(2).transpose(1, 2)


class OpenClipViT(Tower):
    """open_clip VisionTransformer. Tokens: the last block's output (CLS first) after `ln_post`; with
    CoCa's original attention pooling, the pooler's queries after `ln_post` (its first is the pooled one)."""

    family = "openclip-vit"
    prefix_tokens = 1

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.attn_pool_type = getattr(visual, "attn_pool_type", "") if visual.attn_pool is not None else None

    def _raw(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(pixels, indices=1, intermediates_only=True, output_fmt="NLC",
                                                output_extra_tokens=True)
        return torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        v, x = self.visual, self._raw(pixels)
        if self.attn_pool_type == "":  # CoCa as open_clip trains it: pool first, then the norm
            return v.ln_post(v.attn_pool(x))
        if v.final_ln_after_pool and self.attn_pool_type is None:
            return x  # the norm applies to the pooled token only (the head's memory_norm normalises these)
        return v.ln_post(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if self.attn_pool_type in ("parallel", "cascade"):
            pooled = v.attn_pool_contrastive(tokens if self.attn_pool_type == "parallel" else v.attn_pool(tokens))
            pooled = pooled[:, 0]
        elif v.pool_type == "avg":
            pooled = tokens[:, 1:].mean(dim=1)
        else:  # "tok" (and CoCa's first pooler query)
            pooled = tokens[:, 0]
        if v.final_ln_after_pool and self.attn_pool_type is None:
            pooled = v.ln_post(pooled)
        return pooled @ v.proj if v.proj is not None else pooled

    def projection(self) -> torch.Tensor | None:
        proj = self.visual.proj
        return None if proj is None else proj.detach().clone()


class TimmTower(Tower):
    """open_clip TimmModel: `trunk.forward_features` gives the tokens ([B, N, C], or a feature map, NCHW or
    NHWC as the trunk's `output_fmt` says, flattened), `trunk.forward_head` then open_clip's head give the
    embedding."""

    family = "timm"

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.trunk = visual.trunk
        self.prefix_tokens = int(getattr(self.trunk, "num_prefix_tokens", 0) or 0)
        self.channels_last = getattr(self.trunk, "output_fmt", "NCHW") == "NHWC"  # Swin, MambaOut
        with torch.no_grad():  # a map or tokens? (fixed by the architecture; the grid by the input size)
            self.spatial = self.trunk.forward_features(torch.zeros(1, 3, *visual.image_size)).ndim == 4

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.trunk.forward_features(pixels)
        if not self.spatial:
            return x
        return x.flatten(1, 2) if self.channels_last else _as_tokens(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        if self.spatial:
            x = _as_map(tokens)
            x = x.permute(0, 2, 3, 1) if self.channels_last else x
        return self.visual.head(self.trunk.forward_head(x))

    def projection(self) -> torch.Tensor | None:
        proj = getattr(self.visual.head, "proj", None)
        if proj is not None:
            return _linear_t(proj)
        if len(self.visual.head) == 0:  # the trunk's own classifier is the projection
            classifier = self.trunk.get_classifier()
            attn_pool = getattr(self.trunk, "attn_pool", None)
            if attn_pool is not None:  # MAP (SigLIP): a token's path is the pool's value and output maps
                c = attn_pool.kv.in_features
                value = attn_pool.kv.weight.detach()[c:].T
                first = _compose(value, _linear_t(attn_pool.proj))
                return first if isinstance(classifier, nn.Identity) else _compose(first, _linear_t(classifier))
            return _linear_t(classifier)
        return None


class ModifiedResNetTower(Tower):
    """open_clip ModifiedResNet: layer4's map as tokens; its attention pool gives the embedding."""

    family = "modified-resnet"

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.visual.forward_intermediates(pixels, indices=1, intermediates_only=True)["image_intermediates"][-1]
        return _as_tokens(fmap)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.visual.attnpool(_as_map(tokens))

    def projection(self) -> torch.Tensor | None:
        pool = self.visual.attnpool  # a token's value, then the output projection
        return _compose(_linear_t(pool.v_proj), _linear_t(pool.c_proj))


@dataclass(frozen=True)
class TowerFamily:
    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], Tower]


def _class_is(module: str, name: str) -> Callable[[nn.Module], bool]:
    return lambda visual: any(c.__name__ == name and c.__module__.endswith(module) for c in type(visual).__mro__)


TOWERS: list[TowerFamily] = [
    TowerFamily("openclip-vit", _class_is("open_clip.transformer", "VisionTransformer"), OpenClipViT),
    TowerFamily("timm", _class_is("open_clip.timm_model", "TimmModel"), TimmTower),
    TowerFamily("modified-resnet", _class_is("open_clip.modified_resnet", "ModifiedResNet"), ModifiedResNetTower),
]


def register_tower(family: TowerFamily) -> None:
    """Add an adapter for another tower family (tried before the built-in ones)."""
    TOWERS.insert(0, family)


def tower_for(visual: nn.Module, arch: str) -> Tower:
    for family in TOWERS:
        if family.matches(visual):
            return family.build(visual)
    supported = ", ".join(f.name for f in TOWERS)
    raise ValueError(f"{arch}: image tower {type(visual).__name__} is not supported (supported families: {supported})")
