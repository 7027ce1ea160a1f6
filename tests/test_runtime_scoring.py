"""numpy scoring equals qks.scoring (torch); a stable sigmoid; label selection."""

from __future__ import annotations

import numpy as np
import pytest
from qks.runtime.scoring import logits, select, sigmoid


@pytest.mark.parametrize("mode,k", [("max", 1), ("topk", 1), ("topk", 3), ("topk", 99)])
def test_logits_equal_torch_scoring(mode, k):
    import torch

    from qks.scoring import score

    rng = np.random.default_rng(0)
    qf = rng.standard_normal((3, 5, 16)).astype(np.float32)
    emb = rng.standard_normal((7, 16)).astype(np.float32)
    ref = score(torch.from_numpy(qf), torch.from_numpy(emb), mode, k).numpy()
    np.testing.assert_allclose(logits(qf, emb, mode, k), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        logits(qf, emb[:, :8])
    with pytest.raises(ValueError, match="unknown scoring mode"):
        logits(qf, emb, "mean")


def test_sigmoid_is_stable():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p = sigmoid(x)
    assert p.dtype == np.float32 and np.isfinite(p).all()
    assert p[0] == 0.0 and p[2] == 0.5 and p[4] == 1.0
    np.testing.assert_allclose(sigmoid(np.linspace(-8, 8, 33)), 1 / (1 + np.exp(-np.linspace(-8, 8, 33))), rtol=1e-12)


def test_select():
    names = ["a", "b", "c", "d"]
    p = np.array([0.2, 0.9, 0.6, 0.9], dtype=np.float32)
    assert [n for n, _ in select(p, names, threshold=0.5)] == ["b", "d", "c"]
    assert [n for n, _ in select(p, names, top_k=2)] == ["b", "d"]
    assert [n for n, _ in select(p, names, top_k=3, threshold=0.7)] == ["b", "d"]
    assert [n for n, _ in select(p, names)] == ["b", "d", "c", "a"]
