"""INT8 image graphs for the CPU: float32 in and out, INT8 matrix multiplies inside.

`quantize_image_encoder` rewrites the fp32 image graph with ONNX Runtime's quantizer:

- dynamic (default): every MatMul with a weight initializer becomes `DynamicQuantizeLinear` (uint8
  activations, scale per tensor computed at run time) + `MatMulInteger` (int8 weights, one scale
  per output channel) + a float rescale. ONNX Runtime's MLAS runs these U8S8 products on AVX-512
  VNNI / AMX-INT8 kernels. `Gemm` nodes (open_clip's attention out-projection exports as Gemm) are
  first rewritten as MatMul + Add so they are quantized too. Attention's own products (Q.K^T and
  attention.V: both operands are activations) stay in fp32 unless `quantize_attention=True`, as do
  the patch-embedding Conv, LayerNorm, Softmax and GELU. No calibration data is needed.
- static (`method="static"`, needs `calibration` pixels): QDQ format, activation ranges from the
  calibration images (MinMax, or Percentile); slower to make, not faster on ONNX Runtime CPU here
  (see benchmarks/RESULTS.md), kept for TensorRT-style consumers.

`verify_int8` is the parity gate, the FP16 graph's measures from `qks.export.verify` against the
fp32 ONNX graph: query-feature cosine per image and top-5 label agreement (max-over-queries
scoring against a label bank), on every input set given (random pixels, real images).

`add_int8_graph(bundle)` adds `image_encoder.int8.onnx` (graph "image_encoder_int8", precision
"int8", its verification in the manifest) to an existing bundle without re-exporting it:

    python -m qks.export.int8 BUNDLE [--calibration-images DIR]
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from . import verify as V
from .errors import ExportError, one_line

GRAPH_NAME = "image_encoder_int8"
GRAPH_FILE = "image_encoder.int8.onnx"
SOURCE_GRAPH = "image_encoder"
INT8_COSINE_MIN = 0.99  # query-feature cosine vs the fp32 graph, every image
INT8_TOP5_MIN = 0.99  # top-5 label agreement with the fp32 graph, over all verification images
SCOPES = ("tokens", "trunk", "all")
INTEGER_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "QAttention", "QLinearMatMul", "QuantizeLinear",
               "DequantizeLinear", "ConvInteger", "QLinearConv", "QGemm")
FUSED_OPS = ("Attention", "QAttention", "MultiHeadAttention", "SkipLayerNormalization", "Gelu", "BiasGelu", "FastGelu")


def _gemm_to_matmul(model) -> int:
    """Rewrite Gemm(A, B[, C]) with alpha = beta = 1, transA = 0 and B an initializer as
    MatMul(A, B or B^T) [+ Add(C)], in place; returns how many were rewritten."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    new_nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        wname = node.input[1] + "__matmul"
        model.graph.initializer.append(numpy_helper.from_array(w, wname))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "__mm" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=node.name + "_matmul"))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        count += 1
    if count:
        used = {i for n in new_nodes for i in n.input}
        keep = [t for t in model.graph.initializer if t.name in used or t.name in {i.name for i in model.graph.input}]
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return count


QUANTIZABLE = ("MatMul", "Attention")  # Attention: the fused graph's packed QKV product (QAttention)


def _query_seeds(model) -> set[str]:
    """The learnable queries' initializer: `head.queries` by name, or (the dynamo exporter folds
    `queries.unsqueeze(0)` into a constant named like `unsqueeze_2`) a [1, Nq, C] / [Nq, C]
    initializer, Nq > 1, that an Expand broadcasts over the batch (a class token is [1, 1, C])."""
    seeds = {t.name for t in model.graph.initializer if t.name == "head.queries" or t.name.endswith(".queries")}
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        d = dims.get(n.input[0]) if n.op_type == "Expand" and n.input else None
        if d and (len(d) == 2 or (len(d) == 3 and d[0] == 1)) and d[-2] > 1:
            seeds.add(n.input[0])
    return seeds


