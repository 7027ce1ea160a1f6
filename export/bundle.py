"""Checkpoint -> bundle: the two ONNX graphs, tokenizer, prompts, label banks, verification, FP16
and TensorRT engines, described by `manifest.json` (the contract in `qks.runtime.manifest`).

Everything is written into a temporary folder next to `out`; the manifest is written last
(atomically), and only then is the folder renamed to `out`. A killed export leaves at most a
`.<name>.tmp-<host>-<pid>-*` folder behind, never a bundle that looks complete; the next export to the
same `out` on that host deletes it once its process is gone.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import platform
import random
import re
import shutil
import string
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import verify as V
from .errors import ExportError, one_line
from .graphs import (
    DEFAULT_OPSET,
    TRACE_BATCH,
    ImageEncoder,
    LabelEncoder,
    export_onnx,
    image_encoder_spec,
    label_encoder_spec,
)

DEFAULT_BANK = "default"
BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RANDOM_IMAGES = 8  # fresh random images for verification
RANDOM_TEXTS = 16  # fresh random label strings for verification
CALIBRATION_LIMIT = 32  # images read from --calibration-images
TOKENIZER_KINDS = {"BPE": "clip-bpe", "WordPiece": "wordpiece"}


@dataclass
class ExportReport:
    """What an export did (returned by `export_bundle_report`, printed by the CLI)."""

    path: Path
    manifest: dict
    seconds: dict[str, float] = field(default_factory=dict)


def export_bundle(ckpt: str | Path, out: str | Path, labels: dict[str, list[str]] | None = None,
                  fp16: bool = False, tensorrt: bool = False, max_batch: int = 32,
                  calibration_images: str | Path | None = None, opset: int = DEFAULT_OPSET,
                  overwrite: bool = True, seed: int = 0, trt_compute_capability: str | None = None,
                  label_cache: str | Path | None = None, log=None, int8: bool = False) -> Path:
    """Export checkpoint `ckpt` to the bundle folder `out`; returns `out`.

    `labels`: extra label banks, name -> label texts (the checkpoint's seen + unseen labels always
    form the bank "default"). `fp16`: also write `image_encoder.fp16.onnx`. `int8`: also write
    `image_encoder.int8.onnx` (INT8 matrix products for CPUs, `qks.export.int8`). `tensorrt`: build
    TensorRT plans under `engines/` (profile batch 1..`max_batch`). `calibration_images`: a folder
    of real images used, with fresh random inputs, to verify the graphs. `overwrite`: replace an
    existing bundle at `out` (a non-empty folder that is not a bundle is never replaced).
    `trt_compute_capability`: TensorRT for RTX's target without a GPU ("86"; default SM86).
    `label_cache`: `qks.prompts.LabelEmbedder`'s cache folder (one .npy per label, keyed by the text
    encoder's weights, the prompt pool and the label); default: `label_cache/` beside the checkpoint
    when it exists and is writable (what qks-train and qks-eval fill), so a run's labels are not
    re-embedded (minutes per hundred labels on a CPU for ViT-B-16).
    Raises `ExportError` (one-line message) for anything the user can fix.
    """
    return export_bundle_report(ckpt, out, labels=labels, fp16=fp16, tensorrt=tensorrt, max_batch=max_batch,
                                calibration_images=calibration_images, opset=opset, overwrite=overwrite,
                                seed=seed, trt_compute_capability=trt_compute_capability,
                                label_cache=label_cache, log=log, int8=int8).path


def export_bundle_report(ckpt, out, labels=None, fp16=False, tensorrt=False, max_batch=32,
                         calibration_images=None, opset=DEFAULT_OPSET, overwrite=True, seed=0,
                         trt_compute_capability=None, label_cache=None, log=None, int8=False) -> ExportReport:
    log = log or (lambda msg: None)
    out = Path(out)
    if max_batch < 1:
        raise ExportError(f"--max-batch must be >= 1 (got {max_batch})")
    _check_dependencies(fp16)
    banks = _check_banks(labels or {})
    _check_out(out, overwrite)
    ckpt_dict, model = _load(ckpt)
    banks = {DEFAULT_BANK: list(ckpt_dict["seen"]) + list(ckpt_dict["unseen"]), **banks}
    if tensorrt:  # fail before minutes of export, not after
        from .tensorrt_build import import_tensorrt

        import_tensorrt()
    _remove_stale_temps(out, log)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    except OSError as e:
        raise ExportError(f"cannot write the bundle next to {out}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a bundle is an ordinary folder
    try:
        report = _export_into(tmp, ckpt_dict, model, banks, fp16, tensorrt, max_batch,
                              calibration_images, opset, seed, trt_compute_capability,
                              _label_cache(ckpt, label_cache), log, int8)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.path = out
    return report


# ---------------------------------------------------------------------------------------------
# inputs


def _check_dependencies(fp16: bool) -> None:
    """The optional packages export needs, named with the extra that installs them."""
    import importlib.util

    needed = [("onnx", "export"), ("onnxscript", "export"), ("onnxruntime", "core"), ("tokenizers", "core"),
              ("open_clip", "train"), ("torchvision", "train")]
    if fp16:
        needed.append(("onnxconverter_common", "export"))
    missing = [(m, extra) for m, extra in needed if importlib.util.find_spec(m) is None]
    if missing:
        extras = sorted({extra for _, extra in missing if extra != "core"})
        hint = f"pip install 'qks[{','.join(extras)}]'" if extras else "pip install qks"
        raise ExportError(f"qks-export needs {', '.join(m for m, _ in missing)}: {hint}")


def _check_banks(labels: dict[str, list[str]]) -> dict[str, list[str]]:
    banks = {}
    for name, names in labels.items():
        if not BANK_NAME.match(name):
            raise ExportError(f"label bank name {name!r}: use letters, digits, '_', '-', '.' (it names files)")
        if name == DEFAULT_BANK:
            raise ExportError(f"label bank name {DEFAULT_BANK!r} is reserved for the checkpoint's labels")
        names = [str(n) for n in names]
        if not names:
            raise ExportError(f"label bank {name!r} has no labels")
        bad = [n for n in names if not n.strip() or "\n" in n or "\r" in n or n != n.strip()]
        if bad:
            raise ExportError(f"label bank {name!r}: label {bad[0]!r} is empty, spans lines or has surrounding spaces")
        seen = set()
        for n in names:
            if n in seen:
                raise ExportError(f"label bank {name!r}: duplicate label {n!r}")
            seen.add(n)
        banks[name] = names
    return banks


def read_labels_file(path: str | Path) -> tuple[str, list[str]]:
    """A labels file (UTF-8, one label a line; blank lines and `#` comments skipped) -> (bank name =
    file stem, labels)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"labels file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first label
    except UnicodeDecodeError:
        raise ExportError(f"labels file {path} is not UTF-8 text") from None
    names = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise ExportError(f"labels file {path} has no labels")
    return path.stem, names


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"output {out} exists and is not a folder")
        from qks.runtime.manifest import MANIFEST

        if any(out.iterdir()):
            if not (out / MANIFEST).is_file():
                raise ExportError(f"output {out} is a non-empty folder that is not a qks bundle; refusing to replace it")
            if not overwrite:
                raise ExportError(f"output {out} already holds a bundle (pass overwrite to replace it)")
    parent = out.parent
    if not parent.is_dir():
        raise ExportError(f"output folder's parent {parent} does not exist")


