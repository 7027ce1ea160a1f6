"""Knowledge sharing: each label picks its best query token (raw dot products, no temperature)."""

from __future__ import annotations

import torch


def score(query_features: torch.Tensor, label_embeddings: torch.Tensor, mode: str = "max", k: int = 1) -> torch.Tensor:
    """query_features [B, Nq, D], label_embeddings [L, D] -> logits [B, L].

    `max`: logit[b, l] = max_q <qf[b, q], e[l]> (the paper). `topk`: the sum of the k largest
    dot products over queries (an ablation).
    """
    sims = torch.einsum("bqd,ld->bql", query_features, label_embeddings)
    if mode == "max":
        return sims.amax(dim=1)
    if mode == "topk":
        return sims.topk(min(k, sims.shape[1]), dim=1).values.sum(dim=1)
    raise ValueError(f"unknown scoring mode {mode!r} (max or topk)")
