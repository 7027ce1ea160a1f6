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
    transfer_rows,
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


def test_transfer_rows_are_the_images_that_show_a_held_out_concept(monkeypatch):
    shows = np.array([True, False, True, True, False])
    assert transfer_rows(shows, 0).tolist() == [0, 2, 3]
    import qks.validation as v

    monkeypatch.setattr(v, "TRANSFER_MAX", 2)
    rows = transfer_rows(shows, 0)
    assert len(rows) == 2 and set(rows) <= {0, 2, 3} and list(rows) == sorted(rows)
    assert transfer_rows(np.zeros(4, bool), 0).size == 0


def test_validate_picks_the_weight_that_scores_best():
    rng = np.random.default_rng(0)
    n, trained, held = 200, 6, 4
    t_tr = np.where(rng.random((n, trained)) < 0.3, 1, -1)
    t_ho = np.where(rng.random((n, held)) < 0.3, 1, -1)
    # The head knows the trained labels only; the zero-shot scores know the held-out ones.
    part_tr = (t_tr * 2.0, rng.normal(size=(n, trained)), t_tr)
    part_ho = (rng.normal(size=(n, held)), t_ho * 1.0, t_ho)
    rec = validate(part_tr, part_ho, (1,))
    assert set(rec) == {"trained", "held_out", "score", "zero_shot_weight"}
    scale = scale_weight(part_tr[0], part_tr[1])
    assert rec["zero_shot_weight"] / scale in WEIGHT_GRID and rec["zero_shot_weight"] > 0
    assert rec["held_out"]["map"] > 0.9  # the weight lets the zero-shot part rank the held-out labels
    assert rec["score"] == pytest.approx(rec["trained"]["score"] + rec["held_out"]["score"])
    # No grid weight does better on both parts relative to each part's best.
    grid = [[part_metrics(h + m * scale * z, t, (1,))["score"] for h, z, t in (part_tr, part_ho)] for m in WEIGHT_GRID]
    best = [max(g[i] for g in grid) for i in range(2)]
    relative = lambda g: g[0] / best[0] + g[1] / best[1]  # noqa: E731
    chosen = [rec["trained"]["score"], rec["held_out"]["score"]]
    assert all(relative(g) <= relative(chosen) + 1e-12 for g in grid)


def test_validate_balances_the_parts_relative_to_their_best():
    """A part with a larger score range does not decide the weight alone: on these parts (seed 34) the
    plain sum of the part scores would take 1 x the scale weight, the relative rule takes 0.5 x."""
    rng = np.random.default_rng(34)
    n = 300
    t_tr = np.where(rng.random((n, 8)) < 0.3, 1, -1)
    t_ho = np.where(rng.random((n, 4)) < 0.3, 1, -1)
    trained = (t_tr * 1.0 + rng.normal(size=(n, 8)), rng.normal(size=(n, 8)), t_tr)
    held = (rng.normal(size=(n, 4)), t_ho + rng.normal(size=(n, 4)), t_ho)
    scale = scale_weight(trained[0], trained[1])
    plain = max(WEIGHT_GRID, key=lambda m: sum(part_metrics(h + m * scale * z, t, (1, 3))["score"]
                                               for h, z, t in (trained, held)))
    assert plain == 1.0
    rec = validate(trained, held, (1, 3))
    assert rec["zero_shot_weight"] == pytest.approx(0.5 * scale)
    alone = validate(trained, None, (1, 3))
    assert rec["zero_shot_weight"] > alone["zero_shot_weight"]  # the held-out concepts pull the weight up


def test_validate_without_the_zero_shot_term_or_held_out_concepts():
    targets = np.array([[1, -1], [-1, 1]])
    rec = validate((np.array([[1.0, 0.0], [0.0, 1.0]]), None, targets), None, (1,))
    assert set(rec) == {"trained", "score"} and rec["score"] == 2.0


def test_scale_weight_matches_spreads():
    head, zs = np.array([0.0, 4.0]), np.array([0.0, 0.5])
    assert scale_weight(head, zs) == pytest.approx(8.0)
    assert scale_weight(head, np.zeros(2)) == 0.0
