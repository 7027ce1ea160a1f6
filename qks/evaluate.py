"""Evaluation: score images against label embeddings through `QKSModel`, then ZSL / GZSL metrics.

`predict` is the one place a batch of images (or cached image tokens) becomes logits; the
training loop's validation and `qks-eval` both use it, and the runtime is compared against it.
Metrics rank logits, not probabilities: float32 sigmoid saturates to exactly 1.0 above a logit of
about 17, and raw dot-product logits get there, which would turn confident labels into ties.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import ManifestDataset, read_label_lists, read_manifest
from .metrics import zsl_gzsl_report
from .prompts import LabelEmbedder
from .transforms import eval_transform

DEFAULT_TOPK = {"nuswide": (3, 5), "openimages": (10, 20)}


class EvalError(Exception):
    """Bad input to an evaluation; the message is one line."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise EvalError(f"unknown device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device {device!r} asked for, but no CUDA GPU is available")
    return dev


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA GPUs that support it; a no-op elsewhere (CPU runs stay fp32)."""
    on = enabled and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


@torch.no_grad()
def predict_parts(model, loader, label_embeddings: torch.Tensor, device: torch.device, from_tokens: bool = False,
                  amp: bool = True, progress: bool = False, desc: str = "scoring"):
    """(head logits float32 [N, L], the backbone's zero-shot logits [N, L] or None, targets int8 [N, L])
    for every batch `(inputs, targets)` of `loader`; inputs are pixels, or image tokens when `from_tokens`."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    emb = label_embeddings.to(device)
    heads, zero_shots, targets = [], [], []
    for inputs, t in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        inputs = inputs.to(device, non_blocking=True)
        if from_tokens:
            tokens = inputs
        else:
            with autocast(device, amp):
                tokens = model.image_tokens(inputs)
        head, zs = model.logit_parts(tokens, emb, lambda: autocast(device, amp))
        heads.append(head.cpu().numpy())
        if zs is not None:
            zero_shots.append(zs.cpu().numpy())
        targets.append(t.numpy())
    model.train(was_training)
    n_labels = emb.shape[0]
    if not heads:
        empty = np.zeros((0, n_labels), np.float32)
        return empty, (empty if model.zero_shot else None), np.zeros((0, n_labels), np.int8)
    return np.concatenate(heads), (np.concatenate(zero_shots) if zero_shots else None), np.concatenate(targets)


def predict(model, loader, label_embeddings: torch.Tensor, device: torch.device, from_tokens: bool = False,
            amp: bool = True, progress: bool = False, desc: str = "scoring") -> tuple[np.ndarray, np.ndarray]:
    """(logits float32 [N, L], targets int8 [N, L]): the model's logits, the head's plus the weighted
    zero-shot ones when it has the term. Probabilities are sigmoid(logits)."""
    head, zs, targets = predict_parts(model, loader, label_embeddings, device, from_tokens, amp, progress, desc)
    if zs is None:
        return head, targets
    return head + np.float32(model.head.zero_shot_weight.item()) * zs, targets


@dataclass
class EvalResult:
    report: dict  # JSON-ready: zsl and gzsl metrics, counts, settings
    images: list[str]  # the manifest's image strings, in order
    labels: list[str]  # seen + unseen, the score columns
    logits: np.ndarray  # [images, labels] float32; probabilities are sigmoid(logits)


def evaluate(ckpt: str | Path, data: str | Path, seen: str | Path | None = None, unseen: str | Path | None = None,
             topk: Sequence[int] | None = None, batch_size: int = 64, device: str = "auto", workers: int = 4,
             skip_bad: bool = False, label_cache: str | Path | None = None, amp: bool = True,
             progress: bool = False) -> EvalResult:
    ckpt_path = Path(ckpt)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / "best.pt"
    state = load_checkpoint(ckpt_path)
    # The label lists given win; without them, the checkpoint's own lists are evaluated.
    if seen:
        seen_labels, unseen_labels = read_label_lists(seen, unseen)
    elif unseen:
        seen_labels, unseen_labels = read_label_lists_pair(list(state["seen"]), unseen)
    else:
        seen_labels, unseen_labels = list(state["seen"]), list(state["unseen"])
    labels = seen_labels + unseen_labels
    if topk is None:
        recipe = state.get("train_state", {}).get("options", {}).get("recipe")
        topk = DEFAULT_TOPK.get(recipe, (3, 5))
    topk = tuple(int(k) for k in topk)
    if any(k < 1 for k in topk):
        raise EvalError(f"--topk values must be >= 1, got {list(topk)}")
    manifest = read_manifest(data, labels, skip_bad=skip_bad, progress=progress)

    dev = resolve_device(device)
    try:
        model = model_from_checkpoint(state).to(dev)
    except Exception as e:  # the backbone reference may not resolve here (offline, missing file)
        raise EvalError(f"cannot rebuild the model of {ckpt_path}: {_first_line(e)}") from None
    cache = Path(label_cache) if label_cache else ckpt_path.parent / "label_cache"
    emb = LabelEmbedder(model.backbone, list(state["prompts"]), cache_dir=cache)(labels)
    dataset = ManifestDataset(manifest.samples, labels, eval_transform(model.backbone.preprocess))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=dev.type == "cuda")
    logits, targets = predict(model, loader, emb, dev, amp=amp, progress=progress)
    unseen_mask = np.array([False] * len(seen_labels) + [True] * len(unseen_labels))
    metrics = zsl_gzsl_report(logits, targets, unseen_mask, topk)
    if not unseen_labels:
        metrics["zsl"] = None
    report = json_safe({
        "checkpoint": str(ckpt_path),
        "data": str(data),
        "images": len(manifest.samples),
        "skipped_lines": len(manifest.skipped),
        "labels": {"seen": len(seen_labels), "unseen": len(unseen_labels)},
        "topk": list(topk),
        "ties": "pessimistic (non-positives rank first among equal scores)",
        "units": "fractions in [0, 1]",
        **metrics,
    })
    return EvalResult(report, [s.image for s in manifest.samples], labels, logits)


