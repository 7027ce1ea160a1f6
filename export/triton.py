"""`qks-triton BUNDLE REPO`: a Triton Inference Server model repository from a bundle (no torch).

`--backend python` writes one Python-backend model that runs qks.runtime instead (see
qks.export.triton_python; its config.pbtxt comes from `python_config` here, with the others). The
default `--backend onnx` repository, for Triton's onnxruntime and tensorrt backends (NGC
containers), holds three models (NAME defaults to `qks`):

    REPO/
      qks-triton.json          what was written, from which bundle (Triton ignores files here)
      NAME_image/              pixels [B,3,H,W] -> query_features [B,Nq,D]
        config.pbtxt           platform onnxruntime_onnx (or tensorrt_plan), dynamic batching
        1/model.onnx           the bundle's image graph (+ its external data), or 1/model.plan
      NAME_scoring/            query_features [B,Nq,D] -> probabilities, logits [B,L]
        config.pbtxt           platform onnxruntime_onnx; probabilities carry label_filename
        labels.txt             the label names, one a line (Triton's classification extension)
        1/model.onnx           a small ONNX graph holding the label bank: MatMul, max (or top-k
                               sum) over the queries, Sigmoid -- what qks-infer computes
      NAME/                    platform ensemble: pixels -> probabilities (and logits)
        config.pbtxt
        1/                     (empty: Triton needs a version folder)

- Image model: `--image-model auto` takes a TensorRT plan from the bundle's `engines` when one was
  built by NVIDIA TensorRT for the GPU named by `--gpu-sm` (TensorRT for RTX plans do not load in
  Triton's tensorrt backend), else the fp32 ONNX graph for Triton's onnxruntime backend; `onnx`,
  `fp16`, `int8` and `plan` ask for one. A plan's `max_batch_size` is its optimisation profile's
  max batch (a profile whose min batch is not 1 is refused); otherwise `--max-batch` (default: the
  bundle's plan profile max if it has a plan, else 32). Tensor names, dtypes and dims are the
  graph's own (manifest or plan sidecar), with the batch dimension dropped (Triton adds it).
- Scoring model: the label bank is `--labels FILE` (encoded with the bundle's label encoder exactly
  as qks-infer does, cached), `--bank NAME`, or the bundle's default bank. Nq and D come from the
  image graph's recorded output shape (never the head config). The ensemble's outputs have dims
  [-1], so a new label list only rewrites NAME_scoring (`--labels-only`).
- Writes are whole or nothing: a new repository is built in a temporary folder beside REPO,
  validated, then renamed into place; `--labels-only` swaps only the scoring model's folder.
  An existing REPO is replaced only if it is a qks-triton repository holding nothing else.
- `validate_repository(repo)` (and `--check REPO`) parses every `config.pbtxt` with the
  `ModelConfig` protobuf that tritonclient ships (an unknown or misspelled field is an error),
  checks names, version folders, model files, label files, ONNX I/O against the config, and the
  ensemble's wiring the way Triton's ensemble validation does (names, data types, dims with -1
  wildcards, max batch sizes). Without tritonclient (`pip install 'qks[triton]'`) writing still
  works and says the validation was skipped.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from .errors import ExportError, one_line

MARKER = "qks-triton.json"
FORMAT = "qks-triton"
MARKER_VERSION = 1
IMAGE_MODELS = ("auto", "onnx", "fp16", "int8", "plan")
ONNX_GRAPHS = {"onnx": "image_encoder", "fp16": "image_encoder_fp16", "int8": "image_encoder_int8"}
DEFAULT_MAX_BATCH = 32
IMAGE_QUEUE_DELAY_US = 100  # wait at most 0.1 ms for more requests to batch with
ENSEMBLE_INPUT = "pixels"
PROBS, LOGITS = "probabilities", "logits"
LABELS_FILE = "labels.txt"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                 "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
                 "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
INSTALL_HINT = "pip install 'qks[triton]'"


class TritonError(ExportError):
    """A repository that cannot be written or checked; one line."""


def _log_default(msg: str) -> None:
    click.echo(f"qks-triton: {msg}", err=True)


# -- the image model ---------------------------------------------------------------------------------


@dataclass
class ImageModel:
    kind: str  # "onnx" | "plan"
    graph: str  # the manifest graph it is (or was built from)
    source: Path  # the file in the bundle
    sha256: str  # of that file
    precision: str
    inputs: list[dict]  # [{"name", "dtype", "shape" (batch first)}]
    outputs: list[dict]
    max_batch: int
    reason: str
    extra_files: list[str] = field(default_factory=list)  # ONNX external data, relative to the graph
    sm: str | None = None
    trt_version: str | None = None

    @property
    def platform(self) -> str:
        return "tensorrt_plan" if self.kind == "plan" else "onnxruntime_onnx"

    @property
    def filename(self) -> str:
        return "model.plan" if self.kind == "plan" else "model.onnx"


def _dims(shape: list, what: str) -> list[int]:
    """A recorded shape without its batch dimension, as Triton dims (-1 for a named/dynamic axis)."""
    if not isinstance(shape, list) or not shape:
        raise TritonError(f"{what}: no recorded shape")
    if isinstance(shape[0], int) and shape[0] > 0:
        raise TritonError(f"{what} has a fixed batch dimension {shape[0]}; Triton's batching needs a dynamic one "
                          "(re-export the bundle)")
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]


def _triton_dtype(dtype: str, what: str) -> str:
    if dtype not in TRITON_DTYPES:
        raise TritonError(f"{what}: data type {dtype!r} has no Triton equivalent")
    return TRITON_DTYPES[dtype]


def _external_data(path: Path) -> list[str]:
    """Files an ONNX graph keeps its tensors in (external data), relative to the graph's folder."""
    try:
        import onnx
    except ImportError:
        raise TritonError(f"reading {path.name} needs the onnx package: {INSTALL_HINT} (the serving environment "
                          "has no onnx: write the repository from the qks[triton] one)") from None

    from ..runtime.manifest import BundleError, check_relpath

    found = _external_locations(onnx.load(str(path), load_external_data=False))
    for loc in found:
        try:
            check_relpath(loc)
        except BundleError as e:
            raise TritonError(f"{path.name}: external data {e}") from None
    return found


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_tensors(g)


def _plans(bundle) -> list[dict]:
    return [e for e in bundle.engines if str(e.get("graph", "")).startswith("image_encoder")]


def _sidecar(bundle, rec: dict) -> dict:
    from ..engines.base import EngineError
    from ..engines.plan import read_sidecar

    try:
        side = read_sidecar(rec["path"], bundle.file(rec["sidecar"]) if rec.get("sidecar") else None)
    except EngineError as e:
        raise TritonError(str(e)) from None
    return {**rec, **side}


