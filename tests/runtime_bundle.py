"""A stand-in for `qks.export.bundle.export_bundle` while it is being written: exports the tiny
checkpoint's two graphs with torch.onnx (dynamo, dynamic batch) and writes a manifest following
runtime/manifest.py. To be deleted once export_bundle lands (one way to make bundles)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def clip_tokenizer_json(context_length: int) -> str:
    """open_clip's SimpleTokenizer as Hugging Face `tokenizers` JSON (pads/truncates to T)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<start_of_text>", "<end_of_text>"]
    enc = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(models.BPE(vocab=enc, merges=merges, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Strip(), normalizers.Lowercase()])
    pat = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pat), behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<start_of_text> $A <end_of_text>",
        special_tokens=[("<start_of_text>", enc["<start_of_text>"]), ("<end_of_text>", enc["<end_of_text>"])])
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=0, pad_token="!")
    return tok.to_str()


def _export(module, example, path: Path, in_name: str, out_name: str) -> None:
    import contextlib
    import io
    import warnings

    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    arg = "x"
    buf = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, (example,), dynamo=True, input_names=[in_name], output_names=[out_name],
                                 opset_version=18, dynamic_shapes={arg: {0: batch}}, external_data=False)
    path.write_bytes(prog.model_proto.SerializeToString())


def make_bundle(ckpt_path, out) -> Path:
    """Bundle of the checkpoint: image/label graphs, tokenizer, prompts, a default bank (seen + unseen)."""
    import torch
    from qks.runtime.manifest import FORMAT, SCHEMA_VERSION, bank_key, file_record, write_manifest
    from torch import nn

    from qks.checkpoint import load_checkpoint, model_from_checkpoint
    from qks.prompts import LabelEmbedder

    out = Path(out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt)
    bb = model.backbone
    pp = bb.preprocess

    class ImageGraph(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.query_features(x)

    class LabelGraph(nn.Module):
        def __init__(self):
            super().__init__()
            self.bb = bb

        def forward(self, x):
            return self.bb.encode_text(x)

    torch.manual_seed(0)
    _export(ImageGraph().eval(), torch.randn(2, 3, pp.size, pp.size), out / "image_encoder.onnx", "pixels",
            "query_features")
    _export(LabelGraph().eval(), bb.tokenize(["a cat", "a dog"]), out / "label_encoder.onnx", "token_ids",
            "text_features")
    try:
        tok_json = bb.tokenizer_json()
    except (AttributeError, NotImplementedError):
        tok_json = clip_tokenizer_json(bb.context_length)
    if not tok_json:
        tok_json = clip_tokenizer_json(bb.context_length)
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    prompts = list(ckpt["prompts"])
    (out / "prompts.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    names = list(ckpt["seen"]) + list(ckpt["unseen"])
    emb = LabelEmbedder(bb, prompts)(names).numpy().astype(np.float32)
    np.save(out / "labels" / "default.npy", emb, allow_pickle=False)
    (out / "labels" / "default.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    nq, d, t = model.config.head.queries, bb.embed_dim, bb.context_length
    rels = ["image_encoder.onnx", "label_encoder.onnx", "tokenizer.json", "prompts.txt", "labels/default.npy",
            "labels/default.txt"]
    files = {r: file_record(out, r) for r in rels}
    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "created": "stand-in",
        "model": {"backbone": model.config.backbone, "config": model.config.to_dict(), "queries": nq, "embed_dim": d,
                  "layers": model.config.head.layers, "token_dim": bb.token_dim, "seen": list(ckpt["seen"]),
                  "unseen": list(ckpt["unseen"])},
        "preprocess": pp.to_dict(),
        "tokenizer": {"file": "tokenizer.json", "context_length": t, "kind": "clip-bpe"},
        "prompts": {"file": "prompts.txt", "count": len(prompts)},
        "scoring": {"mode": model.config.scoring, "k": model.config.scoring_k},
        "graphs": {
            "image_encoder": {"file": "image_encoder.onnx", "precision": "fp32", "opset": 18,
                              "inputs": [{"name": "pixels", "dtype": "float32", "shape": ["batch", 3, pp.size, pp.size]}],
                              "outputs": [{"name": "query_features", "dtype": "float32", "shape": ["batch", nq, d]}],
                              "dynamic_axes": {"pixels": {"0": "batch"}, "query_features": {"0": "batch"}}},
            "label_encoder": {"file": "label_encoder.onnx", "precision": "fp32", "opset": 18,
                              "inputs": [{"name": "token_ids", "dtype": "int64", "shape": ["batch", t]}],
                              "outputs": [{"name": "text_features", "dtype": "float32", "shape": ["batch", d]}],
                              "dynamic_axes": {"token_ids": {"0": "batch"}, "text_features": {"0": "batch"}}},
        },
        "label_banks": {"default": {"file": "labels/default.npy", "names_file": "labels/default.txt",
                                    "shape": list(emb.shape), "dtype": "float32",
                                    "key": bank_key(files["label_encoder.onnx"]["sha256"],
                                                    files["prompts.txt"]["sha256"], names)}},
        "engines": [],
        "files": files,
        "versions": {"torch": torch.__version__},
    }
    write_manifest(out, manifest)
    return out
