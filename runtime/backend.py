"""Pick the engine for a bundle's image graph: `--backend auto|<a registered backend>`.

Backends are entries of one registry, `REGISTRY` (name -> `Backend`), in `auto`'s order: the CLI
choices (`BACKENDS`), `auto`'s order, `qks-bench`'s list and the Ray workers' selection all derive
from it. Adding an engine is one module under `engines/` plus one `register(Backend(...))` here.

`auto` tries each backend whose `auto` rule admits this machine, in registry order: TensorRT (a
compatible plan in the bundle, TensorRT + cuda-python, a CUDA device), then ONNX Runtime CUDA (the
provider must actually load in a created session), then ONNX Runtime CPU; it returns the first
that works with a one-line reason naming why each faster one was skipped. OpenVINO is registered
but not in `auto` on the CPUs measured so far: it was not faster than ONNX Runtime's INT8 graph at
parity (benchmarks/RESULTS.md, "CPU at the hardware's limit"); `--backend openvino` runs it. A
named backend that cannot run is an error (no silent fallback).

`--precision auto|fp32|fp16|int8|bf16` picks the image graph. ONNX Runtime: `auto` on the CPU is
the INT8 graph when the bundle has one (`qks-export --int8`; it passed its parity gate at export),
else fp32 (fp16 is slower than fp32 on CPUs); on CUDA fp16, else fp32 (the INT8 graph's integer
ops would run on the CPU there). OpenVINO: the fp32 ONNX graph, compiled in f32 (`auto`, `fp32`)
or bf16 (`bf16`). A named precision the backend or bundle lacks is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..engines.base import Engine, EngineError
from .bundle import Bundle

PRECISIONS = ("auto", "fp32", "fp16", "int8", "bf16")
FP16_ORT_OPTIONS = ["NchwcTransformer"]  # onnxruntime segfaulted on an fp16 graph without this
IMAGE_GRAPH_BY_PRECISION = {"fp32": "image_encoder", "fp16": "image_encoder_fp16", "int8": "image_encoder_int8"}
AUTO_ORDER = {"cpu": ("int8", "fp32", "fp16"), "cuda": ("fp16", "fp32", "int8")}


@dataclass(frozen=True)
class OpenOptions:
    threads: int | None = None
    device_id: int = 0
    cuda_graph: bool = False
    precision: str = "auto"


@dataclass(frozen=True)
class Backend:
    """One registered backend. `open(bundle, options) -> (engine, graph file)` raises EngineError.
    `auto() -> None` when `auto` may try it on this machine, else the reason it does not."""

    name: str
    device: str  # "cpu" or "gpu": where its image graph runs (new labels are encoded there too)
    precisions: tuple[str, ...]  # the --precision values it accepts ("auto" always)
    open: Callable[[Bundle, OpenOptions], tuple[Engine, str]]
    help: str
    auto: Callable[[], str | None] = lambda: None
    bench: bool = True  # in qks-bench's default list


REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    REGISTRY[backend.name] = backend
    return backend


# -- ONNX Runtime ---------------------------------------------------------------------------------


def _ort_graph(bundle: Bundle, provider: str, precision: str = "auto"):
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    if precision != "auto":
        name = IMAGE_GRAPH_BY_PRECISION.get(precision)
        if name is None:
            raise EngineError(f"ONNX Runtime has no {precision} image graph (--backend openvino runs bf16)")
        if name not in bundle.graphs:
            have = [p for p, g in IMAGE_GRAPH_BY_PRECISION.items() if g in bundle.graphs]
            hint = " (qks-export --int8)" if precision == "int8" else " (qks-export --fp16)" if precision == "fp16" else ""
            raise EngineError(f"the bundle has no {precision} image graph{hint}; it has: {', '.join(have)}")
        return bundle.graphs[name]
    for p in AUTO_ORDER["cpu" if provider == "cpu" else "cuda"]:
        if IMAGE_GRAPH_BY_PRECISION[p] in bundle.graphs:
            return bundle.graphs[IMAGE_GRAPH_BY_PRECISION[p]]
    raise EngineError("bundle has no image encoder graph")


def _open_ort(bundle: Bundle, provider: str, o: OpenOptions):
    from ..engines.ort import OrtEngine

    graph = _ort_graph(bundle, provider, o.precision)
    disabled = FP16_ORT_OPTIONS if graph.precision == "fp16" or graph.name.endswith("fp16") else None
    engine = OrtEngine(graph.path, provider, intra_op_threads=o.threads, disabled_optimizers=disabled,
                       device_id=o.device_id)
    engine.precision = graph.precision
    engine.graph_name = graph.name
    return engine, graph.file


def _open_ort_cuda(bundle: Bundle, o: OpenOptions):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise EngineError("this onnxruntime has no CUDAExecutionProvider (pip install 'qks[gpu]')")
    return _open_ort(bundle, "cuda", o)


# -- TensorRT -------------------------------------------------------------------------------------


def _open_trt(bundle: Bundle, o: OpenOptions):
    from ..engines.trt import TrtEngine, cuda_device, import_cudart, import_tensorrt

    if o.precision not in ("auto", "fp16", "fp32"):
        raise EngineError(f"TensorRT plans are built from the fp32/fp16 graphs, not {o.precision}")
    plans = [e for e in bundle.engines if e.get("graph", "").startswith("image_encoder")]
    if not plans:
        raise EngineError("the bundle has no TensorRT plan for the image encoder (qks-export --tensorrt)")
    import_tensorrt()
    import_cudart()
    cuda_device(o.device_id)
    errors = []
    # fp16 plans first: faster on every GPU TensorRT supports
    for rec in sorted(plans, key=lambda r: 0 if "fp16" in (r.get("precision", "") + r.get("graph", "")) else 1):
        try:
            sidecar = bundle.file(rec["sidecar"]) if rec.get("sidecar") else None
            return TrtEngine(rec["path"], device_id=o.device_id, cuda_graph=o.cuda_graph, sidecar=sidecar), rec["file"]
        except EngineError as e:
            errors.append(str(e))
    raise EngineError("; ".join(errors))


# -- OpenVINO -------------------------------------------------------------------------------------


def openvino_cache_dirs(bundle: Bundle) -> list:
    """Compiled OpenVINO models: beside the bundle when it is writable, else in the user cache."""
    from .labels import user_cache_dir

    return [bundle.root / "cache" / "openvino", user_cache_dir() / "openvino" / bundle.graphs["image_encoder"].sha256[:16]]


def _open_openvino(bundle: Bundle, o: OpenOptions):
    from ..engines.openvino import OpenVinoEngine

    if o.precision not in ("auto", "fp32", "bf16"):
        raise EngineError(f"OpenVINO runs the fp32 graph in fp32 or bf16, not {o.precision}")
    graph = bundle.graphs.get("image_encoder")
    if graph is None:
        raise EngineError("the bundle has no fp32 image_encoder graph")
    precision = "bf16" if o.precision == "bf16" else "fp32"
    engine = OpenVinoEngine(graph.path, precision=precision, threads=o.threads, cache_dirs=openvino_cache_dirs(bundle),
                            graph_sha256=graph.sha256)
    engine.precision = precision
    engine.graph_name = f"{graph.name} (OpenVINO {precision})"
    return engine, f"{graph.file}, compiled model: {engine.cache_status}"


def _openvino_auto() -> str | None:
    # Measured on AMD Zen 4 (2026-12-04): OpenVINO f32 and bf16 slower than ONNX Runtime's fused
    # INT8 graph, and its bf16 and NNCF INT8 below the parity gate (benchmarks/RESULTS.md).
    return "not faster than ort-cpu's INT8 graph at parity on the CPUs measured (--backend openvino runs it)"


register(Backend("tensorrt", "gpu", ("fp16", "fp32"), lambda b, o: _open_trt(b, o),
                 "TensorRT plans built by qks-export --tensorrt (NVIDIA GPU)"))
register(Backend("ort-cuda", "gpu", ("fp32", "fp16", "int8"), lambda b, o: _open_ort_cuda(b, o),
                 "ONNX Runtime CUDA (pip install 'qks[gpu]')"))
register(Backend("openvino", "cpu", ("fp32", "bf16"), lambda b, o: _open_openvino(b, o),
                 "OpenVINO on the CPU, compiled model cached (pip install 'qks[openvino]')", auto=_openvino_auto))
register(Backend("ort-cpu", "cpu", ("fp32", "fp16", "int8"), lambda b, o: _open_ort(b, "cpu", o),
                 "ONNX Runtime CPU (the embedded default)"))

BACKENDS = ("auto", *REGISTRY)


def label_device(engine: Engine) -> str:
    """Where new labels are encoded for this engine: "cpu" or "cuda"."""
    spec = REGISTRY.get(getattr(engine, "backend", ""))
    return "cpu" if spec is None or spec.device == "cpu" else "cuda"


def check_precision(bundle: Bundle, backend: str, precision: str) -> None:
    """Without opening an engine: EngineError when `backend` (auto: any registered one) cannot run
    `precision` on this bundle's graphs (a cluster's workers may have what this machine lacks)."""
    if precision == "auto":
        return
    names = list(REGISTRY) if backend == "auto" else [backend]
    errors = []
    for name in names:
        spec = REGISTRY.get(name)
        if spec is None:
            raise EngineError(f"unknown backend {name!r} (one of {', '.join(BACKENDS)})")
        if precision not in spec.precisions:
            errors.append(f"{name} runs precision {', '.join(spec.precisions)}, not {precision}")
            continue
        if name.startswith("ort-"):
            try:
                _ort_graph(bundle, "cpu", precision)
            except EngineError as e:
                errors.append(str(e))
                continue
        return
    raise EngineError("; ".join(errors))


# -- selection ------------------------------------------------------------------------------------


def _open(bundle: Bundle, backend: str, o: OpenOptions):
    spec = REGISTRY.get(backend)
    if spec is None:
        raise EngineError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    if o.precision != "auto" and o.precision not in spec.precisions:
        raise EngineError(f"{backend} runs precision {', '.join(spec.precisions)}, not {o.precision}")
    return spec.open(bundle, o)


def select_backend(bundle: Bundle, backend: str = "auto", *, threads: int | None = None, device_id: int = 0,
                   cuda_graph: bool = False, precision: str = "auto") -> tuple[Engine, str]:
    """(engine for the image graph, one-line reason). EngineError if the named backend cannot run.
    `precision` picks the image graph (see the module docstring)."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    o = OpenOptions(threads, device_id, cuda_graph, precision)
    if backend != "auto":
        try:
            engine, file = _open(bundle, backend, o)
        except EngineError as e:
            raise EngineError(f"backend {backend} cannot run: {e}") from None
        return engine, f"{backend}: requested ({file}{_threads(backend, threads)})"
    skipped = []
    for name, spec in REGISTRY.items():
        why_not = spec.auto()
        if why_not:
            skipped.append(f"{name}: {why_not}")
            continue
        try:
            engine, file = _open(bundle, name, o)
        except EngineError as e:
            skipped.append(f"{name}: {e}")
            continue
        why = f" because {'; '.join(skipped)}" if skipped else " (fastest available)"
        return engine, f"auto: picked {name} ({file}{_threads(name, threads)}){why}"
    raise EngineError("no backend can run: " + "; ".join(skipped))


def _threads(backend: str, threads: int | None) -> str:
    return f", threads={threads}" if threads and REGISTRY[backend].device == "cpu" else ""