def _is_triton_trt(side: dict) -> bool:
    """Built by NVIDIA TensorRT (what Triton's tensorrt backend loads), not TensorRT for RTX."""
    return side.get("trt_flavor", "tensorrt") == "tensorrt" and side.get("trt_module", "tensorrt") == "tensorrt"


def _plan_model(bundle, side: dict, max_batch: int | None, why: str) -> ImageModel:
    from ..engines.plan import normalize_sm

    name = Path(side["file"]).name
    inputs, outputs = side.get("inputs") or [], side.get("outputs") or []
    try:
        lo, hi = _profile_batch(side)
    except (KeyError, TypeError, ValueError, IndexError):
        lo = hi = None
    if not inputs or not outputs or hi is None:
        raise TritonError(f"{name}: its sidecar does not record the plan's inputs, outputs and profile")
    if lo != 1:
        raise TritonError(f"{name}: its optimisation profile's min batch is {lo}; Triton needs min batch 1 "
                          "(rebuild with qks-export --tensorrt)")
    if max_batch is not None and max_batch > hi:
        raise TritonError(f"--max-batch {max_batch} is larger than the plan's profile max batch {hi}")
    return ImageModel("plan", side.get("graph", "image_encoder"), side["path"], bundle.sha256(side["file"]),
                      side.get("precision", "fp32"), inputs, outputs, max_batch or hi, why,
                      sm=normalize_sm(side["sm"]) if side.get("sm") else None, trt_version=side.get("trt_version"))


def _profile_batch(side: dict) -> tuple[int, int]:
    """(min, max) batch of a plan's optimisation profile: {input: {"min", "opt", "max"}} (or
    [min, opt, max] shapes)."""
    profile = side["profile"]
    if not isinstance(profile, dict) or not profile:
        raise ValueError("no profile")
    shapes = [(p["min"], p["max"]) if isinstance(p, dict) else (p[0], p[2]) for p in profile.values()]
    return max(int(lo[0]) for lo, _ in shapes), min(int(hi[0]) for _, hi in shapes)


def _recorded_max_batch(bundle) -> int | None:
    """The image plans' profile max batch (what qks-export --max-batch recorded), if any."""
    best = None
    for rec in _plans(bundle):
        try:
            side = _sidecar(bundle, rec)
            best = max(best or 0, _profile_batch(side)[1])
        except (TritonError, KeyError, TypeError, ValueError, IndexError):
            continue
    return best


def choose_image_model(bundle, image_model: str = "auto", max_batch: int | None = None,
                       gpu_sm: str | None = None) -> ImageModel:
    """Which of the bundle's image graphs/plans the repository serves, and why."""
    from ..engines.base import EngineError
    from ..engines.plan import normalize_sm

    if image_model not in IMAGE_MODELS:
        raise TritonError(f"unknown --image-model {image_model!r} (one of {', '.join(IMAGE_MODELS)})")
    if gpu_sm is not None:
        try:
            gpu_sm = normalize_sm(gpu_sm)
        except EngineError as e:
            raise TritonError(str(e)) from None
    if image_model in ("auto", "plan"):
        sides = [_sidecar(bundle, rec) for rec in _plans(bundle)]
        usable = [s for s in sides if _is_triton_trt(s)]
        fitting = [s for s in usable if gpu_sm is None or (s.get("sm") and normalize_sm(s["sm"]) == gpu_sm)]
        # fp16 plans first, as qks-infer does
        fitting.sort(key=lambda s: 0 if "fp16" in (s.get("precision", "") + s.get("graph", "")) else 1)
        if image_model == "plan":
            if not sides:
                raise TritonError("the bundle has no TensorRT plan for the image encoder (qks-export --tensorrt on "
                                  "the serving GPU)")
            if not usable:
                raise TritonError(f"the bundle's plans ({', '.join(Path(s['file']).name for s in sides)}) were built "
                                  "by TensorRT for RTX; Triton's tensorrt backend loads NVIDIA TensorRT plans only "
                                  "(rebuild with qks-export --tensorrt on the serving GPU, or use --image-model onnx)")
            if not fitting:
                have = ", ".join(f"sm_{normalize_sm(s['sm'])} ({s.get('gpu_name', '?')})" for s in usable if s.get("sm"))
                raise TritonError(f"the bundle has no plan for GPU sm_{gpu_sm}; its plans are for {have}: rebuild "
                                  "with qks-export --tensorrt on that GPU, or use --image-model onnx")
            sms = {normalize_sm(s["sm"]) for s in fitting if s.get("sm")}
            if gpu_sm is None and len(sms) > 1:
                raise TritonError(f"the bundle has plans for several GPUs (sm_{', sm_'.join(sorted(sms))}): "
                                  "pick the serving GPU with --gpu-sm")
            s = fitting[0]
            return _plan_model(bundle, s, max_batch, f"TensorRT plan {Path(s['file']).name} (TensorRT "
                               f"{s.get('trt_version')}, sm_{s.get('sm')}): requested")
        if gpu_sm is not None and fitting:
            s = fitting[0]
            return _plan_model(bundle, s, max_batch, f"TensorRT plan {Path(s['file']).name} built for sm_{gpu_sm} "
                               f"with TensorRT {s.get('trt_version')}")
        why = ("the bundle has no TensorRT plan" if not sides else
               "its TensorRT plans are TensorRT for RTX plans, which Triton does not load" if not usable else
               "no --gpu-sm names the serving GPU (plans are GPU-specific)" if gpu_sm is None else
               f"no plan was built for sm_{gpu_sm}")
        graph_name = "image_encoder" if "image_encoder" in bundle.graphs else "image_encoder_fp16"
        reason = f"ONNX for Triton's onnxruntime backend because {why}"
    else:
        graph_name = ONNX_GRAPHS[image_model]
        if graph_name not in bundle.graphs:
            flag = {"fp16": " (qks-export --fp16)", "int8": " (qks-export --int8)"}.get(image_model, "")
            raise TritonError(f"the bundle has no {image_model} image graph{flag}")
        reason = "requested"
    g = bundle.graph(graph_name)
    recorded = _recorded_max_batch(bundle)
    mb = max_batch or recorded or DEFAULT_MAX_BATCH
    return ImageModel("onnx", g.name, g.path, g.sha256, g.precision, list(g.inputs), list(g.outputs), mb,
                      reason, extra_files=_external_data(g.path))


# -- the scoring graph -------------------------------------------------------------------------------


