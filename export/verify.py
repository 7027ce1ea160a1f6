"""Verification of exported graphs: ONNX Runtime (CPU) against PyTorch, and FP16 against FP32.

Metrics per output, as the manifest records them:
- `max_abs_err`: max |onnx - reference| over every element;
- `scale`: max |reference| (what "relative to the output scale" means);
- `rel_err`: max_abs_err / scale;
- `cosine_min` / `cosine_mean`: cosine between onnx and reference per sample (the sample's whole
  output flattened); `query_cosine_min`: per query vector, for query features.
FP16 graphs also get `top5_agreement`: the mean over images of |top-5 labels (fp16) ∩ top-5 labels
(fp32)| / 5, scored against the default label bank with max-over-queries (the paper's scoring).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ExportError

FP32_REL_TOL = 1e-4  # max abs error <= 1e-4 x the output's scale
FP16_COSINE_MIN = 0.999  # query-feature cosine, every image
FP16_TOP5_MIN = 0.99  # top-5 label agreement with the fp32 graph
EMBEDDING_OUTPUT = "embedding"  # the image graphs' second output (export/graphs.py), named in the manifest
TOPK = 5


def ort_session(path: str | Path):
    """A CPU ONNX Runtime session. NchwcTransformer is disabled: onnxruntime 1.32 crashed loading an
    FP16 text graph with it at full optimisation (see ENVIRONMENT.md)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["NchwcTransformer"])


def compare(actual: np.ndarray, reference: np.ndarray, queries: bool = False) -> dict:
    """Error metrics of `actual` against `reference` (same shape; first axis = samples)."""
    if actual.shape != reference.shape:
        raise ExportError(f"output shape {list(actual.shape)} differs from PyTorch's {list(reference.shape)}")
    a = actual.astype(np.float64)
    r = reference.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite outputs are reported, not warned
        err = float(np.abs(a - r).max()) if a.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        cos = _cosine(a.reshape(len(a), -1), r.reshape(len(r), -1))
    out = {"max_abs_err": err, "scale": scale, "rel_err": err / scale if scale > 0 else err,
           "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
           "finite": bool(np.isfinite(actual).all())}
    if queries and a.ndim == 3:
        with np.errstate(invalid="ignore", over="ignore"):
            out["query_cosine_min"] = float(_cosine(a.reshape(-1, a.shape[-1]),
                                                    r.reshape(-1, r.shape[-1])).min())
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = dot / np.maximum(na * nb, 1e-30)
    return np.where(both_zero, 1.0, cos)


def scores(query_features: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """[B, Nq, D] x [L, D] -> [B, L]: max over queries of the dot products."""
    return np.einsum("bqd,ld->bql", query_features.astype(np.float64), bank.astype(np.float64)).max(axis=1)


def topk_agreement(a_scores: np.ndarray, b_scores: np.ndarray, k: int = TOPK) -> float:
    """Mean over images of the overlap of the two top-k label sets (order inside the top k ignored)."""
    k = min(k, a_scores.shape[1])
    if k == 0 or len(a_scores) == 0:
        return 1.0
    ta = np.argsort(-a_scores, axis=1, kind="stable")[:, :k]
    tb = np.argsort(-b_scores, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb, strict=True)]))


def check_fp32(graph: str, output: str, inputs: str, metrics: dict, tol: float | None = None) -> None:
    tol = FP32_REL_TOL if tol is None else tol
    if not metrics["finite"]:
        raise ExportError(f"verification failed: {graph} gives non-finite {output} on {inputs} inputs")
    if metrics["max_abs_err"] > tol * max(metrics["scale"], 1e-12):
        raise ExportError(
            f"verification failed: {graph} {output} differs from PyTorch on {inputs} inputs by "
            f"{metrics['max_abs_err']:.3g} (max allowed {tol:g} x output scale {metrics['scale']:.3g})")


def check_fp16(graph: str, inputs: str, metrics: dict, agreement: float | None,
               cos_min: float | None = None, top5_min: float | None = None) -> None:
    cos_min = FP16_COSINE_MIN if cos_min is None else cos_min
    top5_min = FP16_TOP5_MIN if top5_min is None else top5_min
    if not metrics["finite"]:
        raise ExportError(f"verification failed: {graph} gives non-finite query features on {inputs} inputs "
                          "(FP16 overflow)")
    if metrics["cosine_min"] < cos_min:
        raise ExportError(f"verification failed: {graph} query-feature cosine vs fp32 is "
                          f"{metrics['cosine_min']:.6f} on {inputs} inputs (minimum {cos_min})")
    if agreement is not None and agreement < top5_min:
        raise ExportError(f"verification failed: {graph} top-{TOPK} label agreement with fp32 is "
                          f"{agreement:.1%} on {inputs} inputs (minimum {top5_min:.0%})")


def check_embedding(graph: str, inputs: str, actual: np.ndarray, reference: np.ndarray, cos_min: float) -> dict:
    """The image embedding of a reduced-precision (or fused) graph against its reference: every image's
    cosine >= `cos_min` (the gate its query features pass), finite, and unit length as exported."""
    m = compare(actual, reference)
    if not m["finite"]:
        raise ExportError(f"verification failed: {graph} gives a non-finite {EMBEDDING_OUTPUT} on {inputs} inputs")
    if m["cosine_min"] < cos_min:
        raise ExportError(f"verification failed: {graph} {EMBEDDING_OUTPUT} cosine vs its reference is "
                          f"{m['cosine_min']:.6f} on {inputs} inputs (minimum {cos_min})")
    norms = np.linalg.norm(actual.astype(np.float64), axis=1)
    m["norm_err_max"] = float(np.abs(norms - 1.0).max()) if len(norms) else 0.0
    if m["norm_err_max"] > 1e-3:
        raise ExportError(f"verification failed: {graph} {EMBEDDING_OUTPUT} is not L2-normalised on {inputs} "
                          f"inputs (|norm - 1| up to {m['norm_err_max']:.3g})")
    return m


def outputs_by_name(sess, feeds: dict) -> dict[str, np.ndarray]:
    """One ONNX Runtime run, every output by name."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))
