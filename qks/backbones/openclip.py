"""`openclip:<arch>[:<pretrained>]` — a frozen open_clip model as a QKS backbone.

`<arch>` is an open_clip model name (`ViT-B-16`) or a path to an open_clip model-config JSON (small
custom architectures for tests and experiments). `<pretrained>` is an open_clip tag (`openai`), a
local checkpoint file, or `none` for random weights (seeded, so the same spec always gives the
same model). Without a third part it is `openai`, as in the paper.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Preprocess, module_fingerprint

# Random-initialised backbones are built under this seed so a spec always names the same weights:
# a checkpoint trained on `...:none` reloads onto the backbone it was trained with.
RANDOM_INIT_SEED = 0


def _import_open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the openclip backbone needs open_clip: pip install 'qks[train]'"
        ) from e
    return open_clip


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init():
    """open_clip warns on every random-initialised model; `none` asks for exactly that."""
    root, quiet = logging.getLogger(), _NoRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _resolve_arch(open_clip, arch: str) -> str:
    """An arch that is a JSON file is registered with open_clip and named by its file stem."""
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config not found: {arch}")
        open_clip.add_model_config(path)
        return path.stem
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r} (a name from open_clip.list_models() "
                         "or a path to a model-config .json)")
    return arch


class OpenClipBackbone(nn.Module):
    """Image tokens are the last transformer layer after the post-LayerNorm, CLS first."""

    def __init__(self, arch: str, pretrained: str | None = "openai", spec: str | None = None):
        super().__init__()
        open_clip = _import_open_clip()
        name = _resolve_arch(open_clip, arch)
        pretrained = None if pretrained in (None, "", "none") else pretrained
        fork = torch.random.fork_rng() if pretrained is None else contextlib.nullcontext()
        with fork:
            if pretrained is None:
                torch.manual_seed(RANDOM_INIT_SEED)
            with _quiet_random_init():
                model = open_clip.create_model(name, pretrained=pretrained, weights_only=True)
        visual = model.visual
        if not hasattr(visual, "_embeds") or getattr(visual, "attn_pool", None) is not None:
            raise ValueError(f"{arch}: only open_clip ViT image towers without attention pooling are supported")
        if getattr(visual, "final_ln_after_pool", False):
            raise ValueError(f"{arch}: towers with final_ln_after_pool are not supported")
        model.eval().requires_grad_(False)
        self.model = model
        self.spec = spec or f"openclip:{arch}:{pretrained or 'none'}"
        self.token_dim = visual.ln_post.normalized_shape[0]
        self.embed_dim = visual.output_dim
        self._tokenizer = open_clip.get_tokenizer(name)
        self.context_length = self._tokenizer.context_length
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.preprocess = Preprocess(
            size=int(size),
            resize_mode=cfg.get("resize_mode", "shortest"),
            interpolation=cfg.get("interpolation", "bicubic"),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
        )
        self._text_fp: str | None = None

    def train(self, mode: bool = True):
        # Frozen: always in eval mode, whatever the enclosing model does.
        return super().train(False)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        x = visual._embeds(pixels)
        x = visual.transformer(x)
        return visual.ln_post(x)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(token_ids, normalize=False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    def projection(self) -> torch.Tensor | None:
        proj = self.model.visual.proj
        return None if proj is None else proj.detach().clone()

    def zero_shot_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's own image embedding (`encode_image`: the tower's pooling of these tokens, then its frozen
        visual projection), L2-normalised as CLIP scores labels by cosine. [B, 1, D]"""
        visual = self.model.visual
        pooled, _ = visual._global_pool(tokens)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled, dim=-1).unsqueeze(1)

    def text_fingerprint(self) -> str:
        if self._text_fp is None:
            text_state = nn.Module()
            for name, t in self.model.state_dict().items():
                if not name.startswith("visual.") and not name.startswith("logit_"):
                    text_state.register_buffer(name.replace(".", "_"), t)
            self._text_fp = module_fingerprint(text_state)
        return self._text_fp

    def tokenizer_json(self) -> str:
        """open_clip's tokenizer as Hugging Face `tokenizers` JSON (see `clip_tokenizer`)."""
        from .clip_tokenizer import build_clip_tokenizer_json

        return build_clip_tokenizer_json(self._tokenizer)


def create(arg: str, spec: str) -> OpenClipBackbone:
    # `arg` is "<arch>[:<pretrained>]"; an arch path may itself contain no colon but a pretrained
    # path might (Windows drives are not a concern here), so split on the first colon only.
    arch, _, pretrained = arg.partition(":")
    if not arch:
        raise ValueError(f"backbone spec {spec!r}: expected openclip:<arch>[:<pretrained>]")
    return OpenClipBackbone(arch, pretrained or "openai", spec=spec)