def scoring_model(embeddings: np.ndarray, *, queries: int | None, in_dtype: str = "float32", mode: str = "max",
                  k: int = 1, opset: int = 18, input_name: str = "query_features"):
    """An ONNX model: query_features [B, Nq, D] -> probabilities, logits [B, L] (float32), computing
    exactly `qks.runtime.scoring`: logits = max over queries (or the sum of the top k) of the dot
    products with the bank's embeddings [L, D]; probabilities = sigmoid(logits). `queries` None
    means a dynamic Nq."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] < 1:
        raise TritonError(f"label bank must be [L, D] with L >= 1, is {list(emb.shape)}")
    n_labels, d = emb.shape
    if mode not in ("max", "topk"):
        raise TritonError(f"unknown scoring mode {mode!r} (max or topk)")
    onnx_in = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
    if in_dtype not in onnx_in:
        raise TritonError(f"query features of type {in_dtype} cannot be scored (float32, float16 or bfloat16)")
    opset = max(17, int(opset))
    nodes, inits = [], [numpy_helper.from_array(np.ascontiguousarray(emb.T), "label_embeddings_t")]  # [D, L]
    x = input_name
    if in_dtype != "float32":  # the runtime scores in float32 whatever the engine returns
        nodes.append(helper.make_node("Cast", [x], ["query_features_f32"], to=TensorProto.FLOAT))
        x = "query_features_f32"
    nodes.append(helper.make_node("MatMul", [x, "label_embeddings_t"], ["similarities"]))  # [B, Nq, L]
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "query_axis"))
    if mode == "max":
        if opset >= 18:
            nodes.append(helper.make_node("ReduceMax", ["similarities", "query_axis"], [LOGITS], keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceMax", ["similarities"], [LOGITS], axes=[1], keepdims=0))
    else:
        k = max(1, int(k))
        if queries is not None:
            inits.append(numpy_helper.from_array(np.array([min(k, queries)], dtype=np.int64), "top_k"))
        else:  # clamp k to Nq in the graph, as the runtime does
            inits.append(numpy_helper.from_array(np.array([k], dtype=np.int64), "k_requested"))
            nodes.append(helper.make_node("Shape", ["similarities"], ["num_queries"], start=1, end=2))
            nodes.append(helper.make_node("Min", ["k_requested", "num_queries"], ["top_k"]))
        nodes.append(helper.make_node("TopK", ["similarities", "top_k"], ["top_values", "top_indices"], axis=1,
                                      largest=1, sorted=1))
        nodes.append(helper.make_node("ReduceSum", ["top_values", "query_axis"], [LOGITS], keepdims=0))
    nodes.append(helper.make_node("Sigmoid", [LOGITS], [PROBS]))
    graph = helper.make_graph(
        nodes, "qks_scoring",
        [helper.make_tensor_value_info(input_name, onnx_in[in_dtype], ["batch", queries or "queries", d])],
        [helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, ["batch", n_labels]),
         helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", n_labels])],
        inits)
    ops = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=ops, producer_name="qks-triton",
                              doc_string=f"qks scoring: {mode}" + (f" k={k}" if mode == "topk" else "")
                              + f" over queries, {n_labels} labels x {d}")
    model.ir_version = helper.find_min_ir_version_for(ops)  # loads in older onnxruntime backends too
    onnx.checker.check_model(model, full_check=True)
    return model


def _save_onnx(model, path: Path) -> None:
    import onnx

    if model.ByteSize() > 1_900_000_000:  # protobuf's 2 GB limit: the bank goes to external data
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        path.write_bytes(model.SerializeToString())


# -- config.pbtxt --------------------------------------------------------------------------------------


class _Enum(str):
    """An enum value in protobuf text format (written unquoted)."""


def _scalar(v) -> str:
    if isinstance(v, _Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _pbtxt(obj: dict, indent: int = 0) -> str:
    pad = "  " * indent
    out = []
    for key, v in obj.items():
        if isinstance(v, dict):
            inner = _pbtxt(v, indent + 1)
            out.append(f"{pad}{key} {{\n{inner}{pad}}}\n" if inner else f"{pad}{key} {{ }}\n")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            items = [f"{pad}  {{\n{_pbtxt(x, indent + 2)}{pad}  }}" for x in v]
            out.append(f"{pad}{key} [\n" + ",\n".join(items) + f"\n{pad}]\n")
        elif isinstance(v, list):
            out.append(f"{pad}{key}: [ {', '.join(_scalar(x) for x in v)} ]\n")
        else:
            out.append(f"{pad}{key}: {_scalar(v)}\n")
    return "".join(out)


def _tensor(t: dict, what: str, dims: list[int] | None = None, **extra) -> dict:
    return {"name": t["name"], "data_type": _Enum(_triton_dtype(t["dtype"], what)),
            "dims": dims if dims is not None else _dims(t["shape"], what), **extra}


def image_config(name: str, image: ImageModel) -> dict:
    cfg = {"name": name, "platform": image.platform, "max_batch_size": image.max_batch,
           "input": [_tensor(t, f"image model input {t['name']!r}") for t in image.inputs],
           "output": [_tensor(t, f"image model output {t['name']!r}") for t in image.outputs],
           "dynamic_batching": {"max_queue_delay_microseconds": IMAGE_QUEUE_DELAY_US}}
    if image.kind == "plan":
        cfg["instance_group"] = [{"kind": _Enum("KIND_GPU"), "count": 1}]
    elif image.precision == "int8":  # the INT8 graph is the CPU fast path; its integer ops run on the CPU
        cfg["instance_group"] = [{"kind": _Enum("KIND_CPU"), "count": 1}]
    return cfg


def scoring_config(name: str, qf: dict, qf_dims: list[int], n_labels: int, max_batch: int) -> dict:
    return {"name": name, "platform": "onnxruntime_onnx", "max_batch_size": max_batch,
            "input": [_tensor(qf, "query features", qf_dims)],
            "output": [{"name": PROBS, "data_type": _Enum("TYPE_FP32"), "dims": [n_labels],
                        "label_filename": LABELS_FILE},
                       {"name": LOGITS, "data_type": _Enum("TYPE_FP32"), "dims": [n_labels]}],
            "dynamic_batching": {}}


def ensemble_config(name: str, image_name: str, scoring_name: str, image: ImageModel) -> dict:
    pix, qf = image.inputs[0], image.outputs[0]
    return {"name": name, "platform": "ensemble", "max_batch_size": image.max_batch,
            "input": [_tensor({**pix, "name": ENSEMBLE_INPUT}, "ensemble input")],
            # dims -1: the label count lives in the scoring model only, so new labels leave this as it is
            "output": [{"name": PROBS, "data_type": _Enum("TYPE_FP32"), "dims": [-1]},
                       {"name": LOGITS, "data_type": _Enum("TYPE_FP32"), "dims": [-1]}],
            "ensemble_scheduling": {"step": [
                {"model_name": image_name, "model_version": -1,
                 "input_map": [{"key": pix["name"], "value": ENSEMBLE_INPUT}],
                 "output_map": [{"key": qf["name"], "value": "query_features"}]},
                {"model_name": scoring_name, "model_version": -1,
                 "input_map": [{"key": "query_features", "value": "query_features"}],
                 "output_map": [{"key": PROBS, "value": PROBS}, {"key": LOGITS, "value": LOGITS}]},
            ]}}


def python_config(name: str, pixels: dict, n_labels: int, max_batch: int) -> dict:
    """The Python-backend model (`qks.runtime.triton_model`): pixels or encoded images in, one of the
    two per request; probabilities (with the label file) and logits out; dynamic batching on the CPU."""
    from ..runtime import triton_model as tm

    return {"name": name, "backend": "python", "max_batch_size": max_batch,
            "input": [_tensor({**pixels, "name": tm.PIXELS}, "image model input", optional=True),
                      {"name": tm.IMAGE, "data_type": _Enum("TYPE_STRING"), "dims": [1], "optional": True}],
            "output": [{"name": PROBS, "data_type": _Enum("TYPE_FP32"), "dims": [n_labels],
                        "label_filename": LABELS_FILE},
                       {"name": LOGITS, "data_type": _Enum("TYPE_FP32"), "dims": [n_labels]}],
            "dynamic_batching": {"max_queue_delay_microseconds": IMAGE_QUEUE_DELAY_US},
            "instance_group": [{"kind": _Enum("KIND_CPU"), "count": 1}],
            # ONNX Runtime's intra-op threads in the model; 0: its default (all cores)
            "parameters": {"key": "intra_op_threads", "value": {"string_value": "0"}}}


def _write_config(folder: Path, cfg: dict, comment: str) -> None:
    text = "".join(f"# {line}\n" for line in comment.splitlines()) + _pbtxt(cfg)
    (folder / "config.pbtxt").write_text(text, encoding="utf-8")


# -- writing -------------------------------------------------------------------------------------------


@dataclass
class TritonReport:
    path: Path
    name: str
    models: dict  # role -> model name
    image: ImageModel | None
    labels: int
    bank_source: str
    validated: bool  # False: tritonclient is not installed, the configs were not parsed
    problems: list[str] = field(default_factory=list)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _load_bundle(bundle_dir):
    from ..runtime.bundle import Bundle
    from ..runtime.manifest import BundleError

    try:
        return Bundle.load(bundle_dir)
    except BundleError as e:
        raise TritonError(str(e)) from None


def _load_bank(bundle, labels: str | Path | None, bank: str | None):
    from ..engines.base import EngineError
    from ..runtime.labels import LabelBank, LabelError, read_label_file
    from ..runtime.manifest import BundleError

    if labels is not None and bank is not None:
        raise TritonError("give --labels or --bank, not both")
    try:
        if labels is not None:
            return LabelBank.for_labels(bundle, read_label_file(labels))
        return LabelBank.from_bundle(bundle, bank)
    except (LabelError, BundleError, EngineError) as e:
        raise TritonError(str(e) or type(e).__name__) from None


def _names(name: str) -> dict:
    if not MODEL_NAME.fullmatch(name):
        raise TritonError(f"model name {name!r}: use letters, digits, '_' and '-' (at most 64, not '-' first)")
    return {"image": f"{name}_image", "scoring": f"{name}_scoring", "ensemble": name}


def _read_marker(repo: Path) -> dict | None:
    path = repo / MARKER
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TritonError(f"{path}: unreadable ({one_line(e)})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise TritonError(f"{path}: not a qks-triton record")
    if m.get("version") != MARKER_VERSION:
        raise TritonError(f"{path}: written by another qks-triton (record version {m.get('version')!r}); "
                          "regenerate the repository")
    return m


def check_target(repo: str | Path) -> dict | None:
    """REPO may be new, an empty folder, or a qks-triton repository holding nothing else (TritonError
    otherwise); returns its qks-triton.json record, if any."""
    repo = Path(repo)
    if not repo.exists():
        if repo.is_symlink():
            raise TritonError(f"{repo} is a broken symbolic link")
        return None
    if not repo.is_dir():
        raise TritonError(f"{repo} exists and is not a folder")
    entries = sorted(p.name for p in repo.iterdir())
    if not entries:
        return None
    marker = _read_marker(repo)
    if marker is None:
        raise TritonError(f"{repo} exists and is not a qks Triton repository (no {MARKER}); "
                          "choose a new folder or empty it")
    ours = {MARKER, *marker.get("models", {}).values()}
    other = [e for e in entries if e not in ours]
    if other:
        raise TritonError(f"{repo} also holds {', '.join(other[:5])}; qks-triton replaces only a repository it "
                          "wrote alone (give Triton a second --model-repository for other models)")
    return marker


def _tmp_beside(repo: Path, what: str) -> Path:
    parent = repo.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{repo.name}.{what}-", dir=parent))
    except OSError as e:
        raise TritonError(f"cannot write beside {repo}: {e.strerror or e}") from None


@contextlib.contextmanager
def _staging(repo: Path, what: str):
    """A temporary folder beside REPO for a whole-or-nothing write: an OSError becomes one TritonError
    line, and the folder is removed whatever happens."""
    tmp = _tmp_beside(repo, what)
    try:
        yield tmp
    except OSError as e:
        raise TritonError(f"cannot write {repo}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_marker(folder: Path, marker: dict) -> None:
    """FOLDER/qks-triton.json, replaced atomically."""
    part = folder / (MARKER + ".tmp")
    part.write_text(json.dumps(marker, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(part, folder / MARKER)


def copy_graph(source: Path, version_dir: Path, filename: str, extra_files: list[str]) -> None:
    """A graph file into a model's version folder as FILENAME, with its external data files beside it."""
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, version_dir / filename)
    for rel in extra_files:
        src = source.parent / rel
        if not src.is_file():
            raise TritonError(f"{source.name}: its external data file {rel} is missing")
        (version_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, version_dir / rel)


