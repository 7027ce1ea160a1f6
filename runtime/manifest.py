"""The bundle manifest: the contract between `qks-export`, this runtime and C++ readers.

`manifest.json` (schema_version 1) is a JSON object:

    {
      "format": "qks-bundle", "schema_version": 1, "created": ISO-8601 UTC,
      "model": {"backbone": spec, "config": ModelConfig dict, "queries": Nq, "embed_dim": D,
                "layers": L, "token_dim": C, "seen": [labels], "unseen": [labels]},
      "preprocess": {"size", "resize_mode", "interpolation", "mean", "std"},     # Preprocess
      "tokenizer": {"file": "tokenizer.json", "context_length": T, "kind": "clip-bpe" | "bpe" | "unigram" | "wordpiece"},
      "prompts": {"file": "prompts.txt", "count": n},         # one template a line, `{}` = label
      "scoring": {"mode": "max" | "topk", "k": int},           # logits -> sigmoid probabilities
      "graphs": {                                              # name -> graph record
        "image_encoder" | "image_encoder_fp16" | "label_encoder" | ...: {
          "file": "image_encoder.onnx", "precision": "fp32" | "fp16" | "int8", "opset": int,
          "inputs":  [{"name", "dtype", "shape": [int or axis-name]}],
          "outputs": [{"name", "dtype", "shape": [...]}],
          "dynamic_axes": {"tensor name": {"0": "batch"}},
          "verification": {output name: {"max_abs_err", "cosine", ...}, ...}}},
      "label_banks": {name: {"file": "labels/<name>.npy",      # float32 [L, D], no pickle
                             "names_file": "labels/<name>.txt", # UTF-8, one label a line
                             "shape": [L, D], "dtype": "float32", "key": bank_key(...)}},
      "engines": [ {"file": "engines/<...>.plan", "graph": name, ...} ],      # TensorRT plans
      "files": {relative path: {"sha256": hex, "bytes": int}},  # every file the bundle holds
      "versions": {"qks": ..., "torch": ..., "open_clip": ..., "onnx": ..., ...}
    }

Image graph: input "pixels" float32 [batch, 3, H, W] -> output "query_features" float32
[batch, Nq, D] (Nq = the image-token count for a projection-only head, `layers` 0). Label graph: "token_ids" int64 [batch, T] (+ "attention_mask" int64 [batch, T]
where the encoder needs one) -> "text_features" float32 [batch, D], unnormalised. A label's
embedding is the mean of text_features over the label's prompts (`template.format(label)`).

Every path is relative, POSIX-style, inside the bundle: no absolute paths, no `..`, no
backslashes. Readers refuse anything else, and any schema_version they do not know.

Optional, read by the runtime (added after schema_version 1 was first written; absent is fine):
- "default_bank": name — the bank `qks-infer` uses without --labels/--bank. Without it: the bank
  named "default", else the only bank.
- "model" may also carry "kind" ("qks": a trained head; "zero-shot": a backbone alone, `qks-export
  --zero-shot`, "config" null) and "family" (the image tower's adapter: "openclip-vit", "timm",
  "modified-resnet", "lite"). A zero-shot bundle keeps the contract: its image graph gives [B, M, D+1]
  = [normalised image embedding, 1] and its label graph [scale * normalised text embedding, bias], so
  the max of dot products is the model's own logit; "scoring" then also has "zero_shot": {"trained_with"
  ("sigmoid" | "softmax" | "none"), "scale", "bias", "calibrated", "normalize", "formula"}.
- "embedding": {"output": "embedding", "dim": E, "dtype": "float32", "normalized": true, "graphs": [image
  graph names], "source": ..., "text": {"graph": "label_encoder", "output": "text_features", "dims": E,
  "normalize": true, "rule": ...}} — every image graph (fp32, fp16, int8, and the TensorRT plans built
  from them) has a second output "embedding" float32 [batch, E]: the backbone's own pooled image
  embedding, L2-normalised (similar-image search, near-duplicates). A text's embedding in the same
  space is the label graph's text_features, first E values, L2-normalised. Absent in bundles exported
  before it: they still tag, and asking them for embeddings is a one-line error.
- "preprocess" may also carry "channels": "RGB", "layout": "NCHW", "crop": "center",
  "value_range": [0, 1]; the runtime implements exactly these and refuses other values.
- TensorRT plans: each `engines/<stem>.plan` has a JSON sidecar, named by the engines entry's
  "sidecar" (`engines/<stem>.json`; readers also try `<stem>.plan.json`), listed in "files", with
  "graph", "graph_sha256", "trt_module" (the import name: "tensorrt", "tensorrt_rtx" or
  "tensorrt_rtx_bindings"), "trt_flavor" ("tensorrt" | "tensorrt_rtx"), "trt_version" (the module's
  __version__), "sm" (compute capability, "90"), "gpu_name", "precision", "profile" ({input:
  {"min": shape, "opt": shape, "max": shape}}), "inputs"/"outputs" ([{"name", "dtype", "shape"
  (-1 = batch)}]), "io_source", "strongly_typed", "timing_cache" (bundle path or null), "built".
  Plan stems: <graph>-<graph sha256[:12]>-<trt|trtrtx><version>-sm<MM>. The runtime refuses a plan
  whose trt_module/trt_version/sm differ from the machine's.
- `labels/cache/<bank_key>.npy|.txt`: label banks the runtime computed for new label lists. Not in
  "files" (a cache, not part of the export); found by key, checked against their names, and
  recomputed if damaged. `qks-labels --name N` instead adds labels/N.npy + labels/N.txt to
  "label_banks" and "files".
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from qks.hashing import sha256_file  # noqa: F401 - part of this module's API

FORMAT = "qks-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(Exception):
    """A bundle that cannot be used as it is; the message says why, in one line."""


def check_relpath(path: str) -> str:
    """A manifest path: relative, POSIX, inside the bundle. Returns it or raises BundleError."""
    if not isinstance(path, str) or not path:
        raise BundleError(f"manifest path {path!r} is not a file name")
    p = PurePosixPath(path)
    if "\\" in path or "\0" in path or p.is_absolute() or path.startswith("~") or any(part in ("..", ".", "") for part in path.split("/")):
        raise BundleError(f"manifest path {path!r} must be a plain relative path inside the bundle")
    return path


def resolve(bundle_dir: str | Path, path: str) -> Path:
    """The file a manifest path names, refusing any that would leave the bundle (symlinks too)."""
    root = Path(bundle_dir).resolve()
    full = (root / check_relpath(path)).resolve()
    if root != full and root not in full.parents:
        raise BundleError(f"manifest path {path!r} points outside the bundle")
    return full


def file_record(bundle_dir: str | Path, path: str) -> dict:
    full = resolve(bundle_dir, path)
    return {"sha256": sha256_file(full), "bytes": full.stat().st_size}


def bank_key(label_encoder_sha256: str, prompts_sha256: str, names: list[str]) -> str:
    """Identity of a label bank: the label encoder graph, the prompt pool and the label list."""
    h = hashlib.sha256()
    for part in (label_encoder_sha256, prompts_sha256, *names):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def write_manifest(bundle_dir: str | Path, manifest: dict) -> Path:
    """Write manifest.json atomically (temp file + rename): a reader never sees half a manifest."""
    out = Path(bundle_dir) / MANIFEST
    tmp = out.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def read_manifest(bundle_dir: str | Path) -> dict:
    """Parse and check the manifest's format, schema version and every path in `files`."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: not a qks bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: manifest is not valid JSON ({e})") from None
    except RecursionError:
        raise BundleError(f"{path}: manifest is not valid JSON (nested too deeply)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a qks bundle manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path}: bundle schema version {version!r} is not supported "
                          f"(this qks reads version {SCHEMA_VERSION}); re-export it with this qks")
    files = manifest.get("files", {})
    for rel in files if isinstance(files, dict) else ():  # not an object: Bundle.load says "lists no files"
        check_relpath(rel)
    return manifest
