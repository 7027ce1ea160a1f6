"""qks.validation: held-out concepts, the validation score and the zero-shot weight fitted on it."""

from __future__ import annotations

import numpy as np
import pytest

from qks.validation import (
    WEIGHT_GRID,
    hold_out_concepts,
    part_metrics,
    scale_weight,
    split_validation,
    validate,
)


def test_hold_out_concepts_is_a_seeded_share_of_the_seen_labels():
    seen = [f"c{i}" for i in range(40)]
    trained, held = hold_out_concepts(seen, 0.1, seed=3)
    assert len(held) == 4 and len(trained) == 36 and sorted(trained + held) == sorted(seen)
    assert trained == [s for s in seen if s not in held]  # order kept
    assert hold_out_concepts(seen, 0.1, seed=3) == (trained, held)
    assert hold_out_concepts(seen, 0.1, seed=4)[1] != held
    assert hold_out_concepts(seen, 0.0, seed=3) == (seen, [])
    assert hold_out_concepts(["a", "b"], 0.01, seed=0)[1] != []  # at least one
    assert hold_out_concepts(["a"], 0.5, seed=0) == (["a"], [])  # never all of them


def test_split_validation_unchanged():
    tr, va = split_validation(100, 0.05, 0)
    assert len(va) == 5 and len(tr) == 95 and not set(tr) & set(va)
    assert split_validation(100, 0.0, 0)[1].size == 0


def test_part_metrics_scores_only_images_with_a_positive():
    targets = np.array([[1, -1], [-1, 1], [-1, -1]])
    perfect = np.array([[2.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    m = part_metrics(perfect, targets, (1,))
    assert m["images"] == 2 and m["map"] == 1.0 and m["f1@1"] == 1.0 and m["score"] == 2.0


def test_validate_picks_the_weight_that_scores_best():
    rng = np.random.default_rng(0)
    n, trained, held = 200, 6, 4
    targets = np.where(rng.random((n, trained + held)) < 0.3, 1, -1)
    signal = targets.astype(float)
    head = np.concatenate([signal[:, :trained] * 2, rng.normal(size=(n, held))], axis=1)  # knows trained only
    zero_shot = np.concatenate([rng.normal(size=(n, trained)), signal[:, trained:] * 0.1], axis=1)  # held-out only
    rec = validate(head, zero_shot, targets, trained, (1,))
    assert set(rec) == {"trained", "held_out", "score", "zero_shot_weight"}
    scale = scale_weight(head, zero_shot)
    assert rec["zero_shot_weight"] / scale in WEIGHT_GRID and rec["zero_shot_weight"] > 0
    assert rec["held_out"]["map"] > 0.9  # the weight lets the zero-shot part rank the held-out labels
    assert rec["score"] == pytest.approx(rec["trained"]["score"] + rec["held_out"]["score"])
    for m in WEIGHT_GRID:  # no grid weight scores better
        s = head + m * scale * zero_shot
        other = part_metrics(s[:, :trained], targets[:, :trained], (1,))["score"] + \
            part_metrics(s[:, trained:], targets[:, trained:], (1,))["score"]
        assert other <= rec["score"] + 1e-12


def test_validate_without_the_zero_shot_term_or_held_out_concepts():
    targets = np.array([[1, -1], [-1, 1]])
    rec = validate(np.array([[1.0, 0.0], [0.0, 1.0]]), None, targets, 2, (1,))
    assert set(rec) == {"trained", "score"} and rec["score"] == 2.0


def test_scale_weight_matches_spreads():
    head, zs = np.array([0.0, 4.0]), np.array([0.0, 0.5])
    assert scale_weight(head, zs) == pytest.approx(8.0)
    assert scale_weight(head, np.zeros(2)) == 0.0
