"""Checkpoints: the head, the config, the label lists and the backbone reference — never the frozen
backbone's weights. Written atomically; loaded with `weights_only=True` (no arbitrary unpickling).

A checkpoint is a dict:
    {"format": "qks-checkpoint", "version": 1, "config": ModelConfig dict, "head": state_dict,
     "seen": [labels], "unseen": [labels], "prompts": [templates], "train_state": {...} or absent}
`train_state` (optimizer, scheduler, epoch, RNG, ...) is what `qks-train --resume` needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import ModelConfig
from .model import QKSModel

FORMAT = "qks-checkpoint"
VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why, in one line."""


def save_checkpoint(path: str | Path, model: QKSModel, seen: list[str], unseen: list[str],
                    prompts: list[str], train_state: dict | None = None) -> Path:
    path = Path(path)
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "head": model.head_state_dict(),
        "seen": list(seen),
        "unseen": list(unseen),
        "prompts": list(prompts),
    }
    if train_state is not None:
        ckpt["train_state"] = train_state
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a killed run never leaves half a checkpoint
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable qks checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a qks checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')!r} is not supported (expected {VERSION})")
    return ckpt


def model_from_checkpoint(ckpt: dict | str | Path, backbone=None) -> QKSModel:
    """Rebuild the model (backbone from its reference, head from the checkpoint), in eval mode."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    model = QKSModel(ModelConfig.from_dict(ckpt["config"]), backbone=backbone)
    model.head.load_state_dict(ckpt["head"])
    return model.eval()
