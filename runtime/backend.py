"""Pick the engine for a bundle's image graph: `--backend auto|tensorrt|ort-cuda|ort-cpu`.

`auto` tries TensorRT (a compatible plan in the bundle, TensorRT + cuda-python, a CUDA device),
then ONNX Runtime CUDA (the provider must actually load in a created session), then ONNX Runtime
CPU, and returns the first that works with a one-line reason naming why each faster one was
skipped. A named backend that cannot run is an error (no silent fallback).

`--precision auto|fp32|fp16|int8` picks the ONNX image graph for the ONNX Runtime backends. `auto`:
on the CPU the INT8 graph when the bundle has one (`qks-export --int8`; it passed its parity gate
at export, and is about 3x faster than fp32 on CPUs with VNNI/AMX), else fp32 (fp16 is slower than
fp32 on CPUs); on CUDA fp16, else fp32 (the INT8 graph's integer ops would run on the CPU there).
A named precision the bundle lacks is an error.
"""

from __future__ import annotations

from ..engines.base import Engine, EngineError
from .bundle import Bundle

BACKENDS = ("auto", "tensorrt", "ort-cuda", "ort-cpu")
PRECISIONS = ("auto", "fp32", "fp16", "int8")
FP16_ORT_OPTIONS = ["NchwcTransformer"]  # onnxruntime segfaulted on an fp16 graph without this
IMAGE_GRAPH_BY_PRECISION = {"fp32": "image_encoder", "fp16": "image_encoder_fp16", "int8": "image_encoder_int8"}
AUTO_ORDER = {"cpu": ("int8", "fp32", "fp16"), "cuda": ("fp16", "fp32", "int8")}


def _ort_graph(bundle: Bundle, provider: str, precision: str = "auto"):
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    if precision != "auto":
        name = IMAGE_GRAPH_BY_PRECISION[precision]
        if name not in bundle.graphs:
            have = [p for p, g in IMAGE_GRAPH_BY_PRECISION.items() if g in bundle.graphs]
            hint = " (qks-export --int8)" if precision == "int8" else " (qks-export --fp16)" if precision == "fp16" else ""
            raise EngineError(f"the bundle has no {precision} image graph{hint}; it has: {', '.join(have)}")
        return bundle.graphs[name]
    for p in AUTO_ORDER["cpu" if provider == "cpu" else "cuda"]:
        if IMAGE_GRAPH_BY_PRECISION[p] in bundle.graphs:
            return bundle.graphs[IMAGE_GRAPH_BY_PRECISION[p]]
    raise EngineError("bundle has no image encoder graph")


def _open_ort(bundle: Bundle, provider: str, threads: int | None, device_id: int, precision: str = "auto"):
    from ..engines.ort import OrtEngine

    graph = _ort_graph(bundle, provider, precision)
    disabled = FP16_ORT_OPTIONS if graph.precision == "fp16" or graph.name.endswith("fp16") else None
    engine = OrtEngine(graph.path, provider, intra_op_threads=threads, disabled_optimizers=disabled,
                       device_id=device_id)
    engine.precision = graph.precision
    engine.graph_name = graph.name
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


def _open(bundle: Bundle, backend: str, threads: int | None, device_id: int, cuda_graph: bool,
          precision: str = "auto"):
    if backend == "tensorrt":
        if precision not in ("auto", "fp16", "fp32"):
            raise EngineError(f"TensorRT plans are built from the fp32/fp16 graphs, not {precision}")
        return _open_trt(bundle, device_id, cuda_graph)
    if backend == "ort-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError("this onnxruntime has no CUDAExecutionProvider (pip install 'qks[gpu]')")
        return _open_ort(bundle, "cuda", threads, device_id, precision)
    if backend == "ort-cpu":
        return _open_ort(bundle, "cpu", threads, device_id, precision)
    raise EngineError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")


def select_backend(bundle: Bundle, backend: str = "auto", *, threads: int | None = None, device_id: int = 0,
                   cuda_graph: bool = False, precision: str = "auto") -> tuple[Engine, str]:
    """(engine for the image graph, one-line reason). EngineError if the named backend cannot run.
    `precision` picks the ONNX image graph of the ONNX Runtime backends (see the module docstring)."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    if backend != "auto":
        try:
            engine, file = _open(bundle, backend, threads, device_id, cuda_graph, precision)
        except EngineError as e:
            raise EngineError(f"backend {backend} cannot run: {e}") from None
        return engine, f"{backend}: requested ({file}{_threads(backend, threads)})"
    skipped = []
    for name in ("tensorrt", "ort-cuda", "ort-cpu"):
        try:
            engine, file = _open(bundle, name, threads, device_id, cuda_graph, precision)
        except EngineError as e:
            skipped.append(f"{name}: {e}")
            continue
        why = f" because {'; '.join(skipped)}" if skipped else " (fastest available)"
        return engine, f"auto: picked {name} ({file}{_threads(name, threads)}){why}"
    raise EngineError("no backend can run: " + "; ".join(skipped))


def _threads(backend: str, threads: int | None) -> str:
    return f", threads={threads}" if backend == "ort-cpu" and threads else ""