def _swap(new: Path, dest: Path, aside: Path) -> None:
    """Put `new` at `dest`, replacing what is there: renames on one file system, the old one moved to
    `aside` (outside the repository, where Triton does not look) and removed only after the new one
    is in place."""
    old = None
    if dest.exists():
        old = aside
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_scoring(folder: Path, model_name: str, bank, image_qf: dict, max_batch: int, mode: str, k: int,
                   opset: int, bundle_root: Path) -> dict:
    """NAME_scoring: config, labels.txt, 1/model.onnx. Returns its part of the marker."""
    qf_dims = _dims(image_qf["shape"], "image model output")
    if len(qf_dims) != 2:
        raise TritonError(f"image model output {image_qf['name']!r} is {image_qf['shape']}, expected [batch, Nq, D]")
    nq, d = qf_dims
    if d > 0 and bank.embeddings.shape[1] != d:
        raise TritonError(f"label bank has dimension {bank.embeddings.shape[1]}, the image model's query features "
                          f"have {d}")
    model = scoring_model(bank.embeddings, queries=nq if nq > 0 else None, in_dtype=image_qf["dtype"], mode=mode,
                          k=k, opset=opset, input_name="query_features")
    (folder / "1").mkdir(parents=True)
    _save_onnx(model, folder / "1" / "model.onnx")
    (folder / LABELS_FILE).write_text("".join(n + "\n" for n in bank.names), encoding="utf-8")
    cfg = scoring_config(model_name, {**image_qf, "name": "query_features"}, qf_dims, len(bank.names), max_batch)
    _write_config(folder, cfg, f"qks-triton {_now()}: {len(bank.names)} labels ({bank.source}), scoring {mode}"
                  + (f" k={k}" if mode == "topk" else "") + f" over the queries, then sigmoid\nbundle: {bundle_root}")
    return {"labels": len(bank.names), "bank": bank.source, "bank_key": bank.key, "dim": int(bank.embeddings.shape[1]),
            "mode": mode, "k": int(k), "opset": max(17, int(opset)), "written": _now()}