def _label_cache(ckpt, label_cache) -> Path | None:
    if label_cache is not None:
        path = Path(label_cache)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExportError(f"label cache {path}: cannot create it ({e.strerror or e})") from None
        return path
    default = Path(ckpt).parent / "label_cache"
    return default if default.is_dir() and os.access(default, os.W_OK | os.X_OK) else None


def _load(ckpt):
    from qks.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

    try:
        ckpt_dict = load_checkpoint(ckpt)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    try:
        model = model_from_checkpoint(ckpt_dict)
    except Exception as e:  # backbone construction: unknown arch, weights not available offline, ...
        raise ExportError(f"cannot rebuild the model of {ckpt}: {one_line(e)}") from e
    return ckpt_dict, model.eval()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the C
    library, kernel or filesystem cannot."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", platform.node() or "host")


def _temp_prefix(out: Path) -> str:
    # The exporting host and process in the name: a later export can tell a folder left by a killed
    # export (its process is gone) from one that another export is still writing.
    return f".{out.name}.tmp-{_host()}-{os.getpid()}-"


_TEMP_OWNER = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, someone else's
        return True
    return True


def _remove_stale_temps(out: Path, log) -> None:
    """Delete the temp folders that killed exports to `out` left on this host (their process is gone).
    Folders of live exports, of other hosts, or named the old way (no owner) are left alone."""
    for t in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        m = _TEMP_OWNER.search(t.name)
        if m is None or m["host"] != _host() or _alive(int(m["pid"])) or not t.is_dir():
            continue
        shutil.rmtree(t, ignore_errors=True)
        log(f"removed {t.name}: left by an export that was killed (process {m['pid']} is gone)")