def _query_path_matmuls(model) -> list[str]:
    """Products on the QKS head's query path: those whose first operand depends on the learnable
    queries. The head's key/value projections of the image tokens, and the whole backbone, are
    not on it."""
    tainted = _query_seeds(model)
    out = []
    for n in model.graph.node:  # topological order
        if n.op_type in QUANTIZABLE and n.input and n.input[0] in tainted:
            out.append(n.name)
        if tainted & set(n.input):
            tainted.update(n.output)
    return out


def _is_head_weight(name: str) -> bool:
    return name.startswith("head.") or ".head." in name


def _head_matmuls(model) -> list[str]:
    """Every product of the head: those reading a tensor computed from a head initializer or the
    queries, and the head's projections of the image tokens (a MatMul whose bias Add is a head
    initializer: its own weight is an unnamed transposed copy in dynamo graphs)."""
    tainted = {t.name for t in model.graph.initializer if _is_head_weight(t.name)} | _query_seeds(model)
    bias_adds = {o for n in model.graph.node if n.op_type == "Add" and any(_is_head_weight(i) for i in n.input)
                 for o in n.input}
    out = []
    for n in model.graph.node:  # topological order
        if n.op_type in QUANTIZABLE and (tainted & set(n.input) or set(n.output) & bias_adds):
            out.append(n.name)
        if tainted & set(n.input):
            tainted.update(n.output)
    return out


