"""The export as named steps over one `ExportJob`: graphs, tokenizer, banks, fp32 verification, FP16,
INT8, TensorRT, manifest. `run_steps` runs them in that order into a folder; `qks.export.bundle` owns the
folder (temporary, then swapped in atomically) and the public API.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import platform
import random
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import verify as V
from .errors import ExportError, one_line
from .graphs import TRACE_BATCH, export_onnx, image_encoder_spec, label_encoder_spec
from .sources import ExportSource

RANDOM_IMAGES = 8  # fresh random images for verification
RANDOM_TEXTS = 16  # fresh random label strings for verification
CALIBRATION_LIMIT = 32  # images read from --calibration-images


@dataclass
class ExportJob:
    """Everything the steps share: inputs, then what each step adds."""

    d: Path  # the folder being written
    source: ExportSource
    options: object  # qks.export.bundle.ExportOptions
    label_cache: Path | None
    log: object
    seconds: dict[str, float] = field(default_factory=dict)
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # verification pixels by kind
    image_names: list[str] = field(default_factory=list)
    image_spec: object = None
    label_spec: object = None
    tokenizer_json: str = ""
    tokenizer_record: dict = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)  # verification texts by kind
    bank_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    torch_qf: dict[str, np.ndarray] = field(default_factory=dict)
    onnx_qf: dict[str, np.ndarray] = field(default_factory=dict)
    torch_emb: dict[str, np.ndarray] = field(default_factory=dict)  # the image embedding, by kind
    onnx_emb: dict[str, np.ndarray] = field(default_factory=dict)
    graphs: dict[str, dict] = field(default_factory=dict)
    engines: list[dict] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, name: str):
        t = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t

    @property
    def default_bank(self) -> np.ndarray:
        return self.bank_arrays[self.source.default_bank]


def run_steps(job: ExportJob) -> None:
    for step in (read_images, export_graphs, write_tokenizer, write_banks, verify_fp32, add_fp16, add_int8,
                 hash_graphs, build_tensorrt, write_manifest_file):
        step(job)


# ---------------------------------------------------------------------------------------------
# the steps


def read_images(job: ExportJob) -> None:
    """Verification images: fresh random ones, and the real ones first so a bad folder fails early."""
    size = int(job.source.backbone.preprocess.size)
    gen = torch.Generator().manual_seed(job.options.seed)
    job.images["random"] = torch.randn(RANDOM_IMAGES, 3, size, size, generator=gen)
    if job.options.calibration_images is not None:
        from .images import load_images

        job.images["calibration"], job.image_names = load_images(
            job.options.calibration_images, job.source.backbone.preprocess, CALIBRATION_LIMIT)


def export_graphs(job: ExportJob) -> None:
    src, opset = job.source, job.options.opset
    backbone = src.backbone
    size, T = int(backbone.preprocess.size), int(backbone.context_length)
    D = int(src.model_record["embed_dim"])
    job.image_spec = image_encoder_spec(size, int(src.model_record["queries"]), D, int(backbone.embed_dim))
    job.label_spec = label_encoder_spec(T, D)
    gen = torch.Generator().manual_seed(job.options.seed + 1)
    with job.timed("export_image_encoder"):
        job.log("exporting image_encoder.onnx")
        export_onnx(src.image_module, torch.randn(TRACE_BATCH, 3, size, size, generator=gen),
                    job.d / "image_encoder.onnx", job.image_spec, opset)
    with job.timed("export_label_encoder"):
        job.log("exporting label_encoder.onnx")
        names = [n for names in src.banks.values() for n in names] + ["object", "scene"]
        example = [src.templates[0].format(n) for n in names[:TRACE_BATCH]]
        export_onnx(src.label_module, backbone.tokenize(example), job.d / "label_encoder.onnx", job.label_spec, opset)


def write_tokenizer(job: ExportJob) -> None:
    """tokenizer.json (checked against the backbone's tokenizer on every bank prompt) and prompts.txt."""
    src = job.source
    rng = random.Random(job.options.seed)
    with job.timed("tokenizer"):
        try:
            job.tokenizer_json = src.backbone.tokenizer_json()
        except ValueError as e:
            raise ExportError(f"the backbone's tokenizer cannot be written as tokenizer.json: {one_line(e)}") from None
        (job.d / "tokenizer.json").write_text(job.tokenizer_json, encoding="utf-8")
        bank_texts = [tpl.format(n) for names in src.banks.values() for n in names for tpl in src.templates]
        random_texts = _random_texts(rng, RANDOM_TEXTS)
        job.tokenizer_record = _verify_tokenizer(job.tokenizer_json, src.backbone, bank_texts, random_texts,
                                                 int(src.backbone.context_length))
        (job.d / "prompts.txt").write_text("".join(tpl + "\n" for tpl in src.templates), encoding="utf-8")
    job.texts = {"random": random_texts, "prompts": _sample(rng, bank_texts, RANDOM_TEXTS)}


def write_banks(job: ExportJob) -> None:
    """Every bank through the training-time LabelEmbedder (the mean over prompts), as labels/<name>.npy."""
    from qks.prompts import LabelEmbedder

    src = job.source
    D = int(src.model_record["embed_dim"])
    with job.timed("label_banks"):
        job.log(f"embedding {sum(len(v) for v in src.banks.values())} labels x {len(src.templates)} prompts")
        embedder = LabelEmbedder(src.text_encoder, src.templates, cache_dir=job.label_cache)
        (job.d / "labels").mkdir()
        with torch.no_grad():
            for name, names in src.banks.items():
                arr = embedder(names).numpy().astype(np.float32)
                if arr.shape != (len(names), D):
                    raise ExportError(f"label bank {name!r} has shape {list(arr.shape)}, expected {[len(names), D]}")
                np.save(job.d / "labels" / f"{name}.npy", arr, allow_pickle=False)
                (job.d / "labels" / f"{name}.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
                job.bank_arrays[name] = arr


def verify_fp32(job: ExportJob) -> None:
    """Both fp32 graphs against PyTorch, and the default bank recomputed the runtime's way."""
    with job.timed("verify_fp32"):
        image_ver = _verify_image_graph(job)
        label_ver = _verify_label_graph(job)
    tolerance = {"reference": "pytorch", "tolerance": {"rel_err_max": V.FP32_REL_TOL}}
    opset = job.options.opset
    job.graphs["image_encoder"] = _graph_record("image_encoder.onnx", "fp32", opset, job.image_spec,
                                                {**tolerance, **image_ver})
    job.graphs["label_encoder"] = _graph_record("label_encoder.onnx", "fp32", opset, job.label_spec,
                                                {**tolerance, **label_ver})


def add_fp16(job: ExportJob) -> None:
    """image_encoder.fp16.onnx, gated against the fp32 graph (cosine and top-5 agreement)."""
    if not job.options.fp16:
        return
    from .fp16 import convert_to_fp16, fp16_summary

    with job.timed("fp16_convert"):
        job.log("converting image_encoder to FP16")
        convert_to_fp16(job.d / "image_encoder.onnx", job.d / "image_encoder.fp16.onnx")
    with job.timed("verify_fp16"):
        job.log("verifying image_encoder.fp16.onnx against the fp32 graph")
        ver16 = _verify_fp16(job)
    rec = _graph_record("image_encoder.fp16.onnx", "fp16", job.options.opset, job.image_spec, ver16)
    rec["source"] = "image_encoder"
    rec["fp16"] = fp16_summary(job.d / "image_encoder.fp16.onnx")
    job.graphs["image_encoder_fp16"] = rec


def add_int8(job: ExportJob) -> None:
    """The CPU fast path (qks.export.int8), verified against the fp32 graph like the FP16 graph."""
    if not job.options.int8:
        return
    from .int8 import GRAPH_FILE, GRAPH_NAME, make_int8_graph

    with job.timed("int8"):
        job.log("quantizing image_encoder to INT8 and verifying it against the fp32 graph")
        ver8, summary8 = make_int8_graph(job.d, {kind: px.numpy() for kind, px in job.images.items()}, job.onnx_qf,
                                         job.default_bank, job.source.default_bank, reference_embedding=job.onnx_emb)
    rec = _graph_record(GRAPH_FILE, "int8", job.options.opset, job.image_spec, ver8)
    rec["source"] = "image_encoder"
    rec["int8"] = summary8
    job.graphs[GRAPH_NAME] = rec


def hash_graphs(job: ExportJob) -> None:
    from qks.runtime.manifest import sha256_file

    for rec in job.graphs.values():
        rec["sha256"] = sha256_file(job.d / rec["file"])
        rec["bytes"] = (job.d / rec["file"]).stat().st_size


def build_tensorrt(job: ExportJob) -> None:
    if not job.options.tensorrt:
        return
    from .tensorrt_build import build_engines

    targets = ["image_encoder_fp16" if job.options.fp16 else "image_encoder", "label_encoder"]
    with job.timed("tensorrt"):
        job.log(f"building TensorRT engines for {', '.join(targets)}")
        job.engines = build_engines(job.d, {g: job.graphs[g] for g in targets}, max_batch=job.options.max_batch,
                                    compute_capability=job.options.trt_compute_capability, log=job.log)


def write_manifest_file(job: ExportJob) -> None:
    """manifest.json, last: every file's record, checked to name only plain paths inside the bundle."""
    from qks.runtime.manifest import FORMAT, SCHEMA_VERSION, file_record, write_manifest

    files = {p.relative_to(job.d).as_posix(): file_record(job.d, p.relative_to(job.d).as_posix())
             for p in sorted(job.d.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    pre = job.source.backbone.preprocess
    trt = job.engines[0] if job.engines else {}
    job.manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "model": job.source.model_record,
        "preprocess": {**pre.to_dict(), "mean": list(pre.mean), "std": list(pre.std),
                       **({"crop": "center"} if pre.resize_mode == "shortest" else {}),
                       "channels": "RGB", "layout": "NCHW", "value_range": [0.0, 1.0]},
        "tokenizer": job.tokenizer_record,
        "prompts": {"file": "prompts.txt", "count": len(job.source.templates)},
        "scoring": job.source.scoring_record,
        "graphs": job.graphs,
        "embedding": _embedding_record(job),
        "label_banks": _bank_records(job, files),
        "default_bank": job.source.default_bank,
        "engines": job.engines,
        "files": files,
        "versions": _versions(trt.get("trt_module"), trt.get("trt_version")),
        "export": {"opset": job.options.opset, "seed": job.options.seed, "trace_batch": TRACE_BATCH,
                   "calibration_images": job.image_names, "label_cache_used": job.label_cache is not None,
                   "seconds": {k: round(v, 3) for k, v in job.seconds.items()}},
    }
    _check_manifest(job.manifest)
    write_manifest(job.d, job.manifest)


# ---------------------------------------------------------------------------------------------
# verification


def _verify_image_graph(job: ExportJob) -> dict:
    job.log("verifying image_encoder.onnx against PyTorch")
    sess = V.ort_session(job.d / "image_encoder.onnx")
    ver = {}
    for kind, pixels in job.images.items():
        with torch.no_grad():
            qf, emb = job.source.image_module(pixels)
        job.torch_qf[kind], job.torch_emb[kind] = qf.numpy(), emb.numpy()
        out = V.outputs_by_name(sess, {"pixels": pixels.numpy()})
        job.onnx_qf[kind], job.onnx_emb[kind] = out["query_features"], out[V.EMBEDDING_OUTPUT]
        m = V.compare(job.onnx_qf[kind], job.torch_qf[kind], queries=True)
        V.check_fp32("image_encoder", "query_features", kind, m)
        e = V.compare(job.onnx_emb[kind], job.torch_emb[kind])
        V.check_fp32("image_encoder", V.EMBEDDING_OUTPUT, kind, e)
        ver[kind] = {"query_features": {**m, "samples": len(pixels)}, V.EMBEDDING_OUTPUT: {**e, "samples": len(pixels)}}
    return ver


def _verify_label_graph(job: ExportJob) -> dict:
    job.log("verifying label_encoder.onnx against PyTorch")
    src = job.source
    sess = V.ort_session(job.d / "label_encoder.onnx")
    ver = {}
    for kind, batch in job.texts.items():
        ids = src.backbone.tokenize(batch)
        with torch.no_grad():
            ref = src.label_module(ids).numpy()
        got = sess.run(None, {"token_ids": ids.numpy().astype(np.int64)})[0]
        m = V.compare(got, ref)
        V.check_fp32("label_encoder", "text_features", kind, m)
        ver[kind] = {"text_features": {**m, "samples": len(batch)},
                     "text_embedding": _verify_text_embedding(job, ids, got, kind)}
    # the default bank recomputed the runtime's way: tokenizer.json ids -> ONNX -> mean over prompts
    names = src.banks[src.default_bank][:4]
    bank_onnx = _bank_through_onnx(job.tokenizer_json, sess, src.templates, names)
    m = V.compare(bank_onnx, job.default_bank[:len(names)])
    V.check_fp32("label_encoder", "label bank", "default-bank", m)
    ver["default_bank"] = {"label_embeddings": {**m, "samples": len(bank_onnx),
                                                "via": "tokenizer.json + label_encoder.onnx"}}
    return ver


def _verify_fp16(job: ExportJob) -> dict:
    sess = V.ort_session(job.d / "image_encoder.fp16.onnx")
    bank = job.default_bank
    ver = {"reference": "image_encoder (fp32 ONNX)",
           "tolerance": {"cosine_min": V.FP16_COSINE_MIN, "top5_agreement_min": V.FP16_TOP5_MIN}}
    all16, all32 = [], []
    for kind, pixels in job.images.items():
        out = V.outputs_by_name(sess, {"pixels": pixels.numpy()})
        qf16, qf32 = out["query_features"], job.onnx_qf[kind]
        m = V.compare(qf16, qf32, queries=True)
        agree = V.topk_agreement(V.scores(qf16, bank), V.scores(qf32, bank))
        V.check_fp16("image_encoder_fp16", kind, m, agree)
        m_torch = V.compare(qf16, job.torch_qf[kind], queries=True)
        emb = V.check_embedding("image_encoder_fp16", kind, out[V.EMBEDDING_OUTPUT], job.onnx_emb[kind],
                                V.FP16_COSINE_MIN)
        ver[kind] = {"query_features": {**m, "samples": len(pixels), f"top{V.TOPK}_agreement": agree,
                                        "bank": job.source.default_bank,
                                        "vs_pytorch": {k: m_torch[k] for k in ("max_abs_err", "cosine_min")}},
                     V.EMBEDDING_OUTPUT: {**emb, "samples": len(pixels), "cosine_gate": V.FP16_COSINE_MIN}}
        all16.append(qf16)
        all32.append(qf32)
    agree_all = V.topk_agreement(V.scores(np.concatenate(all16), bank), V.scores(np.concatenate(all32), bank))
    V.check_fp16("image_encoder_fp16", "all verification", {"finite": True, "cosine_min": 1.0}, agree_all)
    ver[f"top{V.TOPK}_agreement"] = agree_all
    return ver


def _verify_text_embedding(job: ExportJob, ids: torch.Tensor, text_features: np.ndarray, kind: str) -> dict:
    """The text side of search: normalise(text_features[:, :E]) from the ONNX label graph must be the
    backbone's own normalised text embedding (a zero-shot graph appends the bias and scales; a
    checkpoint's gives encode_text itself)."""
    import torch.nn.functional as F

    E = int(job.source.backbone.embed_dim)
    with torch.no_grad():
        ref = F.normalize(job.source.backbone.encode_text(ids), dim=-1).numpy()
    from qks.runtime.embeddings import text_embedding

    m = V.compare(text_embedding(text_features, E), ref)
    V.check_fp32("label_encoder", "text embedding (normalised text_features[:, :E])", kind, m)
    return {**m, "samples": len(ids)}


def _embedding_record(job: ExportJob) -> dict:
    """The manifest's "embedding": which output of the image graphs is the image embedding, and how a text
    lands in the same space (see qks.runtime.manifest)."""
    E = int(job.source.backbone.embed_dim)
    return {"output": V.EMBEDDING_OUTPUT, "dim": E, "dtype": "float32", "normalized": True,
            "graphs": [g for g, rec in job.graphs.items() if rec["file"].startswith("image_encoder")],
            "source": "the backbone's zero-shot image features, mean over their vectors, L2-normalised",
            "text": {"graph": "label_encoder", "output": "text_features", "dims": E, "normalize": True,
                     "rule": "L2-normalise the first `dims` values of text_features"}}


def _verify_tokenizer(tok_json: str, backbone, bank_texts: list[str], random_texts: list[str], T: int) -> dict:
    """tokenizer.json must give the backbone's ids on every prompt of every bank label (the runtime
    computes new labels with it) and on random strings."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(tok_json)
    except Exception as e:
        raise ExportError(f"the backbone's tokenizer.json does not load in `tokenizers`: {one_line(e)}") from e
    texts = list(dict.fromkeys(bank_texts + random_texts))
    mismatches, first = 0, None
    for i in range(0, len(texts), 1024):
        chunk = texts[i:i + 1024]
        ref = backbone.tokenize(chunk).numpy()
        got = [e.ids for e in tok.encode_batch(chunk)]
        for text, r, g in zip(chunk, ref, got, strict=True):
            if list(r) != list(g):
                mismatches += 1
                first = first or text
    if mismatches:
        raise ExportError(f"tokenizer.json gives other ids than the backbone's tokenizer for {mismatches} of "
                          f"{len(texts)} texts, e.g. {first!r}")
    data = json.loads(tok_json)
    kind = _tokenizer_kind(data.get("model", {}))
    pad_id = (data.get("padding") or {}).get("pad_id", 0)
    return {"file": "tokenizer.json", "context_length": T, "kind": kind, "pad_id": pad_id,
            "verification": {"texts": len(texts), "mismatches": 0, "reference": "backbone.tokenize"}}


def _tokenizer_kind(model: dict) -> str:
    """What the manifest calls the tokenizer: CLIP's BPE (word-end suffix), a SentencePiece BPE (Gemma,
    SigLIP2), Unigram (T5, SigLIP) or WordPiece (BERT, MiniLM)."""
    kind = model.get("type")
    if kind == "BPE":
        return "clip-bpe" if model.get("end_of_word_suffix") == "</w>" else "bpe"
    return {"WordPiece": "wordpiece", "Unigram": "unigram"}.get(kind, "other")


def _bank_through_onnx(tok_json: str, sess, templates: list[str], names: list[str]) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    out = []
    for n in names:
        ids = np.array([e.ids for e in tok.encode_batch([tpl.format(n) for tpl in templates])], dtype=np.int64)
        out.append(sess.run(None, {"token_ids": ids})[0].astype(np.float64).mean(axis=0))
    return np.stack(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# helpers


def _graph_record(file: str, precision: str, opset: int, spec, verification: dict) -> dict:
    return {"file": file, "precision": precision, "opset": opset, **spec.io_dict(), "verification": verification}


def _bank_records(job: ExportJob, files: dict) -> dict:
    from qks.runtime.manifest import bank_key

    prompts_sha = files["prompts.txt"]["sha256"]
    return {name: {"file": f"labels/{name}.npy", "names_file": f"labels/{name}.txt",
                   "shape": list(job.bank_arrays[name].shape), "dtype": "float32", "count": len(names),
                   "key": bank_key(job.graphs["label_encoder"]["sha256"], prompts_sha, names)}
            for name, names in job.source.banks.items()}


def _random_texts(rng: random.Random, n: int) -> list[str]:
    """Fresh random label-like strings: 1-4 words of 2-10 lowercase letters, some with digits."""
    out = []
    for _ in range(n):
        words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10)))
                 for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.25:
            words.append(str(rng.randint(0, 999)))
        out.append(" ".join(words))
    return out


def _sample(rng: random.Random, items: list[str], n: int) -> list[str]:
    return list(items) if len(items) <= n else rng.sample(items, n)


def _check_manifest(manifest: dict) -> None:
    """Every path the manifest names is a plain relative path to a file in the bundle."""
    from qks.runtime.manifest import BundleError, check_relpath

    paths = [g["file"] for g in manifest["graphs"].values()]
    paths += [manifest["tokenizer"]["file"], manifest["prompts"]["file"]]
    for b in manifest["label_banks"].values():
        paths += [b["file"], b["names_file"]]
    paths += [e["file"] for e in manifest["engines"]] + [e["sidecar"] for e in manifest["engines"] if "sidecar" in e]
    try:
        for p in paths + list(manifest["files"]):
            check_relpath(p)
            if p not in manifest["files"]:
                raise ExportError(f"internal error: {p} is not in the manifest's files map")
    except BundleError as e:
        raise ExportError(f"internal error: {e}") from None


def _versions(tensorrt_module: str | None = None, tensorrt_version: str | None = None) -> dict:
    import importlib.metadata as md

    import qks

    v = {"qks": qks.__version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": np.__version__}
    for dist, key in (("open_clip_torch", "open_clip"), ("timm", "timm"), ("onnx", "onnx"), ("onnxscript", "onnxscript"),
                      ("onnxruntime", "onnxruntime"), ("onnxconverter-common", "onnxconverter_common"),
                      ("tokenizers", "tokenizers")):
        try:
            v[key] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if tensorrt_module:
        v[tensorrt_module] = tensorrt_version
    return v
