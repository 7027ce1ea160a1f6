"""Per-label thresholds: the fitting rule (`fit`) and the stored file (`labels/<bank>.thresholds.json`).

Fitting, per label, on a labelled sample's probabilities (`qks-calibrate`):
- "f1" (default): the threshold with the best F1 on the sample;
- "precision=P": the lowest threshold whose selection reaches precision P on the sample.
A threshold is placed halfway between the lowest kept and the highest dropped probability (so the
sample's selection is exactly the chosen one, with a margin on both sides). A label with fewer than
`min_positives` positives (or whose precision target no threshold reaches) falls back to the global
rule: the one threshold that is best for the whole sample pooled over every label (micro F1, or the
lowest reaching micro precision P; F1 when no global threshold reaches P). With `floor_at_global`, no
label's threshold is below the global one (a label the model cannot rank has its best F1 on a small
sample at "tag nearly everything": measured in benchmarks/RESULTS.md, "Per-label thresholds").

The file (JSON, read by runtime/bundle.py and cpp/src/bundle.cpp) is hashed in the manifest's
"files" and named by the bank's "thresholds_file":

    {"format": "qks-thresholds", "version": 1, "bank": name, "bank_key": the bank's key,
     "thresholds": [float, one per label, bank order], "rule": "f1" | "precision", "target": P | null,
     "min_positives": N, "global_threshold": float, "floor": "global" | null, "fallback_labels": [names],
     "labels": [{"name", "threshold", "positives", "negatives", "fallback", "precision", "recall", "f1"}
                (+ "why" for a fallback, "raised_from" for a threshold raised to the global one)],
     "data": {"file", "sha256", "images", "skipped"}, "created": ISO-8601 UTC}

A bank whose key differs from "bank_key" (its labels or the label encoder changed) makes the bundle
refuse to load with a one-line error (qks-calibrate drops such thresholds, with a warning, and fits new
ones); `qks-labels --name` drops a bank's thresholds itself when it re-encodes the bank with another key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .manifest import BundleError

FORMAT = "qks-thresholds"
VERSION = 1
DEFAULT_MIN_POSITIVES = 5


class CalibrationError(ValueError):
    """A calibration that cannot run as asked; one line."""


@dataclass(frozen=True)
class Target:
    rule: str  # "f1" | "precision"
    value: float | None = None  # the precision to reach

    @classmethod
    def parse(cls, text: str) -> Target:
        if text == "f1":
            return cls("f1")
        name, _, value = text.partition("=")
        if name == "precision":
            try:
                p = float(value)
            except ValueError:
                p = math.nan
            if 0 < p <= 1:
                return cls("precision", p)
        raise CalibrationError(f"--target {text!r}: use f1 or precision=P with 0 < P <= 1 (e.g. precision=0.9)")

    def __str__(self) -> str:
        return "f1" if self.rule == "f1" else f"precision={self.value:g}"


@dataclass
class Fit:
    thresholds: np.ndarray  # float32 [L]
    global_threshold: float
    per_label: list[dict] = field(default_factory=list)

    @property
    def fallback_labels(self) -> list[str]:
        return [r["name"] for r in self.per_label if r["fallback"]]


# -- the rule ------------------------------------------------------------------------------------

def _cuts(scores: np.ndarray, positive: np.ndarray):
    """Every distinct selection `p >= t` of a descending sort: (threshold, tp, fp) arrays, one per cut."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order].astype(np.float32), positive[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.flatnonzero(np.append(s[:-1] > s[1:], True))  # the last index of each run of equal scores
    nxt = np.append(s[1:], s[-1])[last]
    mid = ((s[last].astype(np.float64) + nxt) / 2).astype(np.float32)
    # halfway, in float32, strictly above the next score (p >= t must not keep it); the last cut keeps all
    mid = np.where(mid > nxt, mid, np.nextafter(nxt, np.float32(np.inf)))
    mid[-1] = s[-1]
    return mid, tp[last], fp[last]


def _best(thr: np.ndarray, tp: np.ndarray, fp: np.ndarray, positives: int, target: Target) -> tuple[float, int] | None:
    """(threshold, cut index) by the target's rule, None when no cut qualifies."""
    if target.rule == "f1":
        f1 = 2 * tp / np.maximum(2 * tp + fp + (positives - tp), 1)
        i = int(np.argmax(f1))  # the first best: the highest threshold of equals
        return (float(thr[i]), i) if f1[i] > 0 else None
    precision = tp / np.maximum(tp + fp, 1)
    ok = np.flatnonzero((precision >= target.value - 1e-12) & (tp > 0))
    return (float(thr[ok[-1]]), int(ok[-1])) if ok.size else None