def tritonclient_missing() -> str | None:
    """Why tritonclient's model-config protobuf cannot be imported (None: it can). tritonclient
    installed without its gRPC part raises RuntimeError ("does not include grpc support")."""
    try:
        from tritonclient.grpc import model_config_pb2  # noqa: F401
    except ImportError:
        return f"tritonclient is not installed ({INSTALL_HINT})"
    except RuntimeError:
        return f"tritonclient is installed without its gRPC part ({INSTALL_HINT}, which adds tritonclient[grpc])"
    return None


def _tritonclient_available() -> bool:
    return tritonclient_missing() is None


def _validate_or_raise(repo: Path, models: list[str] | None = None) -> bool:
    if not _tritonclient_available():
        return False
    problems = validate_repository(repo, models=models)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TritonError(f"the generated repository does not validate: {problems[0]}{more}")
    return True


def write_repository(bundle_dir: str | Path, repo: str | Path, *, labels: str | Path | None = None,
                     bank: str | None = None, name: str = "qks", image_model: str = "auto",
                     max_batch: int | None = None, gpu_sm: str | None = None, log=None) -> TritonReport:
    """Write the whole Triton repository for a bundle (see the module docstring)."""
    log = log or (lambda msg: None)
    repo = Path(repo)
    names = _names(name)
    if max_batch is not None and max_batch < 1:
        raise TritonError(f"--max-batch must be >= 1 (got {max_batch})")
    check_target(repo)
    bundle = _load_bundle(bundle_dir)
    image = choose_image_model(bundle, image_model, max_batch, gpu_sm)
    if len(image.inputs) != 1 or len(image.outputs) != 1:
        raise TritonError(f"the image model has {len(image.inputs)} inputs and {len(image.outputs)} outputs; "
                          "expected pixels -> query_features")
    lbank = _load_bank(bundle, labels, bank)
    log(f"image model: {image.source.name} as {image.platform}, max_batch_size {image.max_batch} ({image.reason})")
    mode, k = bundle.scoring
    opset = _opset(bundle, image.graph)
    with _staging(repo, "qks-triton") as tmp:
        # the image model
        img_dir = tmp / names["image"]
        copy_graph(image.source, img_dir / "1", image.filename, image.extra_files)
        note = (f"\nserve with a Triton release built on TensorRT {image.trt_version}, on sm_{image.sm} GPUs"
                if image.kind == "plan" else "")
        _write_config(img_dir, image_config(names["image"], image),
                      f"qks-triton {_now()}: {image.source.name} ({image.precision}) from bundle {bundle.root}{note}")
        # the scoring model
        scoring = _write_scoring(tmp / names["scoring"], names["scoring"], lbank, image.outputs[0], image.max_batch,
                                 mode, k, opset, bundle.root)
        # the ensemble
        ens_dir = tmp / names["ensemble"]
        (ens_dir / "1").mkdir(parents=True)
        _write_config(ens_dir, ensemble_config(names["ensemble"], names["image"], names["scoring"], image),
                      f"qks-triton {_now()}: pixels (preprocessed as qks.runtime does) -> probabilities\n"
                      f"output dims -1: the label count is the scoring model's ({names['scoring']}/{LABELS_FILE})")
        marker = {
            "format": FORMAT, "version": MARKER_VERSION, "backend": "onnx", "name": name, "models": names,
            "written": _now(),
            "bundle": str(bundle.root),
            "image_model": {"kind": image.kind, "graph": image.graph, "file": image.source.name,
                            "sha256": image.sha256, "precision": image.precision, "platform": image.platform,
                            "max_batch_size": image.max_batch, "inputs": image.inputs, "outputs": image.outputs,
                            "sm": image.sm, "trt_version": image.trt_version, "reason": image.reason},
            "label_encoder_sha256": bundle.graphs["label_encoder"].sha256 if "label_encoder" in bundle.graphs else None,
            "scoring": scoring,
        }
        write_marker(tmp, marker)
        validated = _validate_or_raise(tmp)
        _swap(tmp, repo, repo.absolute().parent / f".{repo.name}.old-{os.getpid()}")
    return TritonReport(repo, name, names, image, len(lbank.names), lbank.source, validated)


def _opset(bundle, graph: str) -> int:
    rec = bundle.manifest["graphs"].get(graph) or bundle.manifest["graphs"].get("image_encoder") or {}
    try:
        return max(17, int(rec.get("opset", 17)))
    except (TypeError, ValueError):
        return 17


