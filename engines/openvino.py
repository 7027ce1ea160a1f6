"""OpenVINO on the CPU: an ONNX (or OpenVINO IR) graph compiled at first use, the compiled model cached.

Compiling a ViT-B-16 graph takes seconds; a compiled model is tied to the graph, the OpenVINO
version, the CPU it was compiled for and the precision it runs in. So the compiled blob is cached
in the first writable folder of `cache_dirs` (the runtime passes `<bundle>/cache/openvino`, then
the user cache), named by the graph file and precision, with a JSON sidecar holding its key:
graph sha256, OpenVINO version, CPU model + ISA flags, precision, threads. A blob whose sidecar
does not match this machine and graph is stale: it is refused and rebuilt (and overwritten), never
imported. A blob that fails to import is rebuilt too.

`precision`: "f32" (OpenVINO's default on a CPU with AVX512-BF16 or AMX is bf16: f32 is asked for
explicitly) or "bf16" (`INFERENCE_PRECISION_HINT`). INT8 comes from the graph itself (an NNCF- or
QDQ-quantized model). `openvino` is imported here, lazily: `pip install 'qks[openvino]'`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from .base import Engine, EngineError, TensorInfo

EXTRA = "pip install 'qks[openvino]'"
PRECISION_HINTS = {"fp32": "f32", "f32": "f32", "bf16": "bf16"}
_OV_TYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "i64": "int64", "i32": "int32", "i8": "int8",
             "u8": "uint8", "boolean": "bool"}


def import_openvino():
    try:
        import openvino
    except Exception:  # ImportError, or its native library failing to load
        raise EngineError(f"the OpenVINO backend needs openvino: {EXTRA}") from None
    return openvino


def openvino_version() -> str:
    return import_openvino().__version__.split("-")[0]


def cpu_identity() -> str:
    """CPU model name and a digest of its ISA flags: a compiled model is specific to both."""
    model, flags = "unknown", ""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        model = m.group(1).strip() if m else model
        flags = " ".join(sorted(f.group(1).split())) if f else ""
    except OSError:
        pass
    return f"{model} [{hashlib.sha256(flags.encode()).hexdigest()[:12]}]"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _info(port) -> TensorInfo:
    dtype = _OV_TYPES.get(port.get_element_type().get_type_name())
    if dtype is None:
        raise EngineError(f"openvino: tensor {port.get_any_name()!r} has unsupported type {port.get_element_type()}")
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorInfo(port.get_any_name(), dtype, shape)


class OpenVinoEngine(Engine):
    """A graph compiled by OpenVINO for this CPU (see the module docstring).

    graph_sha256: the graph's digest when the caller knows it (the bundle manifest), else computed.
    cache_dirs: folders to read / write the compiled blob, first writable one wins; [] = no cache.
    `cache_status` says what happened: "hit", "miss", "stale (<why>)", "unreadable", "off".
    """

    backend = "openvino"

    def __init__(self, path: str | Path, *, precision: str = "fp32", threads: int | None = None,
                 cache_dirs: list[str | Path] | None = None, graph_sha256: str | None = None):
        ov = import_openvino()
        self.path = Path(path)
        if precision not in PRECISION_HINTS:
            raise EngineError(f"openvino: unknown precision {precision!r} (one of fp32, bf16)")
        if not self.path.is_file():
            raise EngineError(f"openvino: no graph file {self.path}")
        self.hint = PRECISION_HINTS[precision]
        self.threads = int(threads) if threads else None
        self.core = ov.Core()
        self.config = {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            self.config["INFERENCE_NUM_THREADS"] = self.threads
        self.key = {"graph": self.path.name, "graph_sha256": graph_sha256 or sha256_file(self.path),
                    "openvino": openvino_version(), "cpu": cpu_identity(), "precision": self.hint,
                    "threads": self.threads}
        self.cache_status = "off"
        self.cache_file: Path | None = None
        self.compiled = self._load(list(cache_dirs or []))
        self.request = self.compiled.create_infer_request()
        self.inputs = [_info(p) for p in self.compiled.inputs]
        self.outputs = [_info(p) for p in self.compiled.outputs]

    # -- compile / cache ---------------------------------------------------------------------------

    def _compile(self):
        try:
            return self.core.compile_model(str(self.path), "CPU", self.config)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EngineError(f"openvino: cannot compile {self.path.name}: {first[:300]}") from None

    def _blob_name(self) -> str:
        return f"{self.path.stem}.{self.hint}{f'.t{self.threads}' if self.threads else ''}.ovblob"

    def _load(self, cache_dirs: list):
        for d in cache_dirs:
            blob = Path(d) / self._blob_name()
            if not blob.is_file():
                continue
            why = self._stale(blob)
            if why:
                self.cache_status = f"stale ({why})"
                break  # rebuilt below, over the stale blob
            try:
                compiled = self.core.import_model(io.BytesIO(blob.read_bytes()), "CPU", self.config)
            except Exception:
                self.cache_status = "unreadable"
                break
            self.cache_status, self.cache_file = "hit", blob
            return compiled
        compiled = self._compile()
        if cache_dirs:
            self.cache_status = "miss" if self.cache_status == "off" else self.cache_status
            self.cache_file = self._save(compiled, cache_dirs)
        return compiled

    def _stale(self, blob: Path) -> str | None:
        try:
            meta = json.loads(blob.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "no readable sidecar"
        diff = [k for k, v in self.key.items() if meta.get(k) != v]
        return f"{', '.join(diff)} differ" if diff else None

    def _save(self, compiled, cache_dirs: list) -> Path | None:
        """Write blob + sidecar atomically into the first writable folder; None if none is."""
        data = compiled.export_model().getbuffer()
        for d in cache_dirs:
            d, tmp = Path(d), None
            try:
                d.mkdir(parents=True, exist_ok=True)
                blob = d / self._blob_name()
                fd, tmp = tempfile.mkstemp(dir=d, prefix=".ov-", suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, 0o644)
                os.replace(tmp, blob)  # the blob first: a new blob beside an old sidecar is refused as stale
                blob.with_suffix(".json").write_text(json.dumps(self.key, indent=1) + "\n", encoding="utf-8")
                return blob
            except OSError:
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)
        return None

    # -- run ---------------------------------------------------------------------------------------

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.request is None:
            raise EngineError("openvino: engine is closed")
        try:
            results = self.request.infer(feeds)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EngineError(f"openvino: run failed: {first[:300]}") from None
        out = {}
        for port, value in results.items():
            out[port.get_any_name()] = np.array(value, copy=True)
        return out

    def close(self) -> None:
        self.request = None
        self.compiled = None