def read_label_lists_pair(seen_labels: list[str], unseen: str | Path) -> tuple[list[str], list[str]]:
    """The checkpoint's seen labels with an unseen list from a file."""
    from .data import read_label_list

    unseen_labels = read_label_list(unseen, "unseen label list")
    clash = sorted(set(seen_labels) & set(unseen_labels))
    if clash:
        raise EvalError(f"{unseen}: {len(clash)} label(s) are also seen labels of the checkpoint, e.g. {clash[0]!r}")
    return seen_labels, unseen_labels


def write_predictions(path: str | Path, result: EvalResult) -> Path:
    """JSONL, one record a line: {"image": <as in the manifest>, "scores": {label: probability}}."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for image, row in zip(result.images, result.logits, strict=True):
            probs = 1.0 / (1.0 + np.exp(-row.astype(np.float64)))
            scores = {label: float(p) for label, p in zip(result.labels, probs, strict=True)}
            f.write(json.dumps({"image": image, "scores": scores}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def _pct(x) -> str:
    return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:6.2f}"


def format_table(report: dict) -> str:
    """A readable table of the ZSL and GZSL metrics, in percent."""
    topk = report["topk"]
    head = f"{'':6} {'images':>7} {'mAP':>6} {'mAP+':>6}" + "".join(
        f" {'P@' + str(k):>6} {'R@' + str(k):>6} {'F1@' + str(k):>6}" for k in topk)
    lines = [head]
    for split in ("zsl", "gzsl"):
        m = report.get(split)
        if m is None:
            lines.append(f"{split.upper():6} (no unseen labels)")
            continue
        row = f"{split.upper():6} {m['images']:>7} {_pct(m['map'])} {_pct(m['map_labels_with_positives'])}"
        for k in topk:
            f = m["f1"][str(k)]
            row += f" {_pct(f['precision'])} {_pct(f['recall'])} {_pct(f['f1'])}"
        lines.append(row)
    lines.append("percent; mAP: labels without a positive count as 0; mAP+: over labels with positives only; "
                 "F1@K micro")
    return "\n".join(lines)


def json_safe(obj):
    """NaN (a metric with nothing to average) as null, so the JSON is valid everywhere."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