def write_labels_only(bundle_dir: str | Path, repo: str | Path, *, labels: str | Path | None = None,
                      bank: str | None = None, name: str | None = None, log=None) -> TritonReport:
    """Rewrite only REPO/NAME_scoring for another label list; the image model and ensemble stay."""
    log = log or (lambda msg: None)
    repo = Path(repo)
    if not repo.is_dir():
        raise TritonError(f"Triton repository not found: {repo} (write it first without --labels-only)")
    marker = _read_marker(repo)
    if marker is None:
        raise TritonError(f"{repo} is not a qks Triton repository (no {MARKER}); write it without --labels-only")
    if name is not None and name != marker.get("name"):
        raise TritonError(f"{repo} holds the models named {marker.get('name')!r}, not {name!r}")
    if marker.get("backend") == "python":
        from .triton_python import write_python_labels_only

        return write_python_labels_only(bundle_dir, repo, marker, labels=labels, bank=bank, log=log)
    names = marker.get("models") or {}
    img = marker.get("image_model") or {}
    if set(names) != {"image", "scoring", "ensemble"} or not img.get("outputs"):
        raise TritonError(f"{repo / MARKER}: incomplete record; regenerate the repository")
    for role in ("image", "ensemble"):
        if not (repo / names[role] / "config.pbtxt").is_file():
            raise TritonError(f"{repo}: {names[role]}/config.pbtxt is missing; regenerate the repository")
    bundle = _load_bundle(bundle_dir)
    # the bank must come from the bundle the image model came from
    shas = {g.sha256 for g in bundle.graphs.values()} | {bundle.sha256(e["file"]) for e in bundle.engines}
    if img.get("sha256") not in shas:
        raise TritonError(f"{repo}'s image model ({img.get('file')}) is not from this bundle; labels for it must be "
                          "encoded with its own bundle (or regenerate the whole repository)")
    lbank = _load_bank(bundle, labels, bank)
    mode, k = bundle.scoring
    qf = img["outputs"][0]
    with _staging(repo, "qks-triton-scoring") as tmp:
        scoring = _write_scoring(tmp / names["scoring"], names["scoring"], lbank, qf, int(img["max_batch_size"]),
                                 mode, k, _opset(bundle, img.get("graph", "image_encoder")), bundle.root)
        validated = _scoring_fits(tmp, repo, names)
        _swap(tmp / names["scoring"], repo / names["scoring"], tmp / "old")
        write_marker(repo, {**marker, "scoring": scoring, "written": scoring["written"]})
    log(f"scoring model: {len(lbank.names)} labels ({lbank.source}) -> {repo / names['scoring']}")
    return TritonReport(repo, marker["name"], names, None, len(lbank.names), lbank.source, validated)


def _scoring_fits(tmp: Path, repo: Path, names: dict) -> bool:
    """The new scoring model in TMP against the repository's other models' configs (False: tritonclient
    is not there to check with); TritonError if it does not fit."""
    if not _tritonclient_available():
        return False
    check = tmp / "check"
    check.mkdir()
    for role in ("image", "ensemble"):
        (check / names[role] / "1").mkdir(parents=True)
        shutil.copyfile(repo / names[role] / "config.pbtxt", check / names[role] / "config.pbtxt")
    os.replace(tmp / names["scoring"], check / names["scoring"])
    problems = validate_repository(check, models=[names["scoring"]])  # + the ensemble's wiring
    if problems:
        raise TritonError(f"the new scoring model does not fit the repository: {problems[0]}")
    os.replace(check / names["scoring"], tmp / names["scoring"])
    return True


# -- validation ----------------------------------------------------------------------------------------


def _parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(encoding="utf-8"), cfg)
    return cfg


