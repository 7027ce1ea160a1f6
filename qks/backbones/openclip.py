"""`openclip:<arch>[:<pretrained>]` — a frozen open_clip model as a QKS backbone.

`<arch>` is an open_clip model name (`ViT-B-16`) or a path to an open_clip model-config JSON (small
custom architectures for tests and experiments). `<pretrained>` is an open_clip tag (`openai`), a
local checkpoint file, or `none` for random weights (seeded, so the same spec always gives the
same model). Without a third part it is `openai`, as in the paper.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Preprocess, ZeroShotRule, module_fingerprint
from .towers import tower_for

# Where a CLIP-trained model's zero-shot probability is 0.5: the image-text cosine commonly read as "shown"
# for CLIP ViTs (matching pairs score about 0.25-0.35, unrelated ones 0.1-0.2). A heuristic, not a calibration.
CLIP_CENTRE = 0.2

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


class _OpenClipRecords(logging.Filter):
    """open_clip logs on the root logger while it builds a model: a warning on every random-initialised
    one (`none` asks for exactly that), and an ERROR line before it raises for weights it cannot load
    (the raised error becomes qks's own one-line message). Both are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


@contextlib.contextmanager
def _quiet_open_clip():
    root, quiet = logging.getLogger(), _OpenClipRecords()
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
    """A frozen open_clip model; its image tower goes through the adapter of its family (`towers.py`)."""

    def __init__(self, arch: str, pretrained: str | None = "openai", spec: str | None = None):
        super().__init__()
        open_clip = _import_open_clip()
        name = _resolve_arch(open_clip, arch)
        pretrained = None if pretrained in (None, "", "none") else pretrained
        fork = torch.random.fork_rng() if pretrained is None else contextlib.nullcontext()
        with fork:
            if pretrained is None:
                torch.manual_seed(RANDOM_INIT_SEED)
            with _quiet_open_clip():
                model = open_clip.create_model(name, pretrained=pretrained, weights_only=True)
        model = _reparameterize(model.eval())
        model.requires_grad_(False)
        self.model = model
        self.tower = tower_for(model.visual, arch)
        self.spec = spec or f"openclip:{arch}:{pretrained or 'none'}"
        self.family = self.tower.family
        self.prefix_tokens = self.tower.prefix_tokens
        self._tokenizer = _tokenizer(open_clip, name, arch)
        self.context_length = int(self._tokenizer.context_length)
        self.preprocess = _preprocess(open_clip, model, arch, name, pretrained)
        with torch.no_grad():  # the tower's shapes, from one image (this also tells a conv tower its grid)
            probe = self.tower.tokens(torch.zeros(1, 3, self.preprocess.size, self.preprocess.size))
            self.token_dim = int(probe.shape[-1])
            self.embed_dim = int(self.tower.pool(probe).shape[-1])
        self._text_fp: str | None = None

    def train(self, mode: bool = True):
        # Frozen: always in eval mode, whatever the enclosing model does.
        return super().train(False)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower.tokens(pixels)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(token_ids, normalize=False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    def projection(self) -> torch.Tensor | None:
        return self.tower.projection()

    def zero_shot_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's own image embedding (`encode_image`: the tower's pooling of these tokens and its
        projection), L2-normalised as CLIP and SigLIP score labels by cosine. [B, 1, D]"""
        return F.normalize(self.tower.pool(tokens), dim=-1).unsqueeze(1)

    def zero_shot_rule(self) -> ZeroShotRule:
        """How the model itself scores an image against a text. SigLIP-trained models (a learned logit
        bias): `sigmoid(scale * cos + bias)`, a calibrated probability per label. CLIP-trained ones: their
        logit scale, centred at cosine CLIP_CENTRE (`bias = -scale * CLIP_CENTRE`). Their loss is a softmax
        over a batch, so no sigmoid of theirs is a calibrated probability; without the centring, `scale *
        cos` (scale 100 for real CLIP weights, image-text cosines of 0.15-0.35) would round every relevant
        label to exactly 1.0 in float32 and top-k could no longer rank them."""
        scale = float(self.model.logit_scale.detach().exp())
        bias = getattr(self.model, "logit_bias", None)
        if bias is not None:
            return ZeroShotRule("sigmoid", scale, float(bias.detach()), calibrated=True, normalize=True)
        return ZeroShotRule("softmax", scale, -scale * CLIP_CENTRE, calibrated=False, normalize=True)

    def text_fingerprint(self) -> str:
        if self._text_fp is None:
            text_state = nn.Module()
            for name, t in self.model.state_dict().items():
                if not name.startswith("visual.") and not name.startswith("logit_"):
                    text_state.register_buffer(name.replace(".", "_"), t)
            self._text_fp = module_fingerprint(text_state)
        return self._text_fp

    def tokenizer_json(self) -> str:
        """open_clip's tokenizer as Hugging Face `tokenizers` JSON (CLIP BPE or a Hugging Face tokenizer)."""
        from .hf_tokenizer import tokenizer_json_for

        return tokenizer_json_for(self._tokenizer)


def _reparameterize(model: nn.Module) -> nn.Module:
    """Fold reparameterizable blocks (MobileCLIP's FastViT/MobileOne) into their inference form: the same
    function, fewer branches in the exported graph."""
    if not any(hasattr(m, "reparameterize") for m in model.modules()):
        return model
    from timm.utils.model import reparameterize_model

    return reparameterize_model(model, inplace=True)


def _tokenizer(open_clip, name: str, arch: str):
    """open_clip's tokenizer for the model. A model-config JSON may name a Hugging Face tokenizer folder
    relative to itself (`text_cfg.hf_tokenizer_name`), so a config and its tokenizer travel together."""
    if arch.endswith(".json"):
        text_cfg = json.loads(Path(arch).read_text(encoding="utf-8")).get("text_cfg", {})
        hf_name = text_cfg.get("hf_tokenizer_name")
        if hf_name and (Path(arch).parent / hf_name).is_dir():
            from open_clip.tokenizer import HFTokenizer

            return HFTokenizer(str((Path(arch).parent / hf_name).resolve()),
                               context_length=text_cfg.get("context_length", 77),
                               **text_cfg.get("tokenizer_kwargs", {}))
    try:
        return open_clip.get_tokenizer(name)
    except Exception as e:  # a Hugging Face tokenizer that is not in the local cache, offline
        raise ValueError(f"{arch}: its tokenizer cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "Hugging Face tokenizers are downloaded once from the hub") from None


def _preprocess(open_clip, model, arch: str, name: str, pretrained: str | None) -> Preprocess:
    """The model's preprocessing as open_clip sets it. A local checkpoint file carries none, and open_clip
    then falls back to CLIP's mean/std: take the arch's published one instead (SigLIP: mean 0.5, squash)."""
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained is not None and Path(pretrained).is_file() and tags:
        published = open_clip.get_pretrained_cfg(name, tags[0])
        cfg.update({k: published[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in published})
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"{arch}: non-square input {tuple(size)} is not supported")
        size = size[0]
    mode = cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"{arch}: resize mode {mode!r} is not supported (shortest, squash)")
    return Preprocess(
        size=int(size),
        resize_mode=mode,
        interpolation=cfg.get("interpolation", "bicubic"),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )


def create(arg: str, spec: str) -> OpenClipBackbone:
    # `arg` is "<arch>[:<pretrained>]". A model-config path ends in ".json" and may hold colons itself;
    # otherwise split on the first colon (a pretrained path may hold colons).
    end = arg.find(".json")
    if end >= 0 and arg[end + 5:end + 6] in ("", ":"):
        arch, pretrained = arg[:end + 5], arg[end + 6:]
    else:
        arch, _, pretrained = arg.partition(":")
    if not arch:
        raise ValueError(f"backbone spec {spec!r}: expected openclip:<arch>[:<pretrained>]")
    return OpenClipBackbone(arch, pretrained or "openai", spec=spec)
