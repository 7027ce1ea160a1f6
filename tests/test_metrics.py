"""qks.metrics against hand-computed cases and a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from qks.metrics import (
    evaluate_selection,
    f1_at_k,
    gzsl_selection,
    mean_average_precision,
    zsl_gzsl_report,
    zsl_selection,
)


def col(*v):
    return np.array(v, dtype=float).reshape(-1, 1)


def test_ap_hand_computed():
    # Positives at ranks 1 and 3: (1/1 + 2/3) / 2.
    r = mean_average_precision(col(0.9, 0.8, 0.7, 0.6), col(1, -1, 1, -1))
    assert r.map == pytest.approx((1 + 2 / 3) / 2)
    # Positives at ranks 2 and 4: (1/2 + 2/4) / 2.
    r = mean_average_precision(col(0.9, 0.8, 0.7, 0.6), col(-1, 1, -1, 1))
    assert r.map == pytest.approx(0.5)


def test_ap_skips_unknown_entries():
    # The unknown at rank 2 is not counted: the positives sit at annotated ranks 1 and 2.
    r = mean_average_precision(col(0.9, 0.8, 0.7, 0.6), col(1, 0, 1, -1))
    assert r.map == pytest.approx(1.0)
    # An unknown above the only positive does not push it down either.
    r = mean_average_precision(col(0.9, 0.8, 0.7), col(0, 1, -1))
    assert r.map == pytest.approx(1.0)


def test_label_without_positive_counts_as_zero():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.3]])
    targets = np.array([[1, -1], [-1, -1], [-1, 0]])
    r = mean_average_precision(scores, targets)
    assert r.ap.tolist() == [1.0, 0.0]
    assert r.map == pytest.approx(0.5)
    assert r.map_labels_with_positives == pytest.approx(1.0)
    assert (r.labels, r.labels_with_positives) == (2, 1)


def test_ties_are_pessimistic():
    assert mean_average_precision(col(0.5, 0.5), col(1, -1)).map == pytest.approx(0.5)
    assert mean_average_precision(col(0.5, 0.5), col(-1, 1)).map == pytest.approx(0.5)
    # A constant score: every positive ranks after every negative.
    r = mean_average_precision(col(1, 1, 1, 1), col(1, -1, -1, 1))
    assert r.map == pytest.approx((1 / 3 + 2 / 4) / 2)


def brute_ap(s, t):
    keep = t != 0
    s, t = s[keep], t[keep]
    order = sorted(range(len(s)), key=lambda i: -s[i])
    hits, precisions = 0, []
    for rank, i in enumerate(order, 1):
        if t[i] > 0:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions) if precisions else 0.0


def test_ap_matches_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    scores = rng.random((60, 9))  # distinct almost surely: no ties
    targets = rng.choice([-1, 0, 1], size=(60, 9), p=[0.6, 0.2, 0.2])
    targets[:, 4] = -1  # one label with no positive
    r = mean_average_precision(scores, targets)
    expected = [brute_ap(scores[:, j], targets[:, j]) for j in range(9)]
    np.testing.assert_allclose(r.ap, expected, rtol=1e-12)
    assert r.map == pytest.approx(np.mean(expected))


def test_ap_blocks_give_the_same_answer(monkeypatch):
    import qks.metrics as m

    rng = np.random.default_rng(1)
    scores, targets = rng.random((50, 13)), rng.choice([-1, 0, 1], size=(50, 13))
    whole = m.average_precision_per_label(scores, targets)
    monkeypatch.setattr(m, "_BLOCK_ELEMENTS", 100)  # 2 labels per block
    np.testing.assert_array_equal(m.average_precision_per_label(scores, targets), whole)


def test_f1_at_k_hand_computed():
    scores = np.array([[0.9, 0.1, 0.8, 0.3], [0.2, 0.7, 0.6, 0.1]])
    targets = np.array([[1, -1, -1, 1], [-1, 1, 1, 1]])
    r = f1_at_k(scores, targets, 2)
    # Top 2: image 0 -> labels 0, 2 (1 TP); image 1 -> labels 1, 2 (2 TP). 5 positives.
    assert (r.precision, r.recall) == (pytest.approx(3 / 4), pytest.approx(3 / 5))
    assert r.f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert (r.images, r.positives, r.k) == (2, 5, 2)
    # K larger than the label count is clamped to it.
    assert f1_at_k(scores, targets, 10).k == 4


def test_f1_ties_are_pessimistic_and_unknowns_take_slots():
    scores = np.array([[0.5, 0.5, 0.5]])
    assert f1_at_k(scores, np.array([[1, -1, -1]]), 1).precision == 0.0
    assert f1_at_k(scores, np.array([[1, -1, -1]]), 2).precision == 0.0
    assert f1_at_k(scores, np.array([[1, -1, -1]]), 3).precision == pytest.approx(1 / 3)
    # An unknown at the top is a prediction, not a hit.
    r = f1_at_k(np.array([[0.9, 0.8, 0.1]]), np.array([[0, 1, -1]]), 1)
    assert (r.precision, r.recall, r.f1) == (0.0, 0.0, 0.0)


def test_f1_matches_brute_force():
    rng = np.random.default_rng(2)
    scores, targets = rng.random((40, 11)), rng.choice([-1, 0, 1], size=(40, 11))
    for k in (1, 3, 5):
        top = np.argsort(-scores, axis=1)[:, :k]
        tp = sum(int(targets[i, j] > 0) for i in range(40) for j in top[i])
        r = f1_at_k(scores, targets, k)
        assert r.precision == pytest.approx(tp / (40 * k))
        assert r.recall == pytest.approx(tp / (targets > 0).sum())


def test_zsl_and_gzsl_selection():
    targets = np.array([
        [1, -1, -1],   # seen positive only: GZSL, not ZSL
        [-1, 1, -1],   # unseen positive: both
        [-1, -1, -1],  # no positive: neither
        [0, 0, 1],     # unseen positive with unknowns: both
    ])
    unseen = np.array([False, True, True])
    images, labels = zsl_selection(targets, unseen)
    assert images.tolist() == [1, 3] and labels.tolist() == [1, 2]
    images, labels = gzsl_selection(targets)
    assert images.tolist() == [0, 1, 3] and labels.tolist() == [0, 1, 2]


def test_report_has_every_metric():
    rng = np.random.default_rng(3)
    targets = rng.choice([-1, 1], size=(20, 6), p=[0.7, 0.3])
    scores = rng.random((20, 6))
    rep = zsl_gzsl_report(scores, targets, np.array([0, 0, 0, 1, 1, 1], bool), (3, 5))
    for split in ("zsl", "gzsl"):
        assert set(rep[split]) >= {"images", "map", "map_labels_with_positives", "f1"}
        assert set(rep[split]["f1"]) == {"3", "5"}
    sel = evaluate_selection(scores, targets, *zsl_selection(targets, np.array([0, 0, 0, 1, 1, 1], bool)), (3,))
    assert sel == {**rep["zsl"], "f1": {"3": rep["zsl"]["f1"]["3"]}}


def test_bad_inputs():
    with pytest.raises(ValueError, match="targets must be"):
        mean_average_precision(np.zeros((2, 2)), np.full((2, 2), 2))
    with pytest.raises(ValueError, match="must both be"):
        f1_at_k(np.zeros((2, 2)), np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="NaN"):
        mean_average_precision(np.full((1, 1), np.nan), np.ones((1, 1)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_both_sort_paths_agree_on_ties_signs_and_zeros(dtype):
    # 2.0 (-); 0.0 (+) ties -0.0 (-); -1.0 (+) ties -1.0 (-): positives at ranks 3 and 5.
    s = col(0.0, -0.0, -1.0, -1.0, 2.0).astype(dtype)
    t = col(1, -1, 1, -1, -1)
    assert mean_average_precision(s, t).map == pytest.approx((1 / 3 + 2 / 5) / 2)
    rng = np.random.default_rng(4)
    scores = rng.integers(-3, 4, size=(30, 5)).astype(dtype)  # many ties
    targets = rng.choice([-1, 0, 1], size=(30, 5))
    np.testing.assert_array_equal(mean_average_precision(scores, targets).ap,
                                  mean_average_precision(scores.astype(np.float64), targets).ap)
