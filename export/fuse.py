"""Rewrite an exported image graph into the fused operators ONNX Runtime's CPU kernels run best.

The dynamo exporter writes attention as a chain of plain ops (in-projection, head split through
Reshape/Transpose/Gather, scaled Q.K^T, Softmax, attention.V, head merge, out-projection), and
ONNX Runtime's own transformer optimizer finds no attention pattern in it. `fuse_image_graph`
finds every Softmax that sits between two activation MatMuls, traces its Q, K and V back to their
linear projections and its output forward to the out-projection, and replaces the chain with:

- `com.microsoft.Attention` where Q, K and V are projections of one input (open_clip's packed
  in-projection, the QKS head's self-attention: its three weights concatenated). Its input
  product is one [C, 3C] matrix, which the INT8 quantizer turns into `QAttention` (INT8 QKV
  product, fp32 softmax);
- `com.microsoft.MultiHeadAttention` over the projected Q, K, V otherwise (the head's
  cross-attention from the queries to the image tokens);

then an out-projection MatMul + Add in the batch-first layout, so the head-split transposes and
the sequence-first transposes around open_clip's attention go away. After that, only ONNX
Runtime's GELU fusion of `onnxruntime.transformers` runs (its SkipLayerNormalization fusion on
request: slower here than ONNX Runtime's own fusion at session load).

Every rewrite is checked, not assumed: `verify_fused` runs the fused and the original graph on
the same pixels and raises ExportError past the fp32 export tolerance. An attention the tracer
does not recognise is left as it was (counted in the stats).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ExportError

MS_DOMAIN = "com.microsoft"
LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather")  # Gather: a packed QKV's select
FUSED_REL_TOL = 1e-4  # the fp32 export tolerance: max |fused - original| <= 1e-4 x output scale


@dataclass
class _Linear:
    """x @ W (+ b), with W and b initializers; `out` is the projection's output tensor."""

    x: str
    weight: np.ndarray  # [C_in, C_out]
    bias: np.ndarray | None
    out: str


