"""What a bundle is exported from: a trained checkpoint, or a backbone alone (a zero-shot bundle).

Either way the exporter gets an `ExportSource`: the two torch modules that become the image and label
graphs, the text encoder that embeds the label banks, the prompt pool, the banks, and what the manifest
says about the model and its scoring. The bundle contract is the same for both: the image graph gives
query features [B, Q, D'], the label graph text features [N, D'], and a label's logit is the max over
queries of their dot products.

A zero-shot bundle folds the backbone's own scoring rule (`ZeroShotRule`) into that contract with one
extra dimension: the image graph outputs [normalise(z), 1] and the label graph [scale * normalise(t),
bias], so `<query, label> = scale * cos(z, t) + bias`. SigLIP's `sigmoid(scale * cos + bias)` is then
exactly the runtime's `sigmoid(logit)`. A label's bank vector is the mean over the prompt pool, as for
any bundle: with one prompt (SigLIP's default) that is the model's own score; with a pool it is the mean
of the per-prompt logits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ExportError, one_line
from .graphs import ImageEncoder, LabelEncoder, image_embedding

DEFAULT_BANK = "default"
# A zero-shot bundle's default prompt: SigLIP's probabilities are calibrated for one prompt (a pool averages
# the per-prompt logits, which shifts them), and a pool costs its size in text encodes per new label
# (85 for the shipped one: minutes per hundred labels on a CPU). `--prompts FILE` gives a pool.
ZERO_SHOT_PROMPTS = ["a photo of a {}."]


@dataclass
class ExportSource:
    backbone: object
    image_module: nn.Module  # pixels -> query features [B, Q, D']
    label_module: nn.Module  # token ids -> text features [N, D']
    text_encoder: object  # what qks.prompts.LabelEmbedder embeds the banks with (tokenize, encode_text, ...)
    templates: list[str]
    banks: dict[str, list[str]]
    default_bank: str
    model_record: dict  # the manifest's "model"
    scoring_record: dict  # the manifest's "scoring"
    notes: list[str] = field(default_factory=list)  # said to the user at the end


# ---------------------------------------------------------------------------------------------
# a trained checkpoint


def checkpoint_source(ckpt: str | Path, labels: dict[str, list[str]]) -> ExportSource:
    """The checkpoint's model; its seen + unseen labels form the bank "default"."""
    from qks.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

    if DEFAULT_BANK in labels:
        raise ExportError(f"label bank name {DEFAULT_BANK!r} is reserved for the checkpoint's labels")
    try:
        ckpt_dict = load_checkpoint(ckpt)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    try:
        model = model_from_checkpoint(ckpt_dict).eval()
    except Exception as e:  # backbone construction: unknown arch, weights not available offline, ...
        raise ExportError(f"cannot rebuild the model of {ckpt}: {one_line(e)}") from e
    backbone, cfg = model.backbone, model.config
    image_module = ImageEncoder(model).eval()
    with torch.no_grad():  # Nq, or the token count of a projection-only head, from a real forward
        size = backbone.preprocess.size
        queries = int(image_module(torch.zeros(1, 3, size, size))[0].shape[1])
    return ExportSource(
        backbone=backbone, image_module=image_module, label_module=LabelEncoder(backbone).eval(),
        text_encoder=backbone, templates=list(ckpt_dict["prompts"]),
        banks={DEFAULT_BANK: list(ckpt_dict["seen"]) + list(ckpt_dict["unseen"]), **labels},
        default_bank=DEFAULT_BANK,
        model_record={"kind": "qks", "backbone": backbone.spec, "family": getattr(backbone, "family", None),
                      "config": cfg.to_dict(), "queries": queries, "embed_dim": int(backbone.embed_dim),
                      "layers": int(cfg.head.layers), "token_dim": int(backbone.token_dim),
                      "seen": list(ckpt_dict["seen"]), "unseen": list(ckpt_dict["unseen"])},
        scoring_record={"mode": cfg.scoring, "k": int(cfg.scoring_k)},
    )


# ---------------------------------------------------------------------------------------------
# a backbone alone


