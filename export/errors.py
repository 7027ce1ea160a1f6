"""The one exception the exporter raises for anything a user can fix: its message is one line."""

from __future__ import annotations


class ExportError(Exception):
    """An export that cannot go on; `str(e)` says why in one line (the CLI prints only that)."""


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def write_checked_onnx(model, path, what: str):
    """Write an ONNX model atomically (temp file + rename), then run the full ONNX checker on it;
    ExportError naming `what` if the written model is not valid."""
    import onnx

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"{what} is not a valid ONNX model: {one_line(e)}") from e
    return path