class _Graph:
    """Lookups over an ONNX graph: producers, consumers, initializers, value_info shapes."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self._to_array = numpy_helper.to_array
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.shapes = {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in v.type.tensor_type.shape.dim]
                       for v in list(g.value_info) + list(g.input) + list(g.output)}

    def array(self, name: str) -> np.ndarray | None:
        if name not in self.inits:
            return None
        if name not in self._arrays:
            self._arrays[name] = self._to_array(self.inits[name])
        return self._arrays[name]

    def scalar(self, name: str) -> float | None:
        a = self.array(name)
        return float(a.reshape(-1)[0]) if a is not None and a.size == 1 else None

    def single_consumer(self, tensor: str):
        c = self.consumers.get(tensor, [])
        return c[0] if len(c) == 1 else None


def _linear_at(g: _Graph, tensor: str) -> _Linear | None:
    """The projection producing `tensor`: Add(MatMul(x, W), b), MatMul(x, W) or Gemm(x, W, b)."""
    from onnx import helper

    node = g.producer.get(tensor)
    if node is None:
        return None
    if node.op_type == "Add":
        b_name = next((i for i in node.input if i in g.inits), None)
        other = next((i for i in node.input if i not in g.inits), None)
        mm = g.producer.get(other) if other else None
        if b_name is None or mm is None or mm.op_type != "MatMul" or mm.input[1] not in g.inits:
            return None
        return _Linear(mm.input[0], g.array(mm.input[1]), g.array(b_name).reshape(-1), tensor)
    if node.op_type == "MatMul" and node.input[1] in g.inits:
        return _Linear(node.input[0], g.array(node.input[1]), None, tensor)
    if node.op_type == "Gemm" and node.input[1] in g.inits:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        w = g.array(node.input[1])
        w = w.T if attrs.get("transB", 0) else w
        b = g.array(node.input[2]).reshape(-1) if len(node.input) > 2 and node.input[2] in g.inits else None
        return _Linear(node.input[0], np.ascontiguousarray(w), b, tensor)
    return None


def _trace_back(g: _Graph, tensor: str) -> tuple[_Linear | None, int | None]:
    """Walk back through layout ops (data input only) to the projection; (linear, packed index)."""
    index = None
    for _ in range(16):
        node = g.producer.get(tensor)
        if node is None or node.op_type not in LAYOUT_OPS:
            break
        if node.op_type == "Gather":
            i = g.scalar(node.input[1])
            if i is None or index is not None:
                return None, None
            index = int(i)
        tensor = node.input[0]
    return _linear_at(g, tensor), index


def _scaled(g: _Graph, tensor: str) -> tuple[str, float]:
    """Mul(x, scalar) -> (x, scalar); anything else -> (tensor, 1.0)."""
    node = g.producer.get(tensor)
    if node is not None and node.op_type == "Mul":
        for a, b in (node.input, reversed(node.input)):
            s = g.scalar(b)
            if s is not None and a not in g.inits:
                return a, s
    return tensor, 1.0


def _trace_forward(g: _Graph, tensor: str) -> tuple[_Linear | None, str | None]:
    """From attention.V's output through single-consumer layout ops to the out-projection, then on
    through layout ops to the tensor the rest of the graph reads: (out-projection, end tensor)."""
    for _ in range(8):
        node = g.single_consumer(tensor)
        if node is None:
            return None, None
        if node.op_type in ("Reshape", "Transpose"):
            tensor = node.output[0]
            continue
        break
    else:
        return None, None
    out = node.output[0]
    if node.op_type == "MatMul":
        add = g.single_consumer(out)
        if add is not None and add.op_type == "Add" and any(i in g.inits for i in add.input):
            out = add.output[0]
    lin = _linear_at(g, out)
    if lin is None:
        return None, None
    end = out
    for _ in range(4):
        nxt = g.single_consumer(end)
        if nxt is None or nxt.op_type not in ("Reshape", "Transpose"):
            break
        end = nxt.output[0]
    return lin, end


def _same_dims(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(
        x == y and x not in (None, "") for x, y in zip(a, b, strict=True))


def _batch_first_input(g: _Graph, x: str) -> str:
    """open_clip runs attention sequence-first: x = Transpose(x_bf, [1, 0, 2]); give x_bf."""
    from onnx import helper

    node = g.producer.get(x)
    if node is not None and node.op_type == "Transpose":
        perm = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"), None)
        if list(perm or []) == [1, 0, 2]:
            return node.input[0]
    return x


@dataclass
class _Match:
    kind: str  # "Attention" or "MultiHeadAttention"
    inputs: list  # Attention: [x_bf, W(C, 3C), b(3C)]; MHA: [q, k, v] tensor names
    heads: int
    scale: float
    out: _Linear
    end: str  # the tensor the rest of the graph reads; its producer is replaced


def _match(g: _Graph, softmax) -> _Match | None:
    """Recognise the attention around one Softmax, or None (left unfused)."""
    qk = g.producer.get(softmax.input[0])
    av = g.single_consumer(softmax.output[0])
    if qk is None or qk.op_type != "MatMul" or av is None or av.op_type != "MatMul" or av.input[0] != softmax.output[0]:
        return None
    if any(i in g.inits for i in list(qk.input) + [av.input[1]]):
        return None
    qh, sq = _scaled(g, qk.input[0])
    kh, sk = _scaled(g, qk.input[1])
    shape = g.shapes.get(qh)
    if not shape or not isinstance(shape[-1], int) or shape[-1] <= 0:
        return None
    head_dim = shape[-1]
    (q, qi), (k, ki), (v, vi) = _trace_back(g, qh), _trace_back(g, kh), _trace_back(g, av.input[1])
    if q is None or k is None or v is None:
        return None
    out, end = _trace_forward(g, av.output[0])
    if out is None:
        return None
    width = out.weight.shape[0]
    if width % head_dim:
        return None
    heads, scale = width // head_dim, sq * sk
    if q.out == k.out == v.out and (qi, ki, vi) == (0, 1, 2):  # one packed [C, 3C] in-projection
        x = _batch_first_input(g, q.x)
        if q.weight.shape != (width, 3 * width) or not _same_dims(g.shapes.get(x), g.shapes.get(end)):
            return None
        bias = q.bias if q.bias is not None else np.zeros(3 * width, np.float32)
        return _Match("Attention", [x, q.weight, bias], heads, scale, out, end)
    if qi is not None or ki is not None or vi is not None or len({q.out, k.out, v.out}) != 3:
        return None
    if q.x == k.x == v.x:  # self-attention with three projections: concatenate them
        if not _same_dims(g.shapes.get(q.x), g.shapes.get(end)):
            return None
        w = np.concatenate([q.weight, k.weight, v.weight], axis=1)
        zeros = np.zeros(width, np.float32)
        b = np.concatenate([p.bias if p.bias is not None else zeros for p in (q, k, v)])
        return _Match("Attention", [q.x, w, b], heads, scale, out, end)
    if not _same_dims(g.shapes.get(q.out), g.shapes.get(end)):
        return None
    return _Match("MultiHeadAttention", [q.out, k.out, v.out], heads, scale, out, end)


def _emit(g: _Graph, m: _Match, i: int) -> tuple[list, list]:
    """(new nodes, new initializers) computing m.end from the attention's inputs."""
    from onnx import helper, numpy_helper

    inits, prefix = [], f"qks_fused_attn_{i}"
    attrs = {"num_heads": m.heads}
    if abs(m.scale - (m.out.weight.shape[0] / m.heads) ** -0.5) > 1e-6 * m.scale:
        attrs["scale"] = float(m.scale)  # not the default 1/sqrt(head_dim)
    if m.kind == "Attention":
        x, w, b = m.inputs
        inits += [numpy_helper.from_array(np.ascontiguousarray(w, np.float32), f"{prefix}.qkv_weight"),
                  numpy_helper.from_array(np.asarray(b, np.float32), f"{prefix}.qkv_bias")]
        ins = [x, f"{prefix}.qkv_weight", f"{prefix}.qkv_bias"]
    else:
        ins = list(m.inputs)
    nodes = [helper.make_node(m.kind, ins, [f"{prefix}.out"], name=f"{prefix}", domain=MS_DOMAIN, **attrs)]
    inits.append(numpy_helper.from_array(np.ascontiguousarray(m.out.weight, np.float32), f"{prefix}.out_weight"))
    mm_out = f"{prefix}.out_mm" if m.out.bias is not None else m.end
    nodes.append(helper.make_node("MatMul", [f"{prefix}.out", f"{prefix}.out_weight"], [mm_out],
                                  name=f"{prefix}_out_matmul"))
    if m.out.bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(m.out.bias, np.float32), f"{prefix}.out_bias"))
        nodes.append(helper.make_node("Add", [mm_out, f"{prefix}.out_bias"], [m.end], name=f"{prefix}_out_bias"))
    return nodes, inits