def _fuse_gelu(model):
    """GELU written out as Erf/Mul/Div/Add (how the exporter writes it) -> ONNX Runtime's fused
    `Gelu`/`BiasGelu` contrib ops (the same exact-erf GELU; about 10 % of the INT8 graph's time on
    the CPU). Only the GELU fusions of `onnxruntime.transformers` are enabled. Returns (model,
    fused count); the model unchanged (count 0) when that optimizer is not available."""
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.onnx_model import OnnxModel
        from onnxruntime.transformers.optimizer import optimize_by_fusion
    except ImportError:
        return model, 0
    options = FusionOptions("vit")
    for name in list(vars(options)):
        if name.startswith("enable_"):
            setattr(options, name, False)
    options.enable_gelu = options.enable_bias_gelu = True
    fused = optimize_by_fusion(model, model_type="vit", num_heads=0, hidden_size=0, optimization_options=options)
    stats = fused.get_fused_operator_statistics() if isinstance(fused, OnnxModel) else {}
    model = fused.model
    if any(n.domain == "com.microsoft" for n in model.graph.node) and \
            not any(o.domain == "com.microsoft" for o in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, int(stats.get("Gelu", 0) + stats.get("BiasGelu", 0))


def _softmax_matmuls(model) -> list[str]:
    """Weight products next to a Softmax other than attention's: the logits it exponentiates (through
    a bias Add or a scale) and the product of its probabilities (the lite backbone's ImageNet
    classifier over every location, then the class-name embeddings weighted by it). INT8 error in
    logits is amplified by exp; small probabilities lose all precision under one per-tensor scale."""
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for sm in (n for n in model.graph.node if n.op_type == "Softmax"):
        node = producer.get(sm.input[0])
        while node is not None and node.op_type in ("Add", "Mul", "Div") and any(i in inits for i in node.input):
            node = producer.get(next(i for i in node.input if i not in inits), None)
        if node is not None and node.op_type == "MatMul" and node.input[1] in inits:
            out.append(node.name)
        out += [n.name for n in model.graph.node
                if n.op_type == "MatMul" and n.input[0] == sm.output[0] and n.input[1] in inits]
    return out


def _embedding_only_matmuls(model) -> list[str]:
    """Products that feed the image embedding output and not the query features (the tower's pooling
    projection of one token per image): a negligible share of the work, so INT8 would add error to the
    embedding and save nothing."""
    from .verify import EMBEDDING_OUTPUT

    outputs = [o.name for o in model.graph.output]
    if EMBEDDING_OUTPUT not in outputs:
        return []
    producer = {o: n for n in model.graph.node for o in n.output}

    def upstream(tensor: str) -> set[str]:
        seen, todo = set(), [tensor]
        while todo:
            node = producer.get(todo.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                todo.extend(node.input)
        return seen

    shared = set().union(*(upstream(o) for o in outputs if o != EMBEDDING_OUTPUT))
    only = upstream(EMBEDDING_OUTPUT) - shared
    return [n.name for n in model.graph.node if n.name in only and n.op_type in QUANTIZABLE]


def _activation_matmuls(model) -> list[str]:
    """MatMul nodes with no initializer operand (attention's Q.K^T and attention.V)."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not (set(n.input) & inits)]


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over preprocessed pixels."""

    def __init__(self, name: str, pixels: np.ndarray, batch: int = 4):
        self.batches = [{name: pixels[i:i + batch]} for i in range(0, len(pixels), batch)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self):
        self.i = 0


@contextlib.contextmanager
def _quiet():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _fused(model, fp32_onnx: str | Path, work: Path):
    """`model` rewritten into ONNX Runtime's fused operators and checked against the fp32 graph on
    seeded random pixels (ExportError if the rewrite changed the result)."""
    import onnx

    from .fuse import fuse_image_graph, verify_fused

    with _quiet():
        model, _stats = fuse_image_graph(model)
    path = work / "fp32_fused.onnx"
    onnx.save(model, str(path))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    pixels = np.random.default_rng(0).standard_normal((2, *dims[1:])).astype(np.float32)
    verify_fused(path, fp32_onnx, pixels)
    return model


def quantize_image_encoder(fp32_onnx: str | Path, out: str | Path, calibration: np.ndarray | None = None, *,
                           method: str = "dynamic", per_channel: bool = True, weight_type: str = "qint8",
                           quantize_attention: bool = False, calibrate_method: str = "minmax",
                           scope: str = "tokens", fuse_gelu: bool = True, fuse: bool = True) -> Path:
    """fp32 image graph -> INT8 image graph at `out` (float32 I/O). See the module docstring.
    `calibration`: preprocessed pixels [N, 3, H, W] float32 (static only). `scope`: "tokens"
    (default) quantizes every weight MatMul that reads image tokens (the backbone, and the head's
    key/value projections of the tokens) and keeps the head's query path (a few Nq-token products,
    ~1 % of the FLOPs, the most sensitive to rounding) in fp32; "trunk" keeps the whole head fp32;
    "all" quantizes the head (and the embedding's own projection) too. `fuse_gelu`: fuse GELU into
    ONNX Runtime's `BiasGelu` first (the INT8 graph is for ONNX Runtime only). `fuse`: first rewrite attention, residual +
    LayerNorm and GELU into ONNX Runtime's fused operators (`qks.export.fuse`, checked against the
    fp32 graph), so the packed QKV products quantize as `QAttention`. Raises ExportError."""
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
        from onnxruntime.quantization.calibrate import CalibrationMethod
        from onnxruntime.quantization.quant_utils import QuantFormat
    except ImportError as e:
        raise ExportError(f"INT8 quantization needs onnx and onnxruntime.quantization ({e}): "
                          "pip install 'qks[export]'") from None
    if method not in ("dynamic", "static"):
        raise ExportError(f"unknown INT8 method {method!r} (dynamic or static)")
    if method == "static" and (calibration is None or len(calibration) == 0):
        raise ExportError("static INT8 quantization needs calibration images")
    wt = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}.get(weight_type)
    if wt is None:
        raise ExportError(f"unknown INT8 weight type {weight_type!r} (qint8 or quint8)")
    if scope not in SCOPES:
        raise ExportError(f"unknown INT8 scope {scope!r} (one of {', '.join(SCOPES)})")
    out = Path(out)
    model = onnx.load(str(fp32_onnx))
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=out.parent))
    try:
        if fuse:
            model = _fused(model, fp32_onnx, work)
        elif fuse_gelu:
            with _quiet():
                model, _n = _fuse_gelu(model)
        _gemm_to_matmul(model)
        exclude = set() if quantize_attention else set(_activation_matmuls(model))
        exclude |= set(_softmax_matmuls(model)) if scope != "all" else set()
        exclude |= set(_embedding_only_matmuls(model)) if scope != "all" else set()
        if scope == "trunk":  # the whole head stays fp32
            exclude |= set(_head_matmuls(model))
        elif scope == "tokens":  # the head's query path (12 tokens: ~1 % of the FLOPs) stays fp32
            exclude |= set(_query_path_matmuls(model))
        exclude = sorted(exclude)
        src = work / "fp32_matmul.onnx"
        onnx.save(model, str(src))
        del model
        tmp = work / out.name
        with _quiet():
            if method == "dynamic":
                quantize_dynamic(str(src), str(tmp), op_types_to_quantize=list(QUANTIZABLE), per_channel=per_channel,
                                 weight_type=wt, nodes_to_exclude=exclude,
                                 extra_options={"MatMulConstBOnly": not quantize_attention,
                                               "DefaultTensorType": onnx.TensorProto.FLOAT})
            else:
                cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                      "entropy": CalibrationMethod.Entropy}[calibrate_method]
                name = onnx.load(str(src), load_external_data=False).graph.input[0].name
                quantize_static(str(src), str(tmp), _Reader(name, np.asarray(calibration, np.float32)),
                                quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                                per_channel=per_channel, weight_type=QuantType.QInt8,
                                activation_type=QuantType.QUInt8, nodes_to_exclude=exclude,
                                calibrate_method=cm,
                                extra_options={"MatMulConstBOnly": not quantize_attention,
                                               "DefaultTensorType": onnx.TensorProto.FLOAT})
        try:
            onnx.checker.check_model(str(tmp), full_check=False)
        except Exception as e:
            raise ExportError(f"INT8 graph {out.name} is not a valid ONNX model: {one_line(e)}") from e
        os.replace(tmp, out)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"INT8 quantization of {Path(fp32_onnx).name} failed: {one_line(e)}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def int8_summary(path: str | Path) -> dict:
    """Which ops run in INT8: counts of the integer ops, and of the float MatMul/Gemm/Conv left."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    out = {"integer_ops": {op: counts[op] for op in INTEGER_OPS if op in counts},
           "fused_ops": {op: counts[op] for op in FUSED_OPS if op in counts},
           "float_ops_left": {op: counts[op] for op in ("MatMul", "Gemm", "Conv") if op in counts},
           "int8_initializers": sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8),
           "fp32_initializers": sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)}
    return out


def verify_int8(int8_onnx: str | Path, images: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                bank: np.ndarray, bank_name: str = "default", *, cos_min: float = INT8_COSINE_MIN,
                top5_min: float = INT8_TOP5_MIN, graph: str = GRAPH_NAME,
                reference_embedding: dict[str, np.ndarray] | None = None) -> dict:
    """Run the INT8 graph on each input set (name -> pixels) and compare it with the fp32 graph's
    query features (`reference`, same keys) and, where given, its image embeddings
    (`reference_embedding`: the same cosine gate). Returns the manifest's verification record; raises
    ExportError when the cosine or the top-5 agreement is below the gate or an output is not finite."""
    sess = V.ort_session(int8_onnx)
    name = sess.get_inputs()[0].name
    ver: dict = {"reference": "image_encoder (fp32 ONNX)",
                 "tolerance": {"cosine_min": cos_min, "top5_agreement_min": top5_min}}
    got_all, ref_all = [], []
    for kind, pixels in images.items():
        out = V.outputs_by_name(sess, {name: np.asarray(pixels, np.float32)})
        qf = out["query_features"] if "query_features" in out else next(iter(out.values()))
        m = V.compare(qf, reference[kind], queries=True)
        agree = V.topk_agreement(V.scores(qf, bank), V.scores(reference[kind], bank))
        ver[kind] = {"query_features": {**m, "samples": len(pixels), f"top{V.TOPK}_agreement": agree,
                                        "bank": bank_name}}
        if not m["finite"]:
            raise ExportError(f"verification failed: {graph} gives non-finite query features on {kind} inputs")
        V.check_fp16(graph, kind, m, None, cos_min=cos_min)
        if reference_embedding is not None and kind in reference_embedding:
            if V.EMBEDDING_OUTPUT not in out:
                raise ExportError(f"verification failed: {graph} lost the {V.EMBEDDING_OUTPUT} output")
            emb = V.check_embedding(graph, kind, out[V.EMBEDDING_OUTPUT], reference_embedding[kind], cos_min)
            ver[kind][V.EMBEDDING_OUTPUT] = {**emb, "samples": len(pixels), "cosine_gate": cos_min}
        got_all.append(qf)
        ref_all.append(reference[kind])
    agree_all = V.topk_agreement(V.scores(np.concatenate(got_all), bank), V.scores(np.concatenate(ref_all), bank))
    ver[f"top{V.TOPK}_agreement"] = agree_all
    V.check_fp16(graph, "all verification", {"finite": True, "cosine_min": 1.0}, agree_all, top5_min=top5_min)
    return ver


def make_int8_graph(bundle_dir: str | Path, images: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                    bank: np.ndarray, bank_name: str = "default", *, source_file: str = "image_encoder.onnx",
                    calibration: np.ndarray | None = None, reference_embedding: dict[str, np.ndarray] | None = None,
                    **quantize_options) -> tuple[dict, dict]:
    """Quantize `source_file` into `image_encoder.int8.onnx` in the bundle folder and verify it: the
    fastest candidate (`_candidates`) that passes the gate is written, the ones rejected before it are
    listed in the summary's "rejected"; ExportError when none passes.
    Returns (verification record, int8 summary) for the graph's manifest record:
    `{"precision": "int8", "source": "image_encoder", "verification": ..., "int8": summary}`."""
    d = Path(bundle_dir)
    options = {"method": "dynamic", "per_channel": True, "weight_type": "qint8", "quantize_attention": False,
               "scope": "tokens", "fuse_gelu": True, "fuse": True, **quantize_options}
    rejected = []
    for candidate in _candidates(options):  # fastest first; the first that passes the gate is written
        try:
            ver = _quantize_and_verify(d, source_file, images, (reference, reference_embedding), bank, bank_name,
                                       calibration, candidate)
        except ExportError as e:
            rejected.append(f"{_describe(candidate)}: {e}")
            continue
        summary = dict(candidate)
        if candidate["method"] == "static":
            summary["calibration_images"] = len(calibration)
        if rejected:
            summary["rejected"] = rejected
        return ver, {**summary, **int8_summary(d / GRAPH_FILE)}
    raise ExportError(rejected[-1] if len(rejected) == 1 else
                      f"no INT8 graph passes the gate ({len(rejected)} tried); last: {rejected[-1]}")


def _candidates(options: dict) -> list[dict]:
    """The INT8 graphs to try, fastest first: fused before unfused, and after the requested "tokens"
    scope the "trunk" scope (the head's token keys/values fp32 too: 8 % of the products, and most of
    the INT8 error on random-weight ViT-B-16, benchmarks/RESULTS.md)."""
    scopes = [options["scope"], *(["trunk"] if options["scope"] == "tokens" else [])]
    fuses = [True, False] if options["fuse"] else [False]
    # Last, no GELU fusion either: ONNX Runtime's ViT fusion patterns can break a graph they were not
    # written for (a cycle in FastViT/ConvNeXt graphs: "Graph is not a DAG ... Gelu_AddBias").
    gelus = [True, False] if options["fuse_gelu"] else [False]
    return [dict(options, fuse=f and g, fuse_gelu=g, scope=sc) for g in gelus for f in fuses for sc in scopes
            if not (f and not g)]


def _describe(options: dict) -> str:
    kind = "fused" if options["fuse"] else "unfused" if options["fuse_gelu"] else "plain (no fusion)"
    return f"{kind} graph, scope {options['scope']}"


def _quantize_and_verify(d: Path, source_file: str, images, references, bank, bank_name, calibration, options) -> dict:
    reference, reference_embedding = references
    quantize_image_encoder(d / source_file, d / GRAPH_FILE, calibration, **options)
    try:
        return verify_int8(d / GRAPH_FILE, images, reference, bank, bank_name, reference_embedding=reference_embedding)
    except ExportError:
        (d / GRAPH_FILE).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# adding the INT8 graph to an existing bundle (torch-free: the runtime's preprocessing)


def add_int8_graph(bundle_dir: str | Path, calibration_images: str | Path | None = None, *, seed: int = 0,
                   random_images: int = 8, limit: int = 32, log=None, **quantize_options) -> dict:
    """Quantize an existing bundle's fp32 image graph, verify it on seeded random pixels and on the
    images of `calibration_images` (decoded by the runtime's preprocessing), and record it in the
    manifest as graph "image_encoder_int8". Returns the graph record."""
    from qks.runtime.bundle import Bundle
    from qks.runtime.manifest import file_record, sha256_file, write_manifest

    log = log or (lambda msg: None)
    bundle = Bundle.load(bundle_dir)
    d = bundle.root
    if SOURCE_GRAPH not in bundle.graphs:
        raise ExportError("the bundle has no fp32 image_encoder graph to quantize")
    src = bundle.graphs[SOURCE_GRAPH]
    size = bundle.preprocess.size
    images = {"random": np.random.default_rng(seed).standard_normal((random_images, 3, size, size)).astype(np.float32)}
    names: list[str] = []
    if calibration_images is not None:
        from qks.runtime.infer import find_images

        folder = Path(calibration_images)
        files = find_images(folder)[:limit]
        if not files:
            raise ExportError(f"calibration images: no image files in {folder}")
        from qks.runtime.preprocess import PreprocessError

        try:
            images["calibration"] = np.stack([bundle.preprocess.load(folder / f) for f in files])
        except PreprocessError as e:
            raise ExportError(f"calibration images: {e}") from None
        names = files
    log("running the fp32 graph on the verification images")
    sess = V.ort_session(src.path)
    in_name = sess.get_inputs()[0].name
    outputs = {k: V.outputs_by_name(sess, {in_name: v}) for k, v in images.items()}
    del sess
    reference = {k: out["query_features"] for k, out in outputs.items()}
    reference_embedding = ({k: out[V.EMBEDDING_OUTPUT] for k, out in outputs.items()}
                           if bundle.embedding_output else None)  # an old bundle has none to carry
    bank_name = bundle.default_bank()
    bank = np.load(bundle.banks[bank_name].path)
    log(f"quantizing {src.file} to INT8 and verifying it")
    calibration = images.get("calibration") if quantize_options.get("method") == "static" else None
    ver, summary = make_int8_graph(d, images, reference, bank, bank_name, source_file=src.file,
                                   calibration=calibration, reference_embedding=reference_embedding,
                                   **quantize_options)
    m = bundle.manifest
    base = m["graphs"][SOURCE_GRAPH]
    rec = {k: base[k] for k in ("opset", "inputs", "outputs", "dynamic_axes") if k in base}
    rec.update(file=GRAPH_FILE, precision="int8", source=SOURCE_GRAPH, verification=ver, int8=summary,
               sha256=sha256_file(d / GRAPH_FILE), bytes=(d / GRAPH_FILE).stat().st_size)
    if names:
        rec["verification"]["calibration_images"] = names
    m["graphs"][GRAPH_NAME] = rec
    m["files"][GRAPH_FILE] = file_record(d, GRAPH_FILE)
    write_manifest(d, m)
    return rec


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m qks.export.int8",
                                 description="Add a verified INT8 image graph to an existing qks bundle.")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--calibration-images", type=Path, help="real images to verify on (and calibrate, static)")
    ap.add_argument("--method", choices=["dynamic", "static"], default="dynamic")
    ap.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    ap.add_argument("--weight-type", choices=["qint8", "quint8"], default="qint8")
    ap.add_argument("--quantize-attention", action="store_true", help="also quantize Q.K^T and attention.V")
    args = ap.parse_args(argv)
    try:
        rec = add_int8_graph(args.bundle, args.calibration_images, method=args.method,
                             per_channel=not args.per_tensor, weight_type=args.weight_type,
                             quantize_attention=args.quantize_attention,
                             log=lambda m: print(f"int8: {m}", file=sys.stderr))
    except Exception as e:  # one line, non-zero exit
        print(f"int8: error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    v = rec["verification"]
    for kind in ("random", "calibration"):
        if kind in v:
            q = v[kind]["query_features"]
            print(f"{kind}: cosine min {q['cosine_min']:.6f}, top-5 agreement {q['top5_agreement']:.1%} "
                  f"({q['samples']} images)")
    print(f"top-5 agreement (all): {v['top5_agreement']:.1%}; {rec['bytes'] / 2**20:.1f} MiB; ops {rec['int8']}")


if __name__ == "__main__":  # pragma: no cover
    main()
