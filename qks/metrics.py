"""Multi-label metrics on numpy arrays: scores [images, labels], targets in {+1, -1, 0 (unknown)}.

- `mean_average_precision`: per label over the annotated entries only (target != 0), the
  non-interpolated AP (the mean of the precision at each positive's rank). A label with no positive
  counts as AP 0 in `map` (what the published numbers use); `map_labels_with_positives` is the mean
  over the labels that have at least one positive.
- `f1_at_k`: micro F1 of the top-K labels of every image: P = TP / (images x K), R = TP / positives.
- `zsl_selection` / `gzsl_selection`: the images and labels each protocol scores.

Ties are broken pessimistically everywhere: among equal scores, the entries that are not positive
rank first. A constant predictor therefore gets no credit from the order its inputs came in.

Everything is vectorised over images; mAP walks the labels in blocks only to bound memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Elements per block in the mAP sort: bounds the temporary index arrays to a few hundred MB.
_BLOCK_ELEMENTS = 1 << 24


@dataclass
class MAPResult:
    map: float  # mean AP over all labels, a label with no positive counting as 0
    map_labels_with_positives: float  # mean AP over the labels with at least one positive (nan if none)
    labels: int  # labels scored
    labels_with_positives: int
    ap: np.ndarray  # [labels] AP per label (0 for a label with no positive)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("ap")
        return d


@dataclass
class F1Result:
    k: int
    precision: float
    recall: float
    f1: float
    images: int
    positives: int

    def to_dict(self) -> dict:
        return asdict(self)


def _check(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be [images, labels]")
    if not np.isin(targets, (-1, 0, 1)).all():
        raise ValueError("targets must be -1, 0 or +1")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores, targets


def _descending_pessimistic_order(s: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Per row of s [labels, images]: indices by score descending, non-positives first among ties."""
    if s.dtype in (np.float16, np.float32):
        # One integer sort instead of a two-key sort: float32 bits made monotone (+0.0 folds -0.0),
        # doubled, plus 1 for a positive, so a positive sorts after every equal non-positive.
        bits = (s.astype(np.float32) + np.float32(0)).view(np.int32).astype(np.int64)
        key = -2 * np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) + pos
        return np.argsort(key, axis=1)
    return np.lexsort((pos, -s), axis=1)  # lexsort's last key is the primary one


def average_precision_per_label(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[labels] non-interpolated AP per label over annotated entries; 0 where a label has no positive."""
    scores, targets = _check(scores, targets)
    n, n_labels = scores.shape
    ap = np.zeros(n_labels, dtype=np.float64)
    if n == 0:
        return ap
    block = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, n_labels, block):
        # Labels as contiguous rows: sorting and cumulative sums run along memory.
        s = np.ascontiguousarray(scores[:, start:start + block].T)
        t = np.ascontiguousarray(targets[:, start:start + block].T)
        pos = t > 0
        order = _descending_pessimistic_order(s, pos)
        pos_sorted = np.take_along_axis(pos, order, axis=1)
        valid_sorted = np.take_along_axis(t != 0, order, axis=1)
        rank = np.cumsum(valid_sorted, axis=1)  # rank among annotated entries (unknowns skipped)
        hits = np.cumsum(pos_sorted, axis=1)
        precision = np.where(pos_sorted, hits / np.maximum(rank, 1), 0.0)
        n_pos = pos.sum(axis=1)
        ap[start:start + block] = np.where(n_pos > 0, precision.sum(axis=1) / np.maximum(n_pos, 1), 0.0)
    return ap


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> MAPResult:
    scores, targets = _check(scores, targets)
    ap = average_precision_per_label(scores, targets)
    has_pos = (targets > 0).any(axis=0)
    n_labels = ap.shape[0]
    return MAPResult(
        map=float(ap.mean()) if n_labels else float("nan"),
        map_labels_with_positives=float(ap[has_pos].mean()) if has_pos.any() else float("nan"),
        labels=int(n_labels),
        labels_with_positives=int(has_pos.sum()),
        ap=ap,
    )


def f1_at_k(scores: np.ndarray, targets: np.ndarray, k: int) -> F1Result:
    """Micro F1@K. The top K of every image (K clamped to the number of labels) are predictions;
    TP counts positives among them; unknown entries in the top K are predictions that are not TP."""
    scores, targets = _check(scores, targets)
    n, n_labels = scores.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, n_labels)
    pos = targets > 0
    positives = int(pos.sum())
    if n == 0 or n_labels == 0:
        return F1Result(k, 0.0, 0.0, 0.0, int(n), positives)
    # The K-th largest score per image; everything above it is in the top K, and of the entries
    # tied with it, the free slots go to non-positives first (pessimistic ties).
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]
    above = scores > kth
    tied = scores == kth
    slots = k - above.sum(axis=1)
    tied_neg = (tied & ~pos).sum(axis=1)
    tied_pos = (tied & pos).sum(axis=1)
    tp = int((above & pos).sum() + np.clip(slots - tied_neg, 0, tied_pos).sum())
    precision = tp / (n * k)
    recall = tp / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return F1Result(int(k), float(precision), float(recall), float(f1), int(n), positives)


def zsl_selection(targets: np.ndarray, unseen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ZSL: the unseen labels only, on the images with at least one unseen positive.

    `unseen` is a boolean mask over the label columns. Returns (image indices, label indices)."""
    targets = np.asarray(targets)
    unseen = np.asarray(unseen, dtype=bool)
    labels = np.flatnonzero(unseen)
    images = np.flatnonzero((targets[:, labels] > 0).any(axis=1))
    return images, labels


def gzsl_selection(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GZSL: every label, on the images with at least one positive."""
    targets = np.asarray(targets)
    return np.flatnonzero((targets > 0).any(axis=1)), np.arange(targets.shape[1])


def evaluate_selection(scores: np.ndarray, targets: np.ndarray, images: np.ndarray, labels: np.ndarray,
                       topk: tuple[int, ...]) -> dict:
    """mAP and F1@K for each K on scores[images][:, labels]; a JSON-ready dict."""
    s = np.asarray(scores)[np.ix_(images, labels)]
    t = np.asarray(targets)[np.ix_(images, labels)]
    out: dict = {"images": int(len(images)), **mean_average_precision(s, t).to_dict()}
    out["f1"] = {str(k): f1_at_k(s, t, k).to_dict() for k in topk}
    return out


def zsl_gzsl_report(scores: np.ndarray, targets: np.ndarray, unseen: np.ndarray,
                    topk: tuple[int, ...]) -> dict:
    """{"zsl": {...}, "gzsl": {...}}, each as `evaluate_selection` returns it."""
    scores, targets = _check(scores, targets)
    return {
        "zsl": evaluate_selection(scores, targets, *zsl_selection(targets, unseen), topk),
        "gzsl": evaluate_selection(scores, targets, *gzsl_selection(targets), topk),
    }