def _prune(model) -> None:
    """Drop nodes whose outputs nothing reads, then initializers nothing reads."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    names = {o for n in keep for o in n.output} | {t.name for t in inits} | {i.name for i in g.input}
    vi = [v for v in g.value_info if v.name in names]
    del g.value_info[:]
    g.value_info.extend(vi)


def fuse_attention(model) -> dict:
    """Replace every recognised attention in `model` (in place). Returns {"Attention": n,
    "MultiHeadAttention": n, "unfused_softmax": n}."""
    from onnx import helper

    g = _Graph(model)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    matches = [m for m in (_match(g, n) for n in softmaxes) if m is not None]
    stats = {"Attention": 0, "MultiHeadAttention": 0, "unfused_softmax": len(softmaxes) - len(matches)}
    if not matches:
        return stats
    replace = {}
    new_inits = []
    for i, m in enumerate(matches):
        nodes, inits = _emit(g, m, i)
        replace[id(g.producer[m.end])] = nodes
        new_inits += inits
        stats[m.kind] += 1
    out = []
    for node in model.graph.node:
        out.extend(replace.get(id(node), [node]))
    del model.graph.node[:]
    model.graph.node.extend(out)
    model.graph.initializer.extend(new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _prune(model)
    return stats


def ort_fusions(model, *, skip_layer_norm: bool = True, gelu: bool = True):
    """ONNX Runtime's own GELU -> Gelu/BiasGelu and Add + LayerNormalization -> SkipLayerNormalization
    fusions (`onnxruntime.transformers`; nothing else of that optimizer). Returns (model, counts)."""
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_by_fusion
    except ImportError:
        return model, {}
    options = FusionOptions("vit")
    for name in list(vars(options)):
        if name.startswith("enable_"):
            setattr(options, name, False)
    options.enable_gelu = options.enable_bias_gelu = gelu
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = skip_layer_norm
    fused = optimize_by_fusion(model, model_type="vit", num_heads=0, hidden_size=0, optimization_options=options)
    stats = fused.get_fused_operator_statistics()
    model = fused.model
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    keys = ("Gelu", "BiasGelu", "FastGelu", "SkipLayerNormalization")
    return model, {k: int(stats.get(k, 0)) for k in keys if stats.get(k)}


def fuse_image_graph(model, *, attention: bool = True, skip_layer_norm: bool = False, gelu: bool = True):
    """The fused graph (a new or modified ModelProto) and what was fused: {op: count}.
    `skip_layer_norm` is off by default: on ViT-B-16's INT8 graph the offline SkipLayerNormalization
    nodes took 247 ms per batch of 8 against 91 ms for what ONNX Runtime fuses itself at load
    (benchmarks/RESULTS.md)."""
    stats: dict = {}
    if attention:
        stats.update(fuse_attention(model))
    model, more = ort_fusions(model, skip_layer_norm=skip_layer_norm, gelu=gelu)
    stats.update(more)
    return model, stats


def verify_fused(fused_path, original_path, pixels: np.ndarray, tol: float = FUSED_REL_TOL) -> dict:
    """Run both graphs on `pixels` with ONNX Runtime; ExportError past `tol` x the output scale."""
    from . import verify as V

    a, b = V.ort_session(fused_path), V.ort_session(original_path)
    name = b.get_inputs()[0].name
    outs = V.outputs_by_name(a, {a.get_inputs()[0].name: pixels})
    refs = V.outputs_by_name(b, {name: pixels})
    if list(outs) != list(refs):
        raise ExportError(f"the fused image graph has outputs {list(outs)}, the original {list(refs)}")
    m = {}
    try:
        for out_name, ref in refs.items():  # query_features, and the embedding where the graph has it
            mo = V.compare(outs[out_name], ref, queries=True)
            V.check_fp32("fused image graph", out_name, "random", mo, tol)
            m = m or mo  # the first output's metrics, as before
    except ExportError as e:
        raise ExportError(f"{e} (the attention fusion changed the result: export without it)") from None
    return m