def _stats(scores: np.ndarray, positive: np.ndarray, t: float) -> dict:
    kept = scores >= np.float32(t)
    tp, fp, fn = int((kept & positive).sum()), int((kept & ~positive).sum()), int((~kept & positive).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * tp / (2 * tp + fp + fn), 4) if tp else 0.0}


def global_threshold(probs: np.ndarray, targets: np.ndarray, target: Target) -> float:
    """The one threshold best for the whole sample pooled over every label (annotated entries only)."""
    known = targets != 0
    scores, positive = probs[known].astype(np.float32), targets[known] > 0
    if not positive.any():
        raise CalibrationError("the labelled sample has no positive label of this bank: nothing to calibrate")
    thr, tp, fp = _cuts(scores, positive)
    best = _best(thr, tp, fp, int(positive.sum()), target) or _best(thr, tp, fp, int(positive.sum()), Target("f1"))
    return best[0]


def fit(probs: np.ndarray, targets: np.ndarray, names: list[str], target: Target,
        min_positives: int = DEFAULT_MIN_POSITIVES, floor_at_global: bool = False) -> Fit:
    """Per-label thresholds from probabilities [N, L] and targets [N, L] (+1 / -1 / 0 = not annotated)."""
    probs = np.asarray(probs, dtype=np.float32)
    targets = np.asarray(targets)
    if probs.shape != targets.shape or probs.ndim != 2 or probs.shape[1] != len(names):
        raise CalibrationError(f"probabilities {list(probs.shape)} and targets {list(targets.shape)} do not match "
                               f"{len(names)} labels")
    g = global_threshold(probs, targets, target)
    out = Fit(np.full(len(names), g, dtype=np.float32), g)
    for j, name in enumerate(names):
        known = targets[:, j] != 0
        scores, positive = probs[known, j], targets[known, j] > 0
        npos = int(positive.sum())
        best = None
        if npos >= max(min_positives, 1):
            best = _best(*_cuts(scores, positive), npos, target)
        raised = None
        if best is not None:
            out.thresholds[j] = best[0]
            if floor_at_global and best[0] < g:
                out.thresholds[j], raised = g, best[0]
        rec = {"name": name, "threshold": float(out.thresholds[j]), "positives": npos,
               "negatives": int(known.sum()) - npos, "fallback": best is None}
        if raised is not None:
            rec["raised_from"] = float(np.float32(raised))
        if best is None:
            rec["why"] = (f"fewer than {min_positives} positives" if npos < max(min_positives, 1)
                          else f"no threshold reaches {target}")
        out.per_label.append(rec | (_stats(scores, positive, float(out.thresholds[j])) if known.any() else {}))
    return out


# -- the file ------------------------------------------------------------------------------------

def document(fit_: Fit, *, bank: str, bank_key: str, target: Target, min_positives: int, data: dict,
             created: str, floor_at_global: bool = False) -> dict:
    return {"format": FORMAT, "version": VERSION, "bank": bank, "bank_key": bank_key,
            "thresholds": [float(t) for t in fit_.thresholds], "rule": target.rule, "target": target.value,
            "min_positives": min_positives, "global_threshold": float(fit_.global_threshold),
            "floor": "global" if floor_at_global else None,
            "fallback_labels": fit_.fallback_labels, "labels": fit_.per_label, "data": data, "created": created}


def dumps(doc: dict) -> bytes:
    return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


class StaleThresholds(BundleError):
    """Thresholds fitted for another version of their bank (the refusal qks-calibrate's rerun fixes)."""

    def __init__(self, message: str, bank: str):
        super().__init__(message)
        self.bank = bank


def read_thresholds(path: Path, bank: str, labels: int, key: str | None) -> np.ndarray:
    """The float32 [labels] thresholds of a bank's thresholds file; BundleError (one line) if it is not
    a valid file for this bank (format, count, values in [0, 1], the bank key it was fitted for)."""
    what = f"label bank {bank!r} thresholds ({path.name})"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleError(f"{what}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise BundleError(f"{what}: not a {FORMAT} version {VERSION} file")
    values = doc.get("thresholds")
    if not isinstance(values, list) or len(values) != labels:
        raise BundleError(f"{what}: needs {labels} thresholds (one per label), has "
                          f"{len(values) if isinstance(values, list) else 'none'}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values):
        raise BundleError(f"{what}: every threshold must be a number in [0, 1]")
    if doc.get("bank_key") != key:
        raise StaleThresholds(f"{what}: fitted for another version of the bank (its labels or label encoder "
                              "changed): rerun qks-calibrate", bank)
    return np.asarray(values, dtype=np.float32)