class ZeroShotImage(nn.Module):
    """pixels -> ([B, M, D + 1]: the backbone's own (normalised) image embedding, then a 1 for the bias;
    [B, D]: the image embedding for search, as a checkpoint's graph gives it)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.backbone.image_tokens(pixels)
        z = self.backbone.zero_shot_features(tokens)
        return torch.cat([z, torch.ones_like(z[..., :1])], dim=-1), image_embedding(self.backbone, tokens)


class ZeroShotText(nn.Module):
    """token ids -> [N, D + 1]: scale * the (normalised) text embedding, then the bias. Also what the
    label banks are embedded with, so it offers the text side of the `Backbone` protocol."""

    def __init__(self, backbone, rule):
        super().__init__()
        self.backbone = backbone
        self.rule = rule
        self.embed_dim = int(backbone.embed_dim) + 1
        self.context_length = backbone.context_length

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.encode_text(token_ids)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        t = self.backbone.encode_text(token_ids)
        t = F.normalize(t, dim=-1) if self.rule.normalize else t
        return torch.cat([self.rule.scale * t, torch.full_like(t[:, :1], self.rule.bias)], dim=-1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.backbone.tokenize(texts)

    def text_fingerprint(self) -> str:
        rule = json.dumps(self.rule.to_dict(), sort_keys=True)
        return hashlib.sha256(f"zero-shot:{self.backbone.text_fingerprint()}:{rule}".encode()).hexdigest()


def zero_shot_source(spec: str, labels: dict[str, list[str]], prompts: list[str] | None) -> ExportSource:
    """The backbone `spec` alone. Banks: the --labels files (the first is the default), else the shipped
    everyday vocabulary as "default". Prompts: `prompts`, else ZERO_SHOT_PROMPTS."""
    import dataclasses

    from qks.backbones import create_backbone

    try:
        backbone = create_backbone(spec)
    except Exception as e:
        raise ExportError(f"cannot build backbone {spec!r}: {one_line(e)}") from e
    rule = backbone.zero_shot_rule()
    notes = []
    if not labels:
        labels = {DEFAULT_BANK: _everyday_labels()}
        notes.append(f"no --labels: the default bank holds {len(labels[DEFAULT_BANK])} everyday labels "
                     "(qks-infer --labels FILE tags with any others)")
    prompts = list(prompts or ZERO_SHOT_PROMPTS)
    if len(prompts) > 1 and rule.calibrated:  # the mean of per-prompt logits is not what was calibrated
        rule = dataclasses.replace(rule, calibrated=False)
        notes.append(f"{len(prompts)} prompts: a label's logit is the mean of its prompts' logits, which "
                     f"{backbone.spec}'s calibration did not see; one prompt keeps its probabilities calibrated")
    backbone.eval()
    image_module, text = ZeroShotImage(backbone).eval(), ZeroShotText(backbone, rule).eval()
    with torch.no_grad():
        size = backbone.preprocess.size
        queries = int(image_module(torch.zeros(1, 3, size, size))[0].shape[1])
    if rule.trained_with != "sigmoid":
        how = ("was never trained on image-text pairs" if rule.trained_with == "none"
               else f"was trained with a {rule.trained_with} loss (probability 0.5 at cosine {-rule.bias / rule.scale:.2g})")
        notes.append(f"{backbone.spec} {how}: its probabilities rank labels but are not calibrated "
                     "(pick tags with --top-k, or a threshold chosen on your own images)")
    return ExportSource(
        backbone=backbone, image_module=image_module, label_module=text, text_encoder=text,
        templates=prompts, banks=labels, default_bank=next(iter(labels)),
        model_record={"kind": "zero-shot", "backbone": backbone.spec, "family": getattr(backbone, "family", None),
                      "config": None, "queries": queries, "embed_dim": text.embed_dim, "layers": 0,
                      "token_dim": int(backbone.token_dim), "seen": [], "unseen": []},
        scoring_record={"mode": "max", "k": 1, "zero_shot": {**rule.to_dict(), "formula": _formula(rule)}},
        notes=notes,
    )


def _formula(rule) -> str:
    s = "cos(image, prompt)" if rule.normalize else "<image, prompt>"
    return f"sigmoid(mean over the label's prompts of {rule.scale:.6g} * {s} + {rule.bias:.6g})"


def _everyday_labels() -> list[str]:
    """qks/prompts/everyday_labels.txt: common subjects of personal photos (people, animals, vehicles,
    food, objects, places, weather, events)."""
    from importlib import resources

    lines = resources.files("qks").joinpath("prompts/everyday_labels.txt").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
