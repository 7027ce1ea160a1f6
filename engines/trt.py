"""Native TensorRT (10.x/11.x) over a serialized plan, with device memory through cuda-python.

Name-based I/O (`num_io_tensors`, `get_tensor_name`, `set_input_shape`, `set_tensor_address`,
`execute_async_v3`); one CUDA stream; a pinned host buffer and a device buffer per tensor, sized
for the optimisation profile's largest shape; dynamic batch within the profile; optional CUDA
graph replay for one fixed input shape. `tensorrt` and `cuda-python` are imported here, lazily:
install them with `pip install 'qks[tensorrt]'`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .base import Engine, EngineError, TensorInfo
from .plan import check_compatible, read_sidecar

EXTRA = "pip install 'qks[tensorrt]'"


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise EngineError(f"the TensorRT backend needs cuda-python: {EXTRA}") from None
    return cudart


TRT_MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")  # NVIDIA TensorRT, TensorRT for RTX


def import_tensorrt(module: str | None = None):
    """The TensorRT Python module a plan was built with (its sidecar's trt_module), or the first
    importable one of TRT_MODULES."""
    import importlib

    if module is not None and module not in TRT_MODULES:
        raise EngineError(f"unknown TensorRT module {module!r} in the plan sidecar")
    for name in [module] if module else TRT_MODULES:
        try:
            return importlib.import_module(name)
        except Exception:  # ImportError, or a library that fails to load
            continue
    raise EngineError(f"TensorRT is not installed{f' ({module})' if module else ''}: {EXTRA}")


def _check(result, what: str):
    """cuda-python calls return (err, *values); raise on error, return the value(s)."""
    cudart = import_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        raise EngineError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def cuda_device(device_id: int = 0) -> dict:
    """{"name", "sm"} of a CUDA device, or EngineError saying why there is none."""
    cudart = import_cudart()
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as e:  # a missing driver library can raise instead of returning an error
        raise EngineError(f"no CUDA driver ({type(e).__name__})") from None
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        raise EngineError(f"no CUDA device ({name.decode() if isinstance(name, bytes) else name})")
    if count <= device_id:
        raise EngineError(f"no CUDA device {device_id} ({count} found)")
    props = _check(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name, "sm": f"{props.major}{props.minor}"}


class _Buffer:
    def __init__(self, nbytes: int):
        cudart = import_cudart()
        self.nbytes = max(int(nbytes), 1)
        self.device = _check(cudart.cudaMalloc(self.nbytes), "cudaMalloc")
        self.host_ptr = _check(cudart.cudaMallocHost(self.nbytes), "cudaMallocHost")
        self.host = np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(int(self.host_ptr)))

    def free(self):
        cudart = import_cudart()
        if self.device is not None:
            cudart.cudaFree(self.device)
            cudart.cudaFreeHost(self.host_ptr)
            self.device = None


class TrtEngine(Engine):
    """A TensorRT plan. `check_sidecar` refuses a plan built for another TensorRT or GPU SM.

    cuda_graph: capture the enqueue as a CUDA graph the first time a batch has this shape set and
    replay it while the input shapes stay the same (another shape runs normally; coming back to the
    captured shape does one normal enqueue before replaying again).
    """

    backend = "tensorrt"

    def __init__(self, plan: str | Path, *, device_id: int = 0, check_sidecar: bool = True,
                 cuda_graph: bool = False, sidecar: str | Path | None = None):
        self.plan = Path(plan)
        self._buffers: dict[str, _Buffer] = {}
        self._stream = None
        self._graph_exec = None
        meta = read_sidecar(self.plan, sidecar) if check_sidecar else {}
        trt = import_tensorrt(meta.get("trt_module"))
        cudart = import_cudart()
        dev = cuda_device(device_id)
        if check_sidecar:
            check_compatible(meta, trt.__version__, dev["sm"], trt_module=trt.__name__, plan_name=self.plan.name)
        _check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise EngineError(f"tensorrt: cannot deserialize {self.plan.name} (built for another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"tensorrt: cannot create an execution context for {self.plan.name}")
        self._stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.inputs, self.outputs = [], []
        self._profile: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            shape = tuple(self.engine.get_tensor_shape(name))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            info = TensorInfo(name, dtype.name, tuple(d if d >= 0 else None for d in shape))
            (self.inputs if is_input else self.outputs).append(info)
            if is_input:
                if any(d < 0 for d in shape):
                    lo, _opt, hi = self.engine.get_tensor_profile_shape(name, 0)
                    self._profile[name] = (tuple(lo), tuple(hi))
                else:
                    self._profile[name] = (shape, shape)
        self.max_batch = min((hi[0] for _lo, hi in self._profile.values()), default=None)
        # Set every input to its largest shape so output shapes (hence buffer sizes) are the largest.
        for name, (_lo, hi) in self._profile.items():
            if not self.context.set_input_shape(name, hi):
                raise EngineError(f"tensorrt: cannot set {name} to its profile maximum {list(hi)}")
        for info in self.inputs + self.outputs:
            shape = self._profile[info.name][1] if info.name in self._profile else tuple(self.context.get_tensor_shape(info.name))
            if any(d < 0 for d in shape):
                raise EngineError(f"tensorrt: output {info.name} has a data-dependent shape; not supported")
            buf = _Buffer(int(np.prod(shape)) * np.dtype(info.dtype).itemsize)
            self._buffers[info.name] = buf
            self.context.set_tensor_address(info.name, int(buf.device))
        self._cuda_graph = cuda_graph
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._graph_shapes = None
        self._fresh_shapes = True  # shapes changed since the last enqueue: enqueue normally once

    def _set_shapes(self, feeds):
        for name, arr in feeds.items():
            lo, hi = self._profile[name]
            if any(s < a or s > b for s, a, b in zip(arr.shape, lo, hi, strict=True)):
                raise EngineError(f"tensorrt: input {name} shape {list(arr.shape)} is outside the plan's profile "
                                  f"{list(lo)}..{list(hi)}")
            if self._shapes.get(name) != arr.shape:
                if not self.context.set_input_shape(name, arr.shape):
                    raise EngineError(f"tensorrt: set_input_shape({name}, {list(arr.shape)}) failed")
                self._shapes[name] = arr.shape
                self._fresh_shapes = True

    def _enqueue(self):
        cudart = import_cudart()
        key = tuple(sorted(self._shapes.items()))
        if self._cuda_graph and self._graph_exec is not None and key == self._graph_shapes and not self._fresh_shapes:
            _check(cudart.cudaGraphLaunch(self._graph_exec, self._stream), "cudaGraphLaunch")
            return
        if not self.context.execute_async_v3(int(self._stream)):
            raise EngineError("tensorrt: execute_async_v3 failed")
        self._fresh_shapes = False
        if self._cuda_graph and self._graph_exec is None:
            # Capture after a normal enqueue with these shapes (TensorRT's requirement).
            _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            _check(cudart.cudaStreamBeginCapture(
                self._stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture")
            ok = self.context.execute_async_v3(int(self._stream))
            graph = _check(cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
            if not ok:
                raise EngineError("tensorrt: execute_async_v3 failed during CUDA graph capture")
            self._graph_exec = _check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            _check(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
            self._graph_shapes = key

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = import_cudart()
        if self._stream is None:
            raise EngineError("tensorrt: engine is closed")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._set_shapes(feeds)
        for name, arr in feeds.items():
            buf = self._buffers[name]
            buf.host[:arr.nbytes] = arr.reshape(-1).view(np.uint8)
            _check(cudart.cudaMemcpyAsync(buf.device, buf.host_ptr, arr.nbytes, h2d, self._stream), "cudaMemcpyAsync")
        self._enqueue()
        shapes = {}
        for info in self.outputs:
            shape = tuple(self.context.get_tensor_shape(info.name))
            nbytes = int(np.prod(shape)) * np.dtype(info.dtype).itemsize
            buf = self._buffers[info.name]
            _check(cudart.cudaMemcpyAsync(buf.host_ptr, buf.device, nbytes, d2h, self._stream), "cudaMemcpyAsync")
            shapes[info.name] = (shape, nbytes)
        _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {name: self._buffers[name].host[:nbytes].view(np.dtype(info.dtype)).reshape(shape).copy()
                for info in self.outputs for name, (shape, nbytes) in [(info.name, shapes[info.name])]}

    def close(self) -> None:
        if self._stream is None:
            return
        cudart = import_cudart()
        _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        if self._graph_exec is not None:
            cudart.cudaGraphExecDestroy(self._graph_exec)
            self._graph_exec = None
        for buf in self._buffers.values():
            buf.free()
        self._buffers.clear()
        cudart.cudaStreamDestroy(self._stream)
        self._stream = None
        self.context = None
        self.engine = None


def tensorrt_version() -> str:
    return import_tensorrt().__version__
