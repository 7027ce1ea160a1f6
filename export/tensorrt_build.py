"""TensorRT engines from a bundle's ONNX graphs, with NVIDIA TensorRT 10/11 or TensorRT for RTX.

Both expose the same Python API (`Builder`, `OnnxParser`, `IBuilderConfig`, ...); the module is
`tensorrt` for TensorRT and `tensorrt_rtx` (wheel bindings: `tensorrt_rtx_bindings`) for
TensorRT for RTX. Set `QKS_TENSORRT_MODULE` to force one.

- Networks are built STRONGLY_TYPED: precision comes from the graph's own types, so the FP16 engine
  is built from `image_encoder.fp16.onnx` (FP16 inside, LayerNorm/Softmax/reductions FP32), and no
  FP16 builder flag is needed (TensorRT 11 has none; TensorRT for RTX never had one). For fp32
  graphs TF32 is turned off, so the fp32 engine keeps fp32 parity.
- One optimisation profile: batch min 1, opt `min(8, max_batch)`, max `max_batch`.
- A timing cache (`engines/timing.cache`) is loaded when present and saved after every build
  (TensorRT only: TensorRT for RTX has none, its timing-cache calls are no-ops).
- A plan is named `<graph>-<graph sha256[:12]>-<trt tag><version>-sm<major><minor>.plan`, the trt tag
  being `trt` (TensorRT) or `trtrtx` (TensorRT for RTX: its plans are not TensorRT plans), with a
  JSON sidecar `<same>.json`: graph, graph_sha256, trt_module, trt_version, sm, gpu_name,
  precision, profile, inputs, outputs, built.
- TensorRT targets the GPU it runs on (one is needed). TensorRT for RTX builds ahead of time on
  the CPU: without a GPU it targets `compute_capability` (default SM86), with one the GPU's own.
  TensorRT for RTX plans do not run on data-centre GPUs such as H100/H200 (SM90).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
from pathlib import Path

from .errors import ExportError

MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")
DEFAULT_RTX_SM = "86"  # TensorRT for RTX without a GPU: an Ampere RTX target
OPT_BATCH = 8
WORKSPACE = 2 << 30
TIMING_CACHE = "engines/timing.cache"

_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
           "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8", "INT4": "int4"}


def import_tensorrt(module: str | None = None):
    """The TensorRT module to build with, or ExportError with a one-line install hint."""
    names = [module or os.environ.get("QKS_TENSORRT_MODULE")] if (module or os.environ.get("QKS_TENSORRT_MODULE")) \
        else list(MODULES)
    errors = []
    for name in names:
        try:
            return importlib.import_module(name)
        except Exception as e:  # ImportError, or a library that fails to load
            errors.append(f"{name}: {type(e).__name__}")
    raise ExportError("--tensorrt needs NVIDIA TensorRT (pip install 'qks[tensorrt]') or TensorRT for RTX "
                      "(pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings); not importable: "
                      + ", ".join(errors))


def is_rtx(trt) -> bool:
    return "rtx" in trt.__name__ or hasattr(trt, "ComputeCapability")


def trt_tag(trt) -> str:
    return "trtrtx" if is_rtx(trt) else "trt"


def engine_stem(graph: str, graph_sha256: str, trt, sm: str) -> str:
    return f"{graph}-{graph_sha256[:12]}-{trt_tag(trt)}{trt.__version__}-sm{sm}"


def gpu_info() -> tuple[str, str] | None:
    """(sm "<major><minor>", name) of CUDA device 0 through cuda-python (else nvidia-smi), or None
    without a usable GPU."""
    info = _gpu_info_cuda_python()
    return info if info is not None else _gpu_info_nvidia_smi()


def _gpu_info_nvidia_smi() -> tuple[str, str] | None:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap,name", "--format=csv,noheader", "--id=0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        cap, name = (part.strip() for part in out.splitlines()[0].split(",", 1))
        major, minor = cap.split(".")
        return f"{int(major)}{int(minor)}", name
    except Exception:
        return None


def _gpu_info_cuda_python() -> tuple[str, str] | None:
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            return None
        err, prop = cudart.cudaGetDeviceProperties(0)
        if int(err) != 0:
            return None
        name = prop.name.decode(errors="replace").rstrip("\0") if isinstance(prop.name, bytes) else str(prop.name)
        return f"{prop.major}{prop.minor}", name
    except Exception:
        return None


def _logger(trt):
    """A logger that keeps TensorRT's messages instead of printing them: without a GPU, TensorRT for
    RTX logs CUDA errors that do not affect an ahead-of-time build. They are reported only when a
    build fails (the first error becomes the one-line message)."""

    class _Captured(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append((str(severity).split(".")[-1], msg))

        def first_error(self) -> str:
            for sev, msg in self.messages:
                if sev in ("ERROR", "INTERNAL_ERROR") and "Cuda Runtime" not in msg:
                    return msg.strip().splitlines()[0]
            return self.messages[-1][1].strip().splitlines()[0] if self.messages else "no message"

    return _Captured()


def _dtype(trt, dt) -> str:
    return _DTYPES.get(str(dt).split(".")[-1], str(dt).split(".")[-1].lower())


def _target(trt, config, compute_capability: str | None) -> tuple[str, str]:
    """Point the builder at a GPU; returns (sm, gpu name) for the plan's name and sidecar."""
    gpu = gpu_info()
    if not is_rtx(trt):
        if gpu is None:
            raise ExportError("TensorRT needs an NVIDIA GPU (and driver) to build engines; none was found. "
                              "TensorRT for RTX can build ahead of time on a CPU")
        if compute_capability and compute_capability != gpu[0]:
            raise ExportError(f"TensorRT builds for the GPU it runs on (SM{gpu[0]}), not SM{compute_capability}")
        return gpu
    cc = trt.ComputeCapability
    if compute_capability is None and gpu is not None:
        config.num_compute_capabilities = 1
        config.set_compute_capability(cc.CURRENT, 0)
        return gpu
    sm = compute_capability or DEFAULT_RTX_SM
    member = getattr(cc, f"SM{sm}", None)
    if member is None:
        known = ", ".join(m[2:] for m in cc.__members__ if m.startswith("SM"))
        raise ExportError(f"TensorRT for RTX {trt.__version__} cannot target SM{sm} (it targets {known})")
    config.num_compute_capabilities = 1
    config.set_compute_capability(member, 0)
    return sm, f"ahead-of-time for SM{sm} (no GPU used)" if gpu is None else gpu[1]


