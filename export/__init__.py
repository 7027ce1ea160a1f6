"""Checkpoint -> bundle: split, ONNX, verification, FP16, TensorRT build (torch, onnx).

`qks.export.bundle.export_bundle(ckpt, out, ...)` is the API; `qks-export` (`qks.export.cli:main`)
the command. Both are also importable from here (lazily: importing `qks.export` loads no torch).
"""

from __future__ import annotations

__all__ = ["ExportError", "export_bundle"]


def __getattr__(name: str):
    if name == "export_bundle":
        from .bundle import export_bundle

        return export_bundle
    if name == "ExportError":
        from .errors import ExportError

        return ExportError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
