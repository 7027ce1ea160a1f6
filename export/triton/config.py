"""config.pbtxt: Triton's model configurations as dicts (image, scoring, ensemble, Python-backend model)
and their protobuf text form."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .common import IMAGE_QUEUE_DELAY_US, LABELS_FILE, LOGITS, PROBS, SELECTED, TritonError

if TYPE_CHECKING:
    from .image_model import ImageModel

ENSEMBLE_INPUT = "pixels"
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                 "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
                 "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


class _Enum(str):
    """An enum value in protobuf text format (written unquoted)."""


def _scalar(v) -> str:
    if isinstance(v, _Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def pbtxt(obj: dict, indent: int = 0) -> str:
    pad = "  " * indent
    out = []
    for key, v in obj.items():
        if isinstance(v, dict):
            inner = pbtxt(v, indent + 1)
            out.append(f"{pad}{key} {{\n{inner}{pad}}}\n" if inner else f"{pad}{key} {{ }}\n")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            items = [f"{pad}  {{\n{pbtxt(x, indent + 2)}{pad}  }}" for x in v]
            out.append(f"{pad}{key} [\n" + ",\n".join(items) + f"\n{pad}]\n")
        elif isinstance(v, list):
            out.append(f"{pad}{key}: [ {', '.join(_scalar(x) for x in v)} ]\n")
        else:
            out.append(f"{pad}{key}: {_scalar(v)}\n")
    return "".join(out)


def triton_dims(shape: list, what: str) -> list[int]:
    """A recorded shape without its batch dimension, as Triton dims (-1 for a named/dynamic axis)."""
    if not isinstance(shape, list) or not shape:
        raise TritonError(f"{what}: no recorded shape")
    if isinstance(shape[0], int) and shape[0] > 0:
        raise TritonError(f"{what} has a fixed batch dimension {shape[0]}; Triton's batching needs a dynamic one "
                          "(re-export the bundle)")
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape[1:]]


def triton_dtype(dtype: str, what: str) -> str:
    if dtype not in TRITON_DTYPES:
        raise TritonError(f"{what}: data type {dtype!r} has no Triton equivalent")
    return TRITON_DTYPES[dtype]


def tensor(t: dict, what: str, dims: list[int] | None = None, **extra) -> dict:
    return {"name": t["name"], "data_type": _Enum(triton_dtype(t["dtype"], what)),
            "dims": dims if dims is not None else triton_dims(t["shape"], what), **extra}


def image_config(name: str, image: ImageModel) -> dict:
    cfg = {"name": name, "platform": image.platform, "max_batch_size": image.max_batch,
           "input": [tensor(t, f"image model input {t['name']!r}") for t in image.inputs],
           "output": [tensor(t, f"image model output {t['name']!r}") for t in image.outputs],
           "dynamic_batching": {"max_queue_delay_microseconds": IMAGE_QUEUE_DELAY_US}}
    if image.kind == "plan":
        cfg["instance_group"] = [{"kind": _Enum("KIND_GPU"), "count": 1}]
    elif image.precision == "int8":  # the INT8 graph is the CPU fast path; its integer ops run on the CPU
        cfg["instance_group"] = [{"kind": _Enum("KIND_CPU"), "count": 1}]
    return cfg


def scoring_config(name: str, qf: dict, qf_dims: list[int], n_labels: int, max_batch: int) -> dict:
    return {"name": name, "platform": "onnxruntime_onnx", "max_batch_size": max_batch,
            "input": [tensor(qf, "query features", qf_dims)],
            "output": [{"name": PROBS, "data_type": _Enum("TYPE_FP32"), "dims": [n_labels],
                        "label_filename": LABELS_FILE},
                       {"name": LOGITS, "data_type": _Enum("TYPE_FP32"), "dims": [n_labels]},
                       {"name": SELECTED, "data_type": _Enum("TYPE_BOOL"), "dims": [n_labels]}],
            "dynamic_batching": {}}


def ensemble_config(name: str, image_name: str, scoring_name: str, image: ImageModel) -> dict:
    pix, qf = image.inputs[0], image.outputs[0]
    return {"name": name, "platform": "ensemble", "max_batch_size": image.max_batch,
            "input": [tensor({**pix, "name": ENSEMBLE_INPUT}, "ensemble input")],
            # dims -1: the label count lives in the scoring model only, so new labels leave this as it is
            "output": [{"name": PROBS, "data_type": _Enum("TYPE_FP32"), "dims": [-1]},
                       {"name": LOGITS, "data_type": _Enum("TYPE_FP32"), "dims": [-1]},
                       {"name": SELECTED, "data_type": _Enum("TYPE_BOOL"), "dims": [-1]}],
            "ensemble_scheduling": {"step": [
                {"model_name": image_name, "model_version": -1,
                 "input_map": [{"key": pix["name"], "value": ENSEMBLE_INPUT}],
                 "output_map": [{"key": qf["name"], "value": "query_features"}]},
                {"model_name": scoring_name, "model_version": -1,
                 "input_map": [{"key": "query_features", "value": "query_features"}],
                 "output_map": [{"key": PROBS, "value": PROBS}, {"key": LOGITS, "value": LOGITS},
                                {"key": SELECTED, "value": SELECTED}]},
            ]}}


def python_config(name: str, pixels: dict, n_labels: int, max_batch: int) -> dict:
    """The Python-backend model (`qks.serving.triton_model`): pixels or encoded images in, one of the
    two per request; probabilities (with the label file) and logits out; dynamic batching on the CPU."""
    from ...serving import triton_model as tm

    return {"name": name, "backend": "python", "max_batch_size": max_batch,
            "input": [tensor({**pixels, "name": tm.PIXELS}, "image model input", optional=True),
                      {"name": tm.IMAGE, "data_type": _Enum("TYPE_STRING"), "dims": [1], "optional": True}],
            "output": [{"name": PROBS, "data_type": _Enum("TYPE_FP32"), "dims": [n_labels],
                        "label_filename": LABELS_FILE},
                       {"name": LOGITS, "data_type": _Enum("TYPE_FP32"), "dims": [n_labels]},
                       {"name": SELECTED, "data_type": _Enum("TYPE_BOOL"), "dims": [n_labels]}],
            "dynamic_batching": {"max_queue_delay_microseconds": IMAGE_QUEUE_DELAY_US},
            "instance_group": [{"kind": _Enum("KIND_CPU"), "count": 1}],
            # ONNX Runtime's intra-op threads in the model; 0: its default (all cores)
            "parameters": {"key": "intra_op_threads", "value": {"string_value": "0"}}}


def write_config(folder: Path, cfg: dict, comment: str) -> None:
    text = "".join(f"# {line}\n" for line in comment.splitlines()) + pbtxt(cfg)
    (folder / "config.pbtxt").write_text(text, encoding="utf-8")
