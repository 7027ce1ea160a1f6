"""Knowledge-sharing scoring in numpy: logits from query features and label embeddings, sigmoid,
and the selection of labels per image (`--top-k`, `--threshold`)."""

from __future__ import annotations

import numpy as np


def logits(query_features: np.ndarray, embeddings: np.ndarray, mode: str = "max", k: int = 1) -> np.ndarray:
    """query_features [B, Nq, D], embeddings [L, D] -> logits [B, L] (float32).

    "max": logit[b, l] = max_q <qf[b, q], e[l]> (the paper); "topk": the sum of the k largest dot
    products over the queries.
    """
    qf = np.asarray(query_features, dtype=np.float32)
    emb = np.asarray(embeddings, dtype=np.float32)
    if qf.ndim != 3 or emb.ndim != 2 or qf.shape[2] != emb.shape[1]:
        raise ValueError(f"query features {list(qf.shape)} and embeddings {list(emb.shape)} do not match")
    sims = qf @ emb.T  # [B, Nq, L]
    if mode == "max":
        return sims.max(axis=1)
    if mode == "topk":
        k = max(1, min(int(k), sims.shape[1]))
        return np.sort(sims, axis=1)[:, -k:, :].sum(axis=1)
    raise ValueError(f"unknown scoring mode {mode!r} (max or topk)")


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow for any x (exp of -|x| only underflows to 0; NaN stays NaN)."""
    x = np.asarray(x)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype if x.dtype.kind == "f" else np.float64)


def select(probs: np.ndarray, names: list[str], top_k: int | None = None,
           threshold: float | np.ndarray | None = None) -> list[tuple[str, float]]:
    """One image's labels, most probable first: those with p >= threshold (if given: one float for
    every label, or a float32 array of per-label thresholds in bank order), of those the top k (if
    given). With neither, every label. (For one float this is the same as "the top k, of those
    p >= threshold"; per label it keeps up to k labels that each pass their own threshold.)"""
    probs = np.asarray(probs)
    order = np.argsort(-probs, kind="stable")
    if threshold is not None:
        if np.ndim(threshold) == 0:
            order = order[probs[order] >= threshold]
        else:
            thr = np.asarray(threshold, dtype=np.float32)
            if thr.shape != probs.shape:
                raise ValueError(f"{thr.shape[0] if thr.ndim == 1 else list(thr.shape)} thresholds for "
                                 f"{probs.shape[0]} labels")
            order = order[probs[order] >= thr[order]]
    if top_k is not None:
        order = order[:max(int(top_k), 0)]
    return [(names[i], float(probs[i])) for i in order]


def thresholds_for(bank, top_k: int | None, threshold: float | None) -> float | np.ndarray | None:
    """The threshold argument of `select` for a run, the same rule in every front end: an explicit
    threshold overrides everything (one value for every label); else the bank's per-label thresholds
    when it has them (qks-calibrate; with top_k: at most k labels, each above its own); else 0.5
    unless top_k is given (then none)."""
    if threshold is not None:
        return threshold
    per_label = getattr(bank, "thresholds", None)
    if per_label is not None:
        return per_label
    return None if top_k is not None else 0.5
