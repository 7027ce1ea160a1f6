"""The prompt pool and label embeddings: the unnormalised mean of a label's prompts' text features."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import torch

DEFAULT_POOL = "default"


def load_prompts(pool: str = DEFAULT_POOL) -> list[str]:
    """Templates, one a line with `{}` for the label; `#` lines and blank lines are skipped."""
    if pool == DEFAULT_POOL:
        text = resources.files("qks").joinpath("prompts/default.txt").read_text(encoding="utf-8")
    else:
        text = Path(pool).read_text(encoding="utf-8")
    templates = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"prompt pool {pool!r}: each template needs exactly one '{{}}': {bad[0]!r}")
    if not templates:
        raise ValueError(f"prompt pool {pool!r} has no templates")
    return templates


def label_key(text_fingerprint: str, templates: list[str], label: str) -> str:
    """Cache key of one label's embedding: the text encoder's weights, the pool and the label."""
    h = hashlib.sha256()
    for part in (text_fingerprint, "\n".join(templates), label):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


class LabelEmbedder:
    """Embeds label texts through a backbone's text encoder, with a per-label cache.

    The cache lives in memory and, when `cache_dir` is given, as one float32 `.npy` per label.
    """

    def __init__(self, backbone, templates: list[str], cache_dir: str | Path | None = None,
                 batch_size: int = 256):
        self.backbone = backbone
        self.templates = templates
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self._memory: dict[str, torch.Tensor] = {}

    def _load(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        if self.cache_dir is not None:
            path = self.cache_dir / f"{key}.npy"
            if path.is_file():
                vec = torch.from_numpy(np.load(path, allow_pickle=False))
                self._memory[key] = vec
                return vec
        return None

    def _store(self, key: str, vec: torch.Tensor) -> None:
        self._memory[key] = vec
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_dir / f"{key}.tmp.npy"
            np.save(tmp, vec.numpy())
            tmp.replace(self.cache_dir / f"{key}.npy")

    @torch.no_grad()
    def _compute(self, label: str) -> torch.Tensor:
        prompts = [t.format(label) for t in self.templates]
        device = next(iter(self.backbone.parameters())).device if hasattr(self.backbone, "parameters") else "cpu"
        # A backbone may offer a faster encode_text for a batch of prompts (lite: padding cut off).
        encode = getattr(self.backbone, "encode_prompts", self.backbone.encode_text)
        feats = []
        for i in range(0, len(prompts), self.batch_size):
            ids = self.backbone.tokenize(prompts[i:i + self.batch_size]).to(device)
            feats.append(encode(ids).float())
        return torch.cat(feats).mean(dim=0).cpu()

    def __call__(self, labels: list[str]) -> torch.Tensor:
        """labels -> [L, D] float32 on the CPU."""
        fp = self.backbone.text_fingerprint()
        out = []
        for label in labels:
            key = label_key(fp, self.templates, label)
            vec = self._load(key)
            if vec is None:
                vec = self._compute(label)
                self._store(key, vec)
            out.append(vec)
        return torch.stack(out) if out else torch.empty(0, self.backbone.embed_dim)
