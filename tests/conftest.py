"""Shared fixtures: tiny random-initialised open_clip models, no downloads, everything seeded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from runtime_fixtures import (  # noqa: F401 - fixtures
    _private_cache,
    bundle_copy,
    lite_zero_shot_bundle,
    photo_dir,
    photo_library,
    runtime_bundle,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a pretrained tag fails in seconds, never downloads

DATA = Path(__file__).parent / "data"
TINY_CONFIG = DATA / "qks-tiny-vit.json"
TINY_SPEC = f"openclip:{TINY_CONFIG}:none"


def tiny_model_config(**head):
    from qks.config import HeadConfig, ModelConfig

    defaults = dict(layers=2, queries=4, width=None, heads=4, ffn=96, dropout=0.1)
    defaults.update(head)
    return ModelConfig(backbone=TINY_SPEC, head=HeadConfig(**defaults))


@pytest.fixture(scope="session")
def tiny_backbone():
    from qks.backbones import create_backbone

    return create_backbone(TINY_SPEC)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_backbone, tmp_path_factory):
    """An untrained tiny checkpoint (seeded head) with a few seen and unseen labels."""
    import torch

    from qks.checkpoint import save_checkpoint
    from qks.model import QKSModel

    torch.manual_seed(0)
    model = QKSModel(tiny_model_config(), tiny_backbone)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    prompts = ["a photo of a {}.", "there is a {} in the scene."]
    return save_checkpoint(path, model, seen=["cat", "dog", "car"], unseen=["bird", "traffic light"],
                           prompts=prompts)