def _wild_eq(a, b) -> bool:
    """Triton's CompareDimsWithWildcard: same rank, each dim equal or -1 on either side."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


def _onnx_io_problems(rel: str, cfg, model_file: Path) -> list[str]:
    """The config's inputs/outputs against the ONNX graph's: names, element types, dims."""
    try:
        import onnx
        from onnx import TensorProto
    except ImportError:
        return []
    from tritonclient.grpc import model_config_pb2 as pb

    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception as e:
        return [f"{rel}: {model_file.name} is not a readable ONNX model ({one_line(e)})"]
    onnx_types = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.BFLOAT16: "TYPE_BF16",
                  TensorProto.DOUBLE: "TYPE_FP64", TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32",
                  TensorProto.INT16: "TYPE_INT16", TensorProto.INT8: "TYPE_INT8", TensorProto.UINT8: "TYPE_UINT8",
                  TensorProto.BOOL: "TYPE_BOOL"}
    inits = {t.name for t in model.graph.initializer}
    problems = []
    batching = cfg.max_batch_size > 0
    for kind, tensors, graph_values in (("input", cfg.input, [v for v in model.graph.input if v.name not in inits]),
                                        ("output", cfg.output, list(model.graph.output))):
        by_name = {v.name: v for v in graph_values}
        for t in tensors:
            v = by_name.get(t.name)
            if v is None:
                problems.append(f"{rel}: {kind} {t.name!r} is not in {model_file.name} "
                                f"(it has {', '.join(sorted(by_name)) or 'none'})")
                continue
            tt = v.type.tensor_type
            want = pb.DataType.Name(t.data_type)
            if onnx_types.get(tt.elem_type) != want:
                problems.append(f"{rel}: {kind} {t.name!r} is {want} in the config, "
                                f"{TensorProto.DataType.Name(tt.elem_type)} in {model_file.name}")
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            if batching:
                if not shape or shape[0] != -1:
                    problems.append(f"{rel}: {kind} {t.name!r} has no dynamic batch dimension in {model_file.name} "
                                    f"but max_batch_size is {cfg.max_batch_size}")
                    continue
                shape = shape[1:]
            if not _wild_eq(shape, t.dims):
                problems.append(f"{rel}: {kind} {t.name!r} has dims {list(t.dims)} in the config, "
                                f"{shape} in {model_file.name}")
        if kind == "input":
            missing = sorted(set(by_name) - {t.name for t in tensors})
            if missing:
                problems.append(f"{rel}: {model_file.name} input(s) {', '.join(missing)} are not in the config")
    for loc in _external_locations(model):
        if not (model_file.parent / loc).is_file():
            problems.append(f"{rel}: {model_file.name}'s external data file {loc} is missing")
    return problems


def _external_locations(model) -> list[str]:
    import onnx

    locs = []
    for t in _all_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in locs:
                locs.append(loc)
    return locs


DEFAULT_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan", "python": "model.py"}


def _model_problems(repo: Path, folder: str, cfg, check_files: bool) -> list[str]:
    rel = f"{folder}/config.pbtxt"
    problems = []
    if cfg.name and cfg.name != folder:
        problems.append(f"{rel}: name {cfg.name!r} is not the folder's name {folder!r}")
    if not cfg.platform and not cfg.backend:
        problems.append(f"{rel}: neither platform nor backend is set")
    if cfg.max_batch_size < 0:
        problems.append(f"{rel}: max_batch_size {cfg.max_batch_size} is negative")
    if cfg.HasField("dynamic_batching") and cfg.max_batch_size == 0:
        problems.append(f"{rel}: dynamic_batching needs max_batch_size > 0")
    if not cfg.input or not cfg.output:
        problems.append(f"{rel}: a model needs at least one input and one output")
    from tritonclient.grpc import model_config_pb2 as pb

    for kind, tensors in (("input", cfg.input), ("output", cfg.output)):
        seen = set()
        for t in tensors:
            if not t.name:
                problems.append(f"{rel}: an {kind} has no name")
            if t.name in seen:
                problems.append(f"{rel}: {kind} {t.name!r} appears twice")
            seen.add(t.name)
            if t.data_type == pb.TYPE_INVALID:
                problems.append(f"{rel}: {kind} {t.name!r} has no data_type")
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                problems.append(f"{rel}: {kind} {t.name!r} has invalid dims {list(t.dims)}")
            if kind == "output" and t.label_filename:
                lf = repo / folder / t.label_filename
                if not lf.is_file():
                    problems.append(f"{rel}: output {t.name!r} names label file {t.label_filename}, which is missing")
                elif len(t.dims) == 1 and t.dims[0] > 0:
                    n = len(lf.read_text(encoding="utf-8").splitlines())
                    if n != t.dims[0]:
                        problems.append(f"{folder}/{t.label_filename} has {n} labels, output {t.name!r} has "
                                        f"{t.dims[0]}")
    versions = sorted(p.name for p in (repo / folder).iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        problems.append(f"{folder}: no version folder (1/)")
    if check_files and cfg.platform != "ensemble":
        filename = cfg.default_model_filename or DEFAULT_FILES.get(cfg.platform or cfg.backend)
        for v in versions:
            f = repo / folder / v / filename if filename else None
            if f is None or not f.is_file():
                problems.append(f"{folder}/{v}: model file {filename or '?'} is missing")
            elif cfg.platform == "onnxruntime_onnx":
                problems.extend(_onnx_io_problems(rel, cfg, f))
        if cfg.backend == "python":
            from .triton_python import model_problems

            problems.extend(model_problems(repo / folder, cfg, versions))
    return problems


def _ensemble_problems(folder: str, cfg, configs: dict, unreadable: set[str] = frozenset()) -> list[str]:
    """Triton's ValidateEnsembleConfig, in Python: every step's model exists, batch sizes fit, every
    model input is mapped exactly once, every mapped output exists, and each ensemble tensor has one
    data type and consistent dims wherever it appears; the ensemble's outputs are produced."""
    rel = f"{folder}/config.pbtxt"
    problems = []
    steps = cfg.ensemble_scheduling.step
    if not steps:
        return [f"{rel}: an ensemble needs ensemble_scheduling steps"]
    batching = cfg.max_batch_size > 0
    tensors: dict[str, tuple[str, int, list, list]] = {}  # name -> (from, dtype, dims, full dims)

    def node(model, batch, dtype, dims):
        return (model, dtype, list(dims), ([-1] if batch else []) + list(dims))

    def consistent(tname, a, b):
        from tritonclient.grpc import model_config_pb2 as pb

        if a[1] != b[1]:
            problems.append(f"{rel}: ensemble tensor {tname!r} is {pb.DataType.Name(a[1])} from {a[0]} but "
                            f"{pb.DataType.Name(b[1])} from {b[0]}")
        elif not _wild_eq(a[2], b[2]) and not _wild_eq(a[3], b[3]):
            problems.append(f"{rel}: ensemble tensor {tname!r} has shape {a[3]} from {a[0]} but {b[3]} from {b[0]}")

    for t in cfg.input:
        tensors[t.name] = node(folder, batching, t.data_type, t.dims)
    outputs = {t.name: node(folder, batching, t.data_type, t.dims) for t in cfg.output}
    tensors.update(outputs)
    available = {t.name for t in cfg.input}
    produced = set()
    for i, step in enumerate(steps, 1):
        sub = configs.get(step.model_name)
        if step.model_name in unreadable:  # its config's own problem is reported; do not cascade
            return problems
        if sub is None:
            problems.append(f"{rel}: step {i} uses model {step.model_name!r}, which is not in the repository")
            continue
        if sub.max_batch_size != 0 and sub.max_batch_size < cfg.max_batch_size:
            problems.append(f"{rel}: max_batch_size {cfg.max_batch_size} is larger than {step.model_name}'s "
                            f"{sub.max_batch_size}")
        sub_batch = sub.max_batch_size > 0
        sub_in = {t.name: t for t in sub.input}
        sub_out = {t.name: t for t in sub.output}
        for key, value in step.input_map.items():
            if key not in sub_in:
                problems.append(f"{rel}: step {i} maps ensemble tensor {value!r} to {key!r}, which is not an input "
                                f"of {step.model_name} (it has {', '.join(sorted(sub_in))})")
            elif value not in available:
                problems.append(f"{rel}: step {i} reads {value!r}, which is neither an ensemble input nor an output "
                                "of an earlier step")
        for name, t in sub_in.items():
            mapped = [v for k, v in step.input_map.items() if k == name]
            if not mapped:
                problems.append(f"{rel}: input {name!r} of {step.model_name} is not mapped to any ensemble tensor")
                continue
            here = node(step.model_name, sub_batch, t.data_type, t.dims)
            if mapped[0] in tensors:
                consistent(mapped[0], tensors[mapped[0]], here)
            else:
                tensors[mapped[0]] = here
        targets = list(step.output_map.values())
        for key, value in step.output_map.items():
            if key not in sub_out:
                problems.append(f"{rel}: step {i} maps {key!r}, which is not an output of {step.model_name} "
                                f"(it has {', '.join(sorted(sub_out))})")
                continue
            if targets.count(value) > 1:
                problems.append(f"{rel}: several outputs of {step.model_name} map to ensemble tensor {value!r}")
            here = node(step.model_name, sub_batch, sub_out[key].data_type, sub_out[key].dims)
            if value in tensors:
                consistent(value, tensors[value], here)
            else:
                tensors[value] = here
            available.add(value)
            produced.add(value)
    for name in outputs:
        if name not in produced:
            problems.append(f"{rel}: ensemble output {name!r} is not produced by any step")
    return problems


def validate_repository(repo: str | Path, *, models: list[str] | None = None, check_files: bool = True) -> list[str]:
    """Problems found in a Triton model repository (empty: it validates). Every model folder's
    config.pbtxt is parsed with tritonclient's ModelConfig protobuf; see the module docstring for
    the rest. `models` limits the per-model checks to those folders (ensembles are always checked
    against everything present). TritonError if tritonclient is missing or REPO is not a folder."""
    repo = Path(repo)
    missing = tritonclient_missing()
    if missing:
        raise TritonError(f"validating a Triton repository needs tritonclient's model-config protobuf: {missing}")
    from google.protobuf import text_format

    if not repo.is_dir():
        raise TritonError(f"Triton repository not found: {repo}")
    folders = sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        return [f"{repo}: no model folders"]
    problems, configs, unreadable = [], {}, set()
    for folder in folders:
        path = repo / folder / "config.pbtxt"
        if not path.is_file():
            problems.append(f"{folder}: no config.pbtxt")
            continue
        try:
            configs[folder] = _parse_config(path)
        except text_format.ParseError as e:
            problems.append(f"{folder}/config.pbtxt: {one_line(e)}")
            unreadable.add(folder)
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{folder}/config.pbtxt: unreadable ({one_line(e)})")
            unreadable.add(folder)
    for folder, cfg in configs.items():
        if models is None or folder in models:
            problems.extend(_model_problems(repo, folder, cfg, check_files))
        if cfg.platform == "ensemble" or cfg.HasField("ensemble_scheduling"):
            problems.extend(_ensemble_problems(folder, cfg, configs, unreadable))
    return problems


