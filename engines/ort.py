"""ONNX Runtime engines: CPU, CUDA and TensorRT execution providers.

A requested GPU provider that cannot load (no driver, no CUDA libraries, the CPU-only wheel)
makes ONNX Runtime fall back to the CPU silently, and `onnxruntime-gpu` lists CUDA/TensorRT in
`get_available_providers()` even when they cannot load. So the provider actually in use is read
from the created session (`session.get_providers()`), and a fallback is an error here: the caller
asked for that provider and decides what to do.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .base import Engine, EngineError, TensorInfo

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

# ONNX element type strings -> numpy dtype names
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - onnxruntime is a core dependency
        raise EngineError("onnxruntime is not installed: pip install qks (or 'qks[gpu]' for CUDA)") from None
    return onnxruntime


def _info(arg) -> TensorInfo:
    if arg.type not in _ORT_TYPES:
        raise EngineError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) or d is None else str(d) for d in arg.shape)
    return TensorInfo(arg.name, _ORT_TYPES[arg.type], shape)


class OrtEngine(Engine):
    """An ONNX graph on one ONNX Runtime execution provider.

    provider: "cpu" | "cuda" | "tensorrt" (TensorRT provider, CUDA then CPU behind it for
    unsupported nodes). intra_op_threads / inter_op_threads: None = ONNX Runtime's default.
    disabled_optimizers: graph optimisers to turn off, e.g. ["NchwcTransformer"], which avoids an
    onnxruntime crash seen loading FP16 graphs (see ENVIRONMENT.md).
    """

    def __init__(self, path: str | Path, provider: str = "cpu", *, intra_op_threads: int | None = None,
                 inter_op_threads: int | None = None, disabled_optimizers: list[str] | None = None,
                 device_id: int = 0, provider_options: dict | None = None, log_severity: int = 3):
        ort = _import_ort()
        if provider not in PROVIDERS:
            raise EngineError(f"unknown onnxruntime provider {provider!r} (one of {', '.join(PROVIDERS)})")
        self.path = Path(path)
        self.provider = provider
        self.backend = f"ort-{provider}"
        opts = ort.SessionOptions()
        opts.log_severity_level = log_severity  # 3 = errors only: fallback warnings are reported by us
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads:
            opts.inter_op_num_threads = int(inter_op_threads)
        wanted = PROVIDERS[provider]
        if provider == "cpu":
            providers: list = ["CPUExecutionProvider"]
        else:
            options = {"device_id": device_id, **(provider_options or {})}
            providers = [(wanted, options)]
            if provider == "tensorrt":
                providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
            providers.append("CPUExecutionProvider")
        kwargs = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
        try:
            with warnings.catch_warnings():  # "provider not available" warnings: reported below instead
                warnings.simplefilter("ignore")
                self.session = ort.InferenceSession(str(self.path), opts, providers=providers, **kwargs)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EngineError(f"{self.backend}: cannot load {self.path.name}: {first}") from None
        active = self.session.get_providers()
        if not active or active[0] != wanted:
            self.session = None
            why = ("not in this onnxruntime build (pip install 'qks[gpu]')"
                   if wanted not in ort.get_available_providers() else "failed to load (no usable GPU/driver/CUDA libraries)")
            raise EngineError(f"{self.backend}: {wanted} {why}; session fell back to {active}")
        self.active_providers = active
        self.inputs = [_info(a) for a in self.session.get_inputs()]
        self.outputs = [_info(a) for a in self.session.get_outputs()]
        self._out_names = [o.name for o in self.outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            raise EngineError(f"{self.backend}: engine is closed")
        try:
            results = self.session.run(self._out_names, feeds)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EngineError(f"{self.backend}: run failed: {first}") from None
        return dict(zip(self._out_names, results, strict=True))

    def close(self) -> None:
        self.session = None
