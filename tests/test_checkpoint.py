from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config

from qks.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint


def test_checkpoint_round_trip_holds_no_backbone_weights(tiny_checkpoint, tiny_backbone):
    ckpt = load_checkpoint(tiny_checkpoint)
    assert ckpt["seen"] == ["cat", "dog", "car"] and ckpt["unseen"] == ["bird", "traffic light"]
    assert not any(k.startswith("backbone") or k.startswith("model.") for k in ckpt["head"])
    model = model_from_checkpoint(ckpt, backbone=tiny_backbone)
    assert model.config == tiny_model_config()
    for k, v in model.head.state_dict().items():
        torch.testing.assert_close(v, ckpt["head"][k])
    assert not model.training


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable qks checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a qks checkpoint"):
        load_checkpoint(other)
