"""Multi-label losses on logits [B, L] and targets in {+1 present, -1 absent, 0 unknown}.

The plain forms treat unknown (0) as absent; the `masked` forms ignore unknown entries entirely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def _weights(targets: torch.Tensor, masked: bool) -> torch.Tensor:
    return (targets != 0).to(torch.float32) if masked else torch.ones_like(targets, dtype=torch.float32)


def asl(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
        clip: float = 0.0, masked: bool = False) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al., 2021), normalised as sum / batch / labels x 1000."""
    p = torch.sigmoid(logits.float())
    pos = (targets > 0).float()
    neg = 1.0 - pos
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p  # probability shifting for negatives
    loss_pos = pos * (1 - p).pow(gamma_pos) * torch.log(p.clamp(min=EPS))
    loss_neg = neg * p_neg.pow(gamma_neg) * torch.log((1 - p_neg).clamp(min=EPS))
    loss = -(loss_pos + loss_neg) * _weights(targets, masked)
    return loss.sum() / targets.numel() * 1000.0


def bce(logits: torch.Tensor, targets: torch.Tensor, masked: bool = False) -> torch.Tensor:
    """Binary cross-entropy, the mean over the counted entries."""
    w = _weights(targets, masked)
    loss = F.binary_cross_entropy_with_logits(logits.float(), (targets > 0).float(), reduction="none")
    return (loss * w).sum() / w.sum().clamp(min=1.0)


def ranking(logits: torch.Tensor, targets: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Pairwise ranking (hinge) loss: every positive above every annotated negative by `margin`.

    The mean over all (image, positive, negative) pairs; unknown entries take part in no pair.
    """
    logits = logits.float()
    pos = (targets > 0).float()
    neg = (targets < 0).float()
    # [B, P, N] by broadcasting: margin - s_pos + s_neg for every pair in the same image.
    hinge = (margin - logits.unsqueeze(2) + logits.unsqueeze(1)).clamp(min=0)
    pairs = pos.unsqueeze(2) * neg.unsqueeze(1)
    return (hinge * pairs).sum() / pairs.sum().clamp(min=1.0)


LOSSES = {
    "asl": lambda lg, t: asl(lg, t),
    "asl-masked": lambda lg, t: asl(lg, t, masked=True),
    "bce": lambda lg, t: bce(lg, t),
    "bce-masked": lambda lg, t: bce(lg, t, masked=True),
    "ranking": lambda lg, t: ranking(lg, t),
}


def get_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: one of {', '.join(LOSSES)}")
    return LOSSES[name]