def _remove_bundle(path: Path) -> None:
    """Delete a replaced bundle, its manifest first: a delete cut short never leaves a folder that
    still looks like a bundle."""
    (path / "manifest.json").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place. An old bundle at `out` is swapped with the new one in
    one atomic step where the OS can (so `out` is at every instant the whole old or the whole new
    bundle), else moved aside first and removed only after the new one is in place."""
    if out.exists() and _exchange(tmp, out):
        _remove_bundle(tmp)  # now the old bundle
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time() * 1000)}")
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError as e:
        if old is not None:
            old.rename(out)
        raise ExportError(f"cannot move the bundle into {out}: {e.strerror or e}") from None
    if old is not None:
        _remove_bundle(old)


# ---------------------------------------------------------------------------------------------
# the export


def _export_into(d: Path, ckpt: dict, model, banks: dict[str, list[str]], fp16: bool, tensorrt: bool,
                 max_batch: int, calibration_images, opset: int, seed: int, trt_sm: str | None,
                 label_cache: Path | None, log, int8: bool = False) -> ExportReport:
    from qks.runtime.manifest import (
        FORMAT,
        SCHEMA_VERSION,
        bank_key,
        file_record,
        sha256_file,
        write_manifest,
    )

    from qks.prompts import LabelEmbedder

    backbone = model.backbone
    cfg = model.config
    pre = backbone.preprocess
    size, T, D = int(pre.size), int(backbone.context_length), int(backbone.embed_dim)
    templates = list(ckpt["prompts"])
    seconds: dict[str, float] = {}
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)

    # --- real images first: a bad calibration folder fails before minutes of export
    images = {"random": torch.randn(RANDOM_IMAGES, 3, size, size, generator=gen)}
    image_names: list[str] = []
    if calibration_images is not None:
        from .images import load_images

        images["calibration"], image_names = load_images(calibration_images, pre, CALIBRATION_LIMIT)

    # --- graphs
    image_module, label_module = ImageEncoder(model).eval(), LabelEncoder(backbone).eval()
    # The query count from a real forward: Nq, or the image-token count for a projection-only head.
    with torch.no_grad():
        Nq = int(image_module(torch.zeros(1, 3, size, size)).shape[1])
    image_spec = image_encoder_spec(size, Nq, D)
    label_spec = label_encoder_spec(T, D)
    t = time.perf_counter()
    log("exporting image_encoder.onnx")
    export_onnx(image_module, torch.randn(TRACE_BATCH, 3, size, size, generator=gen), d / "image_encoder.onnx",
                image_spec, opset)
    seconds["export_image_encoder"] = time.perf_counter() - t
    t = time.perf_counter()
    log("exporting label_encoder.onnx")
    example = [templates[0].format(n) for n in (banks[DEFAULT_BANK] + ["object", "scene"])[:TRACE_BATCH]]
    export_onnx(label_module, backbone.tokenize(example), d / "label_encoder.onnx", label_spec, opset)
    seconds["export_label_encoder"] = time.perf_counter() - t

    # --- tokenizer and prompts
    t = time.perf_counter()
    tok_json = backbone.tokenizer_json()
    (d / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    bank_texts = [tpl.format(n) for names in banks.values() for n in names for tpl in templates]
    random_texts = _random_texts(rng, RANDOM_TEXTS)
    tok_record = _verify_tokenizer(tok_json, backbone, bank_texts, random_texts, T)
    (d / "prompts.txt").write_text("".join(tpl + "\n" for tpl in templates), encoding="utf-8")
    seconds["tokenizer"] = time.perf_counter() - t

    # --- label banks (the training-time LabelEmbedder: unnormalised mean over prompts)
    t = time.perf_counter()
    log(f"embedding {sum(len(v) for v in banks.values())} labels x {len(templates)} prompts")
    embedder = LabelEmbedder(backbone, templates, cache_dir=label_cache)
    (d / "labels").mkdir()
    bank_arrays = {}
    with torch.no_grad():
        for name, names in banks.items():
            arr = embedder(names).numpy().astype(np.float32)
            if arr.shape != (len(names), D):
                raise ExportError(f"label bank {name!r} has shape {list(arr.shape)}, expected {[len(names), D]}")
            np.save(d / "labels" / f"{name}.npy", arr, allow_pickle=False)
            (d / "labels" / f"{name}.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
            bank_arrays[name] = arr
    seconds["label_banks"] = time.perf_counter() - t

    # --- verification inputs
    texts = {"random": random_texts, "prompts": _sample(rng, bank_texts, RANDOM_TEXTS)}

    # --- verify the fp32 graphs against PyTorch
    t = time.perf_counter()
    log("verifying image_encoder.onnx against PyTorch")
    image_sess = V.ort_session(d / "image_encoder.onnx")
    torch_qf, onnx_qf, image_ver = {}, {}, {}
    for kind, pixels in images.items():
        with torch.no_grad():
            torch_qf[kind] = image_module(pixels).numpy()
        onnx_qf[kind] = image_sess.run(None, {"pixels": pixels.numpy()})[0]
        m = V.compare(onnx_qf[kind], torch_qf[kind], queries=True)
        V.check_fp32("image_encoder", "query_features", kind, m)
        image_ver[kind] = {"query_features": {**m, "samples": len(pixels)}}
    del image_sess
    log("verifying label_encoder.onnx against PyTorch")
    label_sess = V.ort_session(d / "label_encoder.onnx")
    label_ver = {}
    for kind, batch in texts.items():
        ids = backbone.tokenize(batch)
        with torch.no_grad():
            ref = label_module(ids).numpy()
        got = label_sess.run(None, {"token_ids": ids.numpy().astype(np.int64)})[0]
        m = V.compare(got, ref)
        V.check_fp32("label_encoder", "text_features", kind, m)
        label_ver[kind] = {"text_features": {**m, "samples": len(batch)}}
    # the default bank recomputed the runtime's way: tokenizer.json ids -> ONNX -> mean over prompts
    bank_onnx = _bank_through_onnx(tok_json, label_sess, templates, banks[DEFAULT_BANK][:4])
    m = V.compare(bank_onnx, bank_arrays[DEFAULT_BANK][:4])
    V.check_fp32("label_encoder", "label bank", "default-bank", m)
    label_ver["default_bank"] = {"label_embeddings": {**m, "samples": len(bank_onnx),
                                                      "via": "tokenizer.json + label_encoder.onnx"}}
    del label_sess
    seconds["verify_fp32"] = time.perf_counter() - t

    graphs = {
        "image_encoder": _graph_record("image_encoder.onnx", "fp32", opset, image_spec,
                                       {"reference": "pytorch", "tolerance": {"rel_err_max": V.FP32_REL_TOL},
                                        **image_ver}),
        "label_encoder": _graph_record("label_encoder.onnx", "fp32", opset, label_spec,
                                       {"reference": "pytorch", "tolerance": {"rel_err_max": V.FP32_REL_TOL},
                                        **label_ver}),
    }

    # --- FP16
    if fp16:
        from .fp16 import convert_to_fp16, fp16_summary

        t = time.perf_counter()
        log("converting image_encoder to FP16")
        convert_to_fp16(d / "image_encoder.onnx", d / "image_encoder.fp16.onnx")
        seconds["fp16_convert"] = time.perf_counter() - t
        t = time.perf_counter()
        log("verifying image_encoder.fp16.onnx against the fp32 graph")
        sess16 = V.ort_session(d / "image_encoder.fp16.onnx")
        ver16 = {"reference": "image_encoder (fp32 ONNX)",
                 "tolerance": {"cosine_min": V.FP16_COSINE_MIN, "top5_agreement_min": V.FP16_TOP5_MIN}}
        bank = bank_arrays[DEFAULT_BANK]
        all16, all32 = [], []
        for kind, pixels in images.items():
            qf16 = sess16.run(None, {"pixels": pixels.numpy()})[0]
            m = V.compare(qf16, onnx_qf[kind], queries=True)
            agree = V.topk_agreement(V.scores(qf16, bank), V.scores(onnx_qf[kind], bank))
            V.check_fp16("image_encoder_fp16", kind, m, agree)
            m_torch = V.compare(qf16, torch_qf[kind], queries=True)
            ver16[kind] = {"query_features": {**m, "samples": len(pixels),
                                              f"top{V.TOPK}_agreement": agree, "bank": DEFAULT_BANK,
                                              "vs_pytorch": {k: m_torch[k] for k in ("max_abs_err", "cosine_min")}}}
            all16.append(qf16)
            all32.append(onnx_qf[kind])
        agree_all = V.topk_agreement(V.scores(np.concatenate(all16), bank), V.scores(np.concatenate(all32), bank))
        V.check_fp16("image_encoder_fp16", "all verification", {"finite": True, "cosine_min": 1.0}, agree_all)
        ver16[f"top{V.TOPK}_agreement"] = agree_all
        del sess16
        rec = _graph_record("image_encoder.fp16.onnx", "fp16", opset, image_spec, ver16)
        rec["source"] = "image_encoder"
        rec["fp16"] = fp16_summary(d / "image_encoder.fp16.onnx")
        graphs["image_encoder_fp16"] = rec
        seconds["verify_fp16"] = time.perf_counter() - t

    # --- INT8 (the CPU fast path): verified against the fp32 graph like the FP16 graph
    if int8:
        from .int8 import GRAPH_FILE, GRAPH_NAME, make_int8_graph

        t = time.perf_counter()
        log("quantizing image_encoder to INT8 and verifying it against the fp32 graph")
        ver8, summary8 = make_int8_graph(d, {kind: pixels.numpy() for kind, pixels in images.items()}, onnx_qf,
                                         bank_arrays[DEFAULT_BANK], DEFAULT_BANK)
        rec = _graph_record(GRAPH_FILE, "int8", opset, image_spec, ver8)
        rec["source"] = "image_encoder"
        rec["int8"] = summary8
        graphs[GRAPH_NAME] = rec
        seconds["int8"] = time.perf_counter() - t

    for rec in graphs.values():
        rec["sha256"] = sha256_file(d / rec["file"])
        rec["bytes"] = (d / rec["file"]).stat().st_size

    # --- TensorRT
    engines: list[dict] = []
    if tensorrt:
        from .tensorrt_build import build_engines

        t = time.perf_counter()
        targets = ["image_encoder_fp16" if fp16 else "image_encoder", "label_encoder"]
        log(f"building TensorRT engines for {', '.join(targets)}")
        engines = build_engines(d, {g: graphs[g] for g in targets}, max_batch=max_batch,
                                compute_capability=trt_sm, log=log)
        seconds["tensorrt"] = time.perf_counter() - t

    # --- manifest (last)
    prompts_sha = sha256_file(d / "prompts.txt")
    label_banks = {
        name: {"file": f"labels/{name}.npy", "names_file": f"labels/{name}.txt",
               "shape": list(bank_arrays[name].shape), "dtype": "float32", "count": len(names),
               "key": bank_key(graphs["label_encoder"]["sha256"], prompts_sha, names)}
        for name, names in banks.items()
    }
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            rel = p.relative_to(d).as_posix()
            files[rel] = file_record(d, rel)
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "model": {
            "backbone": backbone.spec, "config": cfg.to_dict(), "queries": Nq, "embed_dim": D,
            "layers": int(cfg.head.layers), "token_dim": int(backbone.token_dim),
            "seen": list(ckpt["seen"]), "unseen": list(ckpt["unseen"]),
        },
        "preprocess": {**pre.to_dict(), "mean": list(pre.mean), "std": list(pre.std),
                       **({"crop": "center"} if pre.resize_mode == "shortest" else {}),
                       "channels": "RGB", "layout": "NCHW", "value_range": [0.0, 1.0]},
        "tokenizer": tok_record,
        "prompts": {"file": "prompts.txt", "count": len(templates)},
        "scoring": {"mode": cfg.scoring, "k": int(cfg.scoring_k)},
        "graphs": graphs,
        "label_banks": label_banks,
        "default_bank": DEFAULT_BANK,
        "engines": engines,
        "files": files,
        "versions": _versions(tensorrt_module=engines[0]["trt_module"] if engines else None,
                              tensorrt_version=engines[0]["trt_version"] if engines else None),
        "export": {"opset": opset, "seed": seed, "trace_batch": TRACE_BATCH,
                   "calibration_images": image_names, "label_cache_used": label_cache is not None,
                   "seconds": {k: round(v, 3) for k, v in seconds.items()}},
    }
    _check_manifest(d, manifest)
    write_manifest(d, manifest)
    return ExportReport(path=d, manifest=manifest, seconds=seconds)


def _graph_record(file: str, precision: str, opset: int, spec, verification: dict) -> dict:
    return {"file": file, "precision": precision, "opset": opset, **spec.io_dict(), "verification": verification}


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


def _verify_tokenizer(tok_json: str, backbone, bank_texts: list[str], random_texts: list[str], T: int) -> dict:
    """tokenizer.json must give the backbone's ids on every prompt of every bank label (the runtime
    computes new labels with it) and on random strings."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(tok_json)
    except Exception as e:
        raise ExportError(f"the backbone's tokenizer.json does not load in `tokenizers`: {one_line(e)}") from e
    texts = list(dict.fromkeys(bank_texts + random_texts))
    mismatches = 0
    first = None
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
    kind = TOKENIZER_KINDS.get(data.get("model", {}).get("type"), "other")
    pad_id = (data.get("padding") or {}).get("pad_id", 0)
    return {"file": "tokenizer.json", "context_length": T, "kind": kind, "pad_id": pad_id,
            "verification": {"texts": len(texts), "mismatches": 0, "reference": "backbone.tokenize"}}


def _bank_through_onnx(tok_json: str, sess, templates: list[str], names: list[str]) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    out = []
    for n in names:
        ids = np.array([e.ids for e in tok.encode_batch([tpl.format(n) for tpl in templates])], dtype=np.int64)
        out.append(sess.run(None, {"token_ids": ids})[0].astype(np.float64).mean(axis=0))
    return np.stack(out).astype(np.float32)


def _check_manifest(d: Path, manifest: dict) -> None:
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
    for dist, key in (("open_clip_torch", "open_clip"), ("onnx", "onnx"), ("onnxscript", "onnxscript"),
                      ("onnxruntime", "onnxruntime"), ("onnxconverter-common", "onnxconverter_common"),
                      ("tokenizers", "tokenizers")):
        try:
            v[key] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if tensorrt_module:
        v[tensorrt_module] = tensorrt_version
    return v
