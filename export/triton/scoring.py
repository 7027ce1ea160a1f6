"""The scoring model of the ONNX repository: a small ONNX graph holding the label bank (max, or top-k
sum, over the queries of the dot products, then sigmoid: what qks-infer computes), and its folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import LABELS_FILE, LOGITS, PROBS, SELECTED, TritonError, now, selection_thresholds
from .config import scoring_config, triton_dims, write_config


def scoring_model(embeddings: np.ndarray, *, queries: int | None, in_dtype: str = "float32", mode: str = "max",
                  k: int = 1, opset: int = 18, input_name: str = "query_features", thresholds: np.ndarray | None = None):
    """An ONNX model: query_features [B, Nq, D] -> probabilities, logits [B, L] (float32), computing
    exactly `qks.runtime.scoring`: logits = max over queries (or the sum of the top k) of the dot
    products with the bank's embeddings [L, D]; probabilities = sigmoid(logits); selected (BOOL) =
    probabilities >= the label's threshold (`thresholds` [L], default 0.5 each). `queries` None
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
    thr = np.full(n_labels, 0.5, dtype=np.float32) if thresholds is None else np.asarray(thresholds, dtype=np.float32)
    if thr.shape != (n_labels,):
        raise TritonError(f"{thr.shape} thresholds for {n_labels} labels")
    inits.append(numpy_helper.from_array(thr, "label_thresholds"))
    nodes.append(helper.make_node("GreaterOrEqual", [PROBS, "label_thresholds"], [SELECTED]))
    graph = helper.make_graph(
        nodes, "qks_scoring",
        [helper.make_tensor_value_info(input_name, onnx_in[in_dtype], ["batch", queries or "queries", d])],
        [helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, ["batch", n_labels]),
         helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", n_labels]),
         helper.make_tensor_value_info(SELECTED, TensorProto.BOOL, ["batch", n_labels])],
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


def write_scoring(folder: Path, model_name: str, bank, image_qf: dict, max_batch: int, mode: str, k: int,
                   opset: int, bundle_root: Path) -> dict:
    """NAME_scoring: config, labels.txt, 1/model.onnx. Returns its part of the marker."""
    qf_dims = triton_dims(image_qf["shape"], "image model output")
    if len(qf_dims) != 2:
        raise TritonError(f"image model output {image_qf['name']!r} is {image_qf['shape']}, expected [batch, Nq, D]")
    nq, d = qf_dims
    if d > 0 and bank.embeddings.shape[1] != d:
        raise TritonError(f"label bank has dimension {bank.embeddings.shape[1]}, the image model's query features "
                          f"have {d}")
    thresholds, selection = selection_thresholds(bank)
    model = scoring_model(bank.embeddings, queries=nq if nq > 0 else None, in_dtype=image_qf["dtype"], mode=mode,
                          k=k, opset=opset, input_name="query_features", thresholds=thresholds)
    (folder / "1").mkdir(parents=True)
    _save_onnx(model, folder / "1" / "model.onnx")
    (folder / LABELS_FILE).write_text("".join(n + "\n" for n in bank.names), encoding="utf-8")
    cfg = scoring_config(model_name, {**image_qf, "name": "query_features"}, qf_dims, len(bank.names), max_batch)
    write_config(folder, cfg, f"qks-triton {now()}: {len(bank.names)} labels ({bank.source}), scoring {mode}"
                  + (f" k={k}" if mode == "topk" else "") + f" over the queries, then sigmoid; selected: {selection}\n"
                  f"bundle: {bundle_root}")
    return {"labels": len(bank.names), "bank": bank.source, "bank_key": bank.key, "dim": int(bank.embeddings.shape[1]),
            "selection": selection,
            "mode": mode, "k": int(k), "opset": max(17, int(opset)), "written": now()}
