"""FP16 graphs: float32 inputs and outputs, FP16 inside, numerically sensitive ops kept in FP32.

Converted with onnxconverter-common from the dynamo-exported fp32 graph (`keep_io_types=True`, so
callers feed and read float32 exactly as for the fp32 graph). Kept in FP32: LayerNormalization,
Softmax and every reduction (their accumulations overflow or lose precision in FP16), plus the
converter's own default block list. Casts are inserted at the block boundaries; a strongly typed
TensorRT network then follows these types exactly.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

from .errors import ExportError, one_line, write_checked_onnx

KEEP_FP32_OPS = [
    "LayerNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ArgMax",  # the text tower's end-of-text pooling
    "ArgMin",
    "CumSum",
    "Range",
    "Pow",  # a hand-written norm's x^2 overflows in FP16
    "Sqrt",
    "Reciprocal",
]


def convert_to_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp32 ONNX file -> FP16 ONNX file (float32 I/O). Raises ExportError on failure."""
    import onnx
    from onnxconverter_common import float16

    dst = Path(dst)
    model = onnx.load(str(src))
    block = sorted(set(KEEP_FP32_OPS) | set(float16.DEFAULT_OP_BLOCK_LIST))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            fp16 = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    except Exception as e:
        raise ExportError(f"FP16 conversion of {Path(src).name} failed: {one_line(e)}") from e
    return write_checked_onnx(fp16, dst, f"FP16 graph {dst.name}")


def fp16_summary(path: str | Path) -> dict:
    """How much of the graph runs in FP16: op counts by compute type (for the manifest)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    cast_to = {}
    for node in model.graph.node:
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to":
                    cast_to[a.i] = cast_to.get(a.i, 0) + 1
    fp16_inits = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    fp32_inits = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    return {"casts_to_fp16": cast_to.get(onnx.TensorProto.FLOAT16, 0),
            "casts_to_fp32": cast_to.get(onnx.TensorProto.FLOAT, 0),
            "fp16_initializers": fp16_inits, "fp32_initializers": fp32_inits,
            "kept_fp32_ops": KEEP_FP32_OPS}