def _parse(trt, builder, logger, onnx_path: Path):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    # TensorRT for RTX 1.7 "parses" a file that is not ONNX at all into an empty network
    if not ok or parser.num_errors or network.num_outputs == 0:
        errs = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errs[0].desc() if errs else "no graph outputs (not an ONNX model?)"
        node = f" (node {errs[0].node_name()!r})" if errs and hasattr(errs[0], "node_name") and errs[0].node_name() else ""
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {first}{node}")
    return network, parser


def network_io(trt, network) -> tuple[list[dict], list[dict]]:
    """The parsed network's inputs and outputs: name, dtype, shape (-1 = dynamic)."""
    ins = [network.get_input(i) for i in range(network.num_inputs)]
    outs = [network.get_output(i) for i in range(network.num_outputs)]
    rec = lambda t: {"name": t.name, "dtype": _dtype(trt, t.dtype), "shape": list(t.shape)}  # noqa: E731
    return [rec(t) for t in ins], [rec(t) for t in outs]


def engine_io(trt, plan: bytes, logger=None) -> dict | None:
    """I/O and profile read back from a deserialized plan, or None where this machine cannot
    deserialize it (TensorRT for RTX without a GPU)."""
    if gpu_info() is None:  # deserializing needs a CUDA device (and logs errors without one)
        return None
    logger = logger or _logger(trt)
    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
    except Exception:
        return None
    if engine is None:
        return None
    inputs, outputs, profile = [], [], {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        rec = {"name": name, "dtype": _dtype(trt, engine.get_tensor_dtype(name)),
               "shape": list(engine.get_tensor_shape(name))}
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            inputs.append(rec)
            lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
            profile[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        else:
            outputs.append(rec)
    return {"inputs": inputs, "outputs": outputs, "profile": profile}


def build_engine(onnx_path: str | Path, out_dir: str | Path, graph: str, graph_sha256: str, precision: str,
                 max_batch: int = 32, opt_batch: int | None = None, compute_capability: str | None = None,
                 timing_cache: str | Path | None = None, module: str | None = None, log=None) -> dict:
    """Build one plan from an ONNX file; returns its sidecar dict (also written next to the plan)."""
    trt = import_tensorrt(module)
    log = log or (lambda msg: None)
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = _logger(trt)
    try:
        builder = trt.Builder(logger)
    except Exception as e:
        builder = None
        logger.messages.append(("ERROR", str(e)))
    if builder is None:
        raise ExportError(f"{trt.__name__}: cannot create a TensorRT builder (no usable GPU or driver?): "
                          f"{logger.first_error()}")
    network, parser = _parse(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    sm, gpu_name = _target(trt, config, compute_capability)

    opt_batch = min(opt_batch or OPT_BATCH, max_batch)
    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = list(t.shape)
        if any(d < 0 for d in dims[1:]):
            raise ExportError(f"{onnx_path.name}: input {t.name!r} has dynamic axes other than the batch: {dims}")
        lo, opt, hi = ([b, *dims[1:]] for b in (1, opt_batch, max_batch))
        profile.set_shape(t.name, lo, opt, hi)
        shapes[t.name] = {"min": lo, "opt": opt, "max": hi}
    config.add_optimization_profile(profile)

    # TensorRT for RTX has no timing cache (its timing-cache calls are deprecated no-ops since 1.2:
    # it compiles kernels just in time, with a runtime cache on the deploying machine instead).
    cache_path = Path(timing_cache) if timing_cache and not is_rtx(trt) else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=True)

    log(f"building {graph} ({precision}) with {trt.__name__} {trt.__version__} for SM{sm}")
    started = _dt.datetime.now(_dt.timezone.utc)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{trt.__name__} could not build an engine from {onnx_path.name}: {logger.first_error()}")
    plan = bytes(plan)
    stem = engine_stem(graph, graph_sha256, trt, sm)
    plan_path = out_dir / f"{stem}.plan"
    _atomic_write(plan_path, plan)
    if cache_path is not None:
        _atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))

    inputs, outputs = network_io(trt, network)
    readback = engine_io(trt, plan, logger)
    sidecar = {
        "graph": graph, "graph_sha256": graph_sha256, "trt_module": trt.__name__, "trt_version": trt.__version__,
        "trt_flavor": "tensorrt_rtx" if is_rtx(trt) else "tensorrt",
        "sm": sm, "gpu_name": gpu_name, "precision": precision, "profile": shapes,
        "inputs": readback["inputs"] if readback else inputs,
        "outputs": readback["outputs"] if readback else outputs,
        "io_source": "deserialized engine" if readback else "parsed network (plan not deserializable here)",
        "built": started.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "strongly_typed": True,
        "timing_cache": TIMING_CACHE if cache_path is not None else None,
    }
    if readback and readback["profile"] != shapes:
        raise ExportError(f"{plan_path.name}: the engine's profile {readback['profile']} is not the one requested {shapes}")
    _atomic_write(out_dir / f"{stem}.json", (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
    return sidecar


def build_engines(bundle_dir: str | Path, graphs: dict[str, dict], max_batch: int = 32,
                  compute_capability: str | None = None, module: str | None = None, log=None) -> list[dict]:
    """Build a plan for each manifest graph record in `graphs` (name -> record with file, sha256,
    precision); returns the manifest's `engines` entries (paths relative to the bundle)."""
    d = Path(bundle_dir)
    entries = []
    for name, rec in graphs.items():
        side = build_engine(d / rec["file"], d / "engines", name, rec["sha256"], rec["precision"],
                            max_batch=max_batch, compute_capability=compute_capability,
                            timing_cache=d / TIMING_CACHE, module=module, log=log)
        _check_against_graph(name, rec, side)
        stem = engine_stem(name, rec["sha256"], import_tensorrt(side["trt_module"]), side["sm"])
        entries.append({"file": f"engines/{stem}.plan", "sidecar": f"engines/{stem}.json", **side})
    return entries


def _check_against_graph(name: str, rec: dict, side: dict) -> None:
    """The engine's I/O names and dtypes are the graph's (the runtime binds by the manifest's names)."""
    for kind in ("inputs", "outputs"):
        want = [(t["name"], t["dtype"]) for t in rec[kind]]
        got = [(t["name"], t["dtype"]) for t in side[kind]]
        if sorted(want) != sorted(got):
            raise ExportError(f"TensorRT engine for {name}: {kind} {got} differ from the graph's {want}")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
