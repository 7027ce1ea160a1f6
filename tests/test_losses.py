"""Each loss against a direct computation on small hand-made cases, unknown targets included."""

from __future__ import annotations

import math

import pytest
import torch

from qks.losses import asl, bce, get_loss, ranking

LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.5, -2.0]])
TARGETS = torch.tensor([[1, -1, 0], [-1, 1, 1]])


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_asl_by_hand():
    # gamma_neg 4, gamma_pos 0, clip 0: positive -log p, negative -p^4 log(1-p); unknown as negative.
    terms = [
        -math.log(sig(2.0)),
        -(sig(-1.0) ** 4) * math.log(1 - sig(-1.0)),
        -(sig(0.5) ** 4) * math.log(1 - sig(0.5)),
        -(sig(0.0) ** 4) * math.log(1 - sig(0.0)),
        -math.log(sig(1.5)),
        -math.log(sig(-2.0)),
    ]
    assert asl(LOGITS, TARGETS).item() == pytest.approx(sum(terms) / 6 * 1000, rel=1e-5)
    masked = sum(terms) - terms[2]  # the unknown entry is ignored
    assert asl(LOGITS, TARGETS, masked=True).item() == pytest.approx(masked / 6 * 1000, rel=1e-5)


def test_asl_clip_shifts_negatives():
    logits, targets = torch.tensor([[0.0]]), torch.tensor([[-1]])
    p = 0.5 - 0.05
    expected = -(p**4) * math.log(1 - p) * 1000
    assert asl(logits, targets, clip=0.05).item() == pytest.approx(expected, rel=1e-5)


def test_bce_by_hand():
    terms = [
        -math.log(sig(2.0)), -math.log(1 - sig(-1.0)), -math.log(1 - sig(0.5)),
        -math.log(1 - sig(0.0)), -math.log(sig(1.5)), -math.log(sig(-2.0)),
    ]
    assert bce(LOGITS, TARGETS).item() == pytest.approx(sum(terms) / 6, rel=1e-5)
    assert bce(LOGITS, TARGETS, masked=True).item() == pytest.approx((sum(terms) - terms[2]) / 5, rel=1e-5)


def test_ranking_by_hand():
    # image 0: pos {2.0}, neg {-1.0}: max(0, 1 - 2 + -1) = 0
    # image 1: pos {1.5, -2.0}, neg {0.0}: max(0, 1 - 1.5 + 0) = 0, max(0, 1 + 2 + 0) = 3
    assert ranking(LOGITS, TARGETS).item() == pytest.approx(3 / 3)
    assert ranking(LOGITS, TARGETS, margin=0.0).item() == pytest.approx(2 / 3)


def test_losses_registry():
    for name in ("asl", "asl-masked", "bce", "bce-masked", "ranking"):
        assert torch.isfinite(get_loss(name)(LOGITS, TARGETS))
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("focal")
