"""Validation during training: what is held out, the score that drives the schedule and `best.pt`,
and the zero-shot weight fitted on it.

- Images: `split_validation` carves a share of the training manifest (never the test set).
- Concepts (`--val-concepts`): a share of the seen labels is held out of training altogether: never
  in the loss, though their objects still appear, unlabelled, in training images (as unseen concepts
  do in NUS-WIDE's and Open Images' training images). On the validation images they are scored like
  unseen labels, so the score rewards transfer to new labels, not only the labels trained on.
- Score: mAP + the sum of F1@K over the trained labels (validation images with a trained positive),
  plus the same over the held-out concepts (validation images with a held-out positive). Fractions,
  so the score lies in [0, 2 (1 + len(K))].
- Zero-shot weight (`HeadConfig.zero_shot`): the head is trained alone; after each epoch the weight of
  the backbone's own scores is chosen from a grid, as multiples of the weight at which both parts
  spread alike, by this score. Without a validation split the scale-matching weight itself is kept.
"""

from __future__ import annotations

import numpy as np

from .metrics import f1_at_k, gzsl_selection, mean_average_precision

VAL_MAX = 20000  # at most this many validation images, whatever the fraction
WEIGHT_GRID = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # multiples of scale_weight()


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), sorted, deterministic in (n, fraction, seed)."""
    if fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    n_val = min(max(1, round(fraction * n)), n - 1, VAL_MAX)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def hold_out_concepts(seen: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(trained labels, held-out labels), each in the order of `seen`, deterministic in the seed."""
    if fraction <= 0 or len(seen) < 2:
        return list(seen), []
    k = min(max(1, round(fraction * len(seen))), len(seen) - 1)
    held = set(np.random.default_rng([seed, 1]).choice(len(seen), size=k, replace=False).tolist())
    return [s for i, s in enumerate(seen) if i not in held], [s for i, s in enumerate(seen) if i in held]


def part_metrics(scores: np.ndarray, targets: np.ndarray, topk: tuple[int, ...]) -> dict:
    """mAP, F1@K and their sum over these label columns, on the images with a positive among them."""
    images, _ = gzsl_selection(targets)
    if len(images) == 0:
        return {"images": 0, "map": 0.0, "map_labels_with_positives": float("nan"),
                **{f"f1@{k}": 0.0 for k in topk}, "score": 0.0}
    p, t = scores[images], targets[images]
    m = mean_average_precision(p, t)
    out = {"images": int(len(images)), "map": m.map, "map_labels_with_positives": m.map_labels_with_positives}
    for k in topk:
        out[f"f1@{k}"] = f1_at_k(p, t, k).f1
    out["score"] = m.map + sum(out[f"f1@{k}"] for k in topk)
    return out


def scale_weight(head: np.ndarray, zero_shot: np.ndarray) -> float:
    """The zero-shot weight at which both logit parts have the same spread (std over all entries)."""
    spread = float(np.std(zero_shot))
    return float(np.std(head)) / spread if spread > 0 else 0.0


def validate(head: np.ndarray, zero_shot: np.ndarray | None, targets: np.ndarray, trained: int,
             topk: tuple[int, ...]) -> dict:
    """The validation record of one epoch. Columns [:trained] are trained labels, the rest held-out
    concepts; `zero_shot` is None for a head without the zero-shot term."""
    weights = [0.0] if zero_shot is None else [m * scale_weight(head, zero_shot) for m in WEIGHT_GRID]
    best = None
    for w in weights:
        scores = head if zero_shot is None else head + w * zero_shot
        rec = {"trained": part_metrics(scores[:, :trained], targets[:, :trained], topk)}
        if targets.shape[1] > trained:
            rec["held_out"] = part_metrics(scores[:, trained:], targets[:, trained:], topk)
        rec["score"] = sum(part["score"] for part in rec.values())
        if zero_shot is not None:
            rec["zero_shot_weight"] = w
        if best is None or rec["score"] > best["score"]:
            best = rec
    return best
