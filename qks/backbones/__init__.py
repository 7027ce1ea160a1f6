"""A registry of named backbones: `create_backbone("openclip:ViT-B-16:openai")`.

A spec is `<kind>:<argument>`; each kind registers a factory `(argument, spec) -> Backbone`.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Backbone, Preprocess, ZeroShotRule, module_fingerprint

_REGISTRY: dict[str, Callable[[str, str], Backbone]] = {}


def register_backbone(kind: str, factory: Callable[[str, str], Backbone]) -> None:
    _REGISTRY[kind] = factory


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(spec: str) -> Backbone:
    kind, _, arg = spec.partition(":")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown backbone {spec!r}: the kind must be one of {', '.join(list_backbones())}")
    return _REGISTRY[kind](arg, spec)


def _openclip(arg: str, spec: str) -> Backbone:
    from .openclip import create  # lazy: open_clip is imported only when used

    return create(arg, spec)


register_backbone("openclip", _openclip)


def _lite(arg: str, spec: str) -> Backbone:
    from .lite import create  # lazy: the lite models load only when used

    return create(arg, spec)


register_backbone("lite", _lite)

__all__ = ["Backbone", "Preprocess", "ZeroShotRule", "create_backbone", "list_backbones", "module_fingerprint", "register_backbone"]
