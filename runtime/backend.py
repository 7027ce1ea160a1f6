"""Pick the engine for a bundle's image graph: `--backend auto|tensorrt|ort-cuda|ort-cpu`.

`auto` tries TensorRT (a compatible plan in the bundle, TensorRT + cuda-python, a CUDA device),
then ONNX Runtime CUDA (the provider must actually load in a created session), then ONNX Runtime
CPU, and returns the first that works with a one-line reason naming why each faster one was
skipped. A named backend that cannot run is an error (no silent fallback).
"""

from __future__ import annotations

from ..engines.base import Engine, EngineError
from .bundle import Bundle

BACKENDS = ("auto", "tensorrt", "ort-cuda", "ort-cpu")
FP16_ORT_OPTIONS = ["NchwcTransformer"]  # onnxruntime segfaulted on an fp16 graph without this


def _ort_graph(bundle: Bundle, prefer_fp16: bool):
    order = ("image_encoder_fp16", "image_encoder") if prefer_fp16 else ("image_encoder", "image_encoder_fp16")
    for name in order:
        if name in bundle.graphs:
            return bundle.graphs[name]
    raise EngineError("bundle has no image encoder graph")


def _open_ort(bundle: Bundle, provider: str, threads: int | None, device_id: int):
    from ..engines.ort import OrtEngine

    graph = _ort_graph(bundle, prefer_fp16=provider != "cpu")
    disabled = FP16_ORT_OPTIONS if graph.precision == "fp16" or graph.name.endswith("fp16") else None
    engine = OrtEngine(graph.path, provider, intra_op_threads=threads, disabled_optimizers=disabled,
                       device_id=device_id)
    return engine, graph.file


def _open_trt(bundle: Bundle, device_id: int, cuda_graph: bool):
    from ..engines.trt import TrtEngine, cuda_device, import_cudart, import_tensorrt

    plans = [e for e in bundle.engines if e.get("graph", "").startswith("image_encoder")]
    if not plans:
        raise EngineError("the bundle has no TensorRT plan for the image encoder (qks-export --tensorrt)")
    import_tensorrt()
    import_cudart()
    cuda_device(device_id)
    errors = []
    # fp16 plans first: faster on every GPU TensorRT supports
    for rec in sorted(plans, key=lambda r: 0 if "fp16" in (r.get("precision", "") + r.get("graph", "")) else 1):
        try:
            sidecar = bundle.file(rec["sidecar"]) if rec.get("sidecar") else None
            return TrtEngine(rec["path"], device_id=device_id, cuda_graph=cuda_graph, sidecar=sidecar), rec["file"]
        except EngineError as e:
            errors.append(str(e))
    raise EngineError("; ".join(errors))


def _open(bundle: Bundle, backend: str, threads: int | None, device_id: int, cuda_graph: bool):
    if backend == "tensorrt":
        return _open_trt(bundle, device_id, cuda_graph)
    if backend == "ort-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError("this onnxruntime has no CUDAExecutionProvider (pip install 'qks[gpu]')")
        return _open_ort(bundle, "cuda", threads, device_id)
    if backend == "ort-cpu":
        return _open_ort(bundle, "cpu", threads, device_id)
    raise EngineError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")


def select_backend(bundle: Bundle, backend: str = "auto", *, threads: int | None = None, device_id: int = 0,
                   cuda_graph: bool = False) -> tuple[Engine, str]:
    """(engine for the image graph, one-line reason). EngineError if the named backend cannot run."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    if backend != "auto":
        try:
            engine, file = _open(bundle, backend, threads, device_id, cuda_graph)
        except EngineError as e:
            raise EngineError(f"backend {backend} cannot run: {e}") from None
        return engine, f"{backend}: requested ({file}{_threads(backend, threads)})"
    skipped = []
    for name in ("tensorrt", "ort-cuda", "ort-cpu"):
        try:
            engine, file = _open(bundle, name, threads, device_id, cuda_graph)
        except EngineError as e:
            skipped.append(f"{name}: {e}")
            continue
        why = f" because {'; '.join(skipped)}" if skipped else " (fastest available)"
        return engine, f"auto: picked {name} ({file}{_threads(name, threads)}){why}"
    raise EngineError("no backend can run: " + "; ".join(skipped))


def _threads(backend: str, threads: int | None) -> str:
    return f", threads={threads}" if backend == "ort-cpu" and threads else ""
