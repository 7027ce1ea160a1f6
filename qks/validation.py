"""Validation during training: what is held out, the score that drives the schedule and `best.pt`,
and the zero-shot weight fitted on it.

- Images: `split_validation` carves a share of the training manifest (never the test set).
- Concepts (`--val-concepts`): a share of the seen labels is held out of training altogether: never
  in the loss, though their objects still appear, unlabelled, in training images (as unseen concepts
  do in NUS-WIDE's and Open Images' training images). They are scored like unseen labels on every
  image that shows one (`transfer_rows`: the validation images and the training images, at most
  TRANSFER_MAX): the head never had a signal about these labels there, and the many images make the
  transfer part of the score steady where the validation split is small.
- Score: mAP + the sum of F1@K over the trained labels (validation images with a trained positive),
  plus the same over the held-out concepts (the images that show one). Fractions, so the score lies
  in [0, 2 (1 + len(K))].
- Zero-shot weight (`HeadConfig.zero_shot`): the head is trained alone; after each epoch the weight of
  the backbone's own scores is chosen from a grid, as multiples of the weight at which both parts
  spread alike, by this score. Without a validation split the scale-matching weight itself is kept.
"""

from __future__ import annotations

import numpy as np

from .metrics import f1_at_k, gzsl_selection, mean_average_precision

VAL_MAX = 20000  # at most this many validation images, whatever the fraction
TRANSFER_MAX = 5000  # at most this many images to score the held-out concepts on
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


def transfer_rows(positive: np.ndarray, seed: int) -> np.ndarray:
    """The images to score the held-out concepts on: those that show one (`positive`: a bool per
    image), at most TRANSFER_MAX of them drawn by the seed, sorted."""
    rows = np.flatnonzero(positive)
    if len(rows) > TRANSFER_MAX:
        rows = np.sort(np.random.default_rng([seed, 2]).choice(rows, size=TRANSFER_MAX, replace=False))
    return rows


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


def validate(trained: tuple, held_out: tuple | None, topk: tuple[int, ...]) -> dict:
    """The validation record of one epoch. `trained` is (head logits, zero-shot logits or None,
    targets) over the trained labels on the validation images; `held_out` the same over the held-out
    concepts on the images that show one, or None without held-out concepts.

    The zero-shot weight kept is the grid weight that does best on both parts relative to what any
    weight does for each (the sum of part score / best part score): a larger weight helps the
    held-out labels and costs the trained ones, and neither part's scale decides the trade-off. The
    record's `score` is the plain sum of the two part scores at that weight."""
    head, zero_shot, _ = trained
    weights = [0.0] if zero_shot is None else [m * scale_weight(head, zero_shot) for m in WEIGHT_GRID]
    parts = {"trained": trained, **({"held_out": held_out} if held_out is not None else {})}
    records = []
    for w in weights:
        rec = {name: part_metrics(h if z is None else h + w * z, t, topk) for name, (h, z, t) in parts.items()}
        rec["score"] = sum(part["score"] for part in rec.values())
        if zero_shot is not None:
            rec["zero_shot_weight"] = w
        records.append(rec)
    best_of = {name: max(r[name]["score"] for r in records) for name in parts}
    return max(records, key=lambda r: sum(r[n]["score"] / best_of[n] for n in parts if best_of[n] > 0))