# -- command line --------------------------------------------------------------------------------------


def _fail(msg: str, code: int = 1):
    click.echo(f"qks-triton: error: {msg}", err=True)
    sys.exit(code)


BACKENDS = ("onnx", "python")


def _check_only(check_repo: Path) -> None:
    problems = validate_repository(check_repo)
    if len(problems) == 1:
        _fail(f"{check_repo} does not validate: {problems[0]}")
    for p in problems:
        click.echo(f"qks-triton: {p}", err=True)
    if problems:
        _fail(f"{check_repo} does not validate: {len(problems)} problems (above)")
    n = len(_model_folders(check_repo))
    click.echo(f"{check_repo}: valid Triton repository ({n} model{'s' if n != 1 else ''}; configs parsed with "
               "tritonclient's ModelConfig)")


def _write_labels_only_cli(bundle_dir, repo, labels_file, bank, name, backend, image_model, max_batch, gpu_sm, log):
    if image_model != "auto" or max_batch is not None or gpu_sm is not None:
        _fail("--labels-only rewrites the scoring model only: --image-model, --max-batch and --gpu-sm do not apply", 2)
    if backend is not None and repo.is_dir():
        marker = _read_marker(repo) or {}
        if marker and marker.get("backend", "onnx") != backend:
            _fail(f"{repo} is a --backend {marker.get('backend', 'onnx')} repository, not --backend {backend}", 2)
    report = write_labels_only(bundle_dir, repo, labels=labels_file, bank=bank, name=name, log=log)
    return report, report.models.get("scoring") or report.models["model"]


def _write_cli(bundle_dir, repo, labels_file, bank, name, backend, image_model, max_batch, gpu_sm, log):
    if backend == "python":
        if gpu_sm is not None:
            _fail("--gpu-sm picks a TensorRT plan; --backend python runs ONNX graphs on the CPU", 2)
        from .triton_python import write_python_repository

        report = write_python_repository(bundle_dir, repo, labels=labels_file, bank=bank, name=name or "qks",
                                         image_model=image_model, max_batch=max_batch, log=log)
    else:
        report = write_repository(bundle_dir, repo, labels=labels_file, bank=bank, name=name or "qks",
                                  image_model=image_model, max_batch=max_batch, gpu_sm=gpu_sm, log=log)
    log(f"label bank: {report.labels} labels ({report.bank_source})")
    return report, ", ".join(report.models.values())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle_dir", metavar="BUNDLE", required=False, type=click.Path(path_type=Path))
@click.argument("repo", metavar="REPO", required=False, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="onnx: image model (ONNX or TensorRT plan) + scoring model + ensemble, for Triton's onnxruntime "
                   "and tensorrt backends (NGC containers); python: one model running qks.runtime in Triton's "
                   "python backend, pixels or encoded images in (the CPU server from make serve-venv) "
                   "[default: onnx; with --labels-only: the repository's]")
@click.option("--labels", "labels_file", type=click.Path(path_type=Path),
              help="label file (UTF-8, one label a line) for the scoring model; encoded with the bundle's label "
                   "encoder (cached). Default: the bundle's default bank")
@click.option("--bank", help="a label bank stored in the bundle (qks-labels --name)")
@click.option("--name", default=None, help="model name: writes NAME_image, NAME_scoring and the ensemble NAME "
              "(--backend python: the model NAME) [default: qks]")
@click.option("--image-model", type=click.Choice(IMAGE_MODELS), default="auto", show_default=True,
              help="auto: a TensorRT plan built for --gpu-sm if the bundle has one, else the fp32 ONNX graph "
                   "(--backend python: the graph qks-infer runs on the CPU, INT8 if the bundle has it); "
                   "onnx | fp16 | int8: that ONNX graph; plan: the bundle's TensorRT plan")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="max_batch_size [default: the plan's profile max; without a plan the bundle's recorded max "
                   f"batch, else {DEFAULT_MAX_BATCH}]")
@click.option("--gpu-sm", default=None, help="compute capability of the GPU Triton runs on (e.g. 90): picks the "
              "plan built for it")
@click.option("--labels-only", is_flag=True, help="rewrite only the model that holds the labels in an existing "
              "repository (new labels)")
@click.option("--check", "check_repo", metavar="REPO", type=click.Path(path_type=Path), default=None,
              help="only validate the Triton repository REPO (give no BUNDLE then)")
@click.option("--quiet", "-q", is_flag=True, help="print only the result line")
def _cli(bundle_dir, repo, backend, labels_file, bank, name, image_model, max_batch, gpu_sm, labels_only, check_repo,
         quiet):
    """Write a Triton Inference Server model repository REPO from a qks BUNDLE: an image model
    (ONNX or TensorRT plan, dynamic batching), a scoring model holding the label bank (a small ONNX
    graph: max over queries, sigmoid), and an ensemble from pixels to probabilities; or, with
    --backend python, one model that runs the qks runtime (pixels or encoded images in)."""
    log = (lambda msg: None) if quiet else _log_default
    if check_repo is not None:
        if bundle_dir is not None or repo is not None:
            _fail("--check REPO takes no other arguments", 2)
        return _check_only(check_repo)
    if bundle_dir is None or repo is None:
        _fail("give BUNDLE and REPO (or --check REPO); see qks-triton --help", 2)
    write = _write_labels_only_cli if labels_only else _write_cli
    report, what = write(bundle_dir, repo, labels_file, bank, name, backend, image_model, max_batch, gpu_sm, log)
    if report.validated:
        log("validated: every config.pbtxt parses with tritonclient's ModelConfig"
            + ("" if "model" in report.models else " and the ensemble connects"))
    else:
        log(f"validation skipped: {tritonclient_missing() or 'tritonclient is not available'}")
    click.echo(f"wrote {report.path} ({what})")


def _model_folders(repo: Path) -> list[str]:
    return [p.name for p in Path(repo).iterdir() if p.is_dir() and not p.name.startswith(".")]


def main(argv: list[str] | None = None) -> None:
    """`qks-triton`: every error one line on stderr, exit 1 (2 for usage), never a traceback."""

    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"qks-triton: warning: {message}", err=True)

    previous, warnings.showwarning = warnings.showwarning, show
    try:
        _cli.main(args=argv, prog_name="qks-triton", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("interrupted; nothing was changed", 130)
    except click.ClickException as e:
        _fail(f"{e.format_message()} (see qks-triton --help)", 2)
    except ExportError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was changed", 130)
    except Exception as e:  # an unexpected failure still gets one line and a non-zero exit
        _fail(f"unexpected {type(e).__name__}: {one_line(e)}")
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":  # pragma: no cover
    main()
