"""The `Engine` interface: named numpy tensors in, named numpy tensors out.

Every backend (ONNX Runtime CPU/CUDA/TensorRT providers, native TensorRT) describes its inputs and
outputs with `TensorInfo` and runs with `run(feeds) -> outputs`. Engines are context managers:
`with OrtEngine(path) as e: e.run({"pixels": x})`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class EngineError(RuntimeError):
    """An engine that cannot be created or run; the message says why, in one line."""


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output."""

    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64", ...
    shape: tuple[int | str | None, ...]  # an int for a fixed dim; a str (axis name) or None if dynamic

    @property
    def fixed_dims(self) -> dict[int, int]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, int) and d >= 0}


class Engine:
    """Base class: subclasses set `backend`, `inputs`, `outputs` and implement `_run`."""

    backend: str = "engine"
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    max_batch: int | None = None  # the largest batch the engine accepts (None: unbounded)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. `feeds` maps every input name to an array of its dtype and rank."""
        return self._run(self.check_feeds(feeds))

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = {i.name for i in self.inputs}
        missing = names - set(feeds)
        extra = set(feeds) - names
        if missing or extra:
            raise EngineError(f"{self.backend}: inputs must be {sorted(names)}, got {sorted(feeds)}")
        out = {}
        for info in self.inputs:
            arr = np.asarray(feeds[info.name])
            if arr.ndim != len(info.shape):
                raise EngineError(f"{self.backend}: input {info.name!r} must have rank {len(info.shape)} "
                                  f"{list(info.shape)}, got shape {list(arr.shape)}")
            for axis, dim in info.fixed_dims.items():
                if arr.shape[axis] != dim:
                    raise EngineError(f"{self.backend}: input {info.name!r} must have shape {list(info.shape)}, "
                                      f"got {list(arr.shape)}")
            if arr.dtype != np.dtype(info.dtype):
                arr = arr.astype(info.dtype)
            out[info.name] = np.ascontiguousarray(arr)
        return out

    def close(self) -> None:
        """Release the engine's resources (safe to call twice)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        ins = ", ".join(f"{i.name} {i.dtype}{list(i.shape)}" for i in self.inputs)
        outs = ", ".join(f"{o.name} {o.dtype}{list(o.shape)}" for o in self.outputs)
        return f"{self.backend}: ({ins}) -> ({outs})"
