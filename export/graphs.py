"""The two deployed graphs as torch modules, and their export to ONNX.

- image encoder: `pixels` float32 [batch, 3, H, W] -> `query_features` float32 [batch, Nq, D]
  (`QKSModel.query_features`: the backbone's image tokens, then the head; Nq = queries x zero-shot
  features with the zero-shot term), and `embedding` float32 [batch, E] (`image_embedding`: the
  backbone's own pooled image embedding, L2-normalised: what similarity search and duplicates use);
- label encoder: `token_ids` int64 [batch, T] -> `text_features` float32 [batch, D]
  (the backbone's unnormalised `encode_text`).

Both go through the dynamo exporter (`torch.onnx.export(..., dynamo=True)`), traced at batch >= 2
with an explicit dynamic batch dimension: an example batch of 1 silently fixes the batch at 1.
Weights are embedded in the .onnx file (`external_data=False`; the exporter defaults to True),
which ONNX allows up to 2 GB; past that the export is refused with a clear message.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ExportError, one_line, write_checked_onnx
from .verify import EMBEDDING_OUTPUT

DEFAULT_OPSET = 18  # the dynamo exporter's native opset; >= 17 gives LayerNormalization as one op
MIN_OPSET = 17
TRACE_BATCH = 2
ONNX_PROTO_LIMIT = 2 * 1024**3  # protobuf's hard limit on one serialised message




def image_embedding(backbone, tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, C] tokens -> [B, E]: the backbone's zero-shot features (the tower's pooled, projected image
    embedding; for `lite`, its text-space vector at each location) averaged over their M vectors
    (M = 1 for open_clip towers), then L2-normalised, so a dot product is a cosine."""
    z = backbone.zero_shot_features(tokens)
    return F.normalize(z.mean(dim=1), dim=-1)


class ImageEncoder(nn.Module):
    """pixels -> (query features, embedding): `QKSModel.query_features` (the backbone's tokens, the
    head, and with the zero-shot term every pair of a head query and a weighted zero-shot feature) and
    `image_embedding` of the same tokens."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.image_tokens(pixels)
        return self.model.query_features_from_tokens(tokens), image_embedding(self.model.backbone, tokens)


class LabelEncoder(nn.Module):
    """token ids -> unnormalised text features (the backbone's `encode_text`)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_text(token_ids)


@dataclass
class TensorSpec:
    """One graph input or output as the manifest records it."""

    name: str
    dtype: str  # numpy-style name: "float32", "int64", ...
    shape: list  # ints and axis names ("batch")

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class GraphSpec:
    """What a graph is: its I/O (in order) and which axes are dynamic."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_axes: dict[str, dict[str, str]] = field(default_factory=dict)

    def io_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "dynamic_axes": self.dynamic_axes}


def image_encoder_spec(size: int, queries: int, embed_dim: int, embedding_dim: int) -> GraphSpec:
    return GraphSpec(
        inputs=[TensorSpec("pixels", "float32", ["batch", 3, size, size])],
        outputs=[TensorSpec("query_features", "float32", ["batch", queries, embed_dim]),
                 TensorSpec(EMBEDDING_OUTPUT, "float32", ["batch", embedding_dim])],
        dynamic_axes={"pixels": {"0": "batch"}, "query_features": {"0": "batch"}, EMBEDDING_OUTPUT: {"0": "batch"}},
    )


def label_encoder_spec(context_length: int, embed_dim: int) -> GraphSpec:
    return GraphSpec(
        inputs=[TensorSpec("token_ids", "int64", ["batch", context_length])],
        outputs=[TensorSpec("text_features", "float32", ["batch", embed_dim])],
        dynamic_axes={"token_ids": {"0": "batch"}, "text_features": {"0": "batch"}},
    )


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and warnings on stdout/stderr; keep them out of the CLI's output
    (a failure is reported by its exception's first line)."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        yield buf


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, spec: GraphSpec,
                opset: int = DEFAULT_OPSET) -> Path:
    """Export `module(example)` to `path` with the spec's names and a dynamic batch axis; check the
    result (onnx.checker, opset, batch axis symbolic, no external data)."""

    if opset < MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is too old: qks bundles need opset >= {MIN_OPSET}")
    if example.shape[0] < 2:
        raise ExportError("trace the graphs with batch >= 2 (batch 1 fixes the batch axis in the graph)")
    path = Path(path)
    module = module.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    in_name = spec.inputs[0].name
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(
                module, (example,), dynamo=True, input_names=[in_name],
                output_names=[t.name for t in spec.outputs], opset_version=opset,
                dynamic_shapes={_forward_arg(module): {0: batch}}, external_data=False, optimize=True,
            )
    except Exception as e:
        raise ExportError(f"ONNX export of {path.name} failed: {one_line(e)}") from e
    model = program.model_proto
    size = model.ByteSize()
    if size >= ONNX_PROTO_LIMIT:
        raise ExportError(f"{path.name} is {size / 2**30:.2f} GiB: over ONNX's 2 GB single-file limit; "
                          "external-data bundles are not supported by this qks")
    _check_graph(model, spec, opset, path.name)
    return write_checked_onnx(model, path, path.name)


def _forward_arg(module: nn.Module) -> str:
    import inspect

    params = [p for p in inspect.signature(module.forward).parameters if p != "self"]
    return params[0]


def _check_graph(model, spec: GraphSpec, opset: int, name: str) -> None:
    """The exported graph has exactly the contract's I/O names, a symbolic batch axis on each, the
    requested opset and all weights inline."""
    got_opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if got_opset < MIN_OPSET:
        raise ExportError(f"{name}: exported with opset {got_opset}, qks needs >= {MIN_OPSET}")
    for expected, actual in ((spec.inputs, model.graph.input), (spec.outputs, model.graph.output)):
        names = [v.name for v in actual]
        if names != [t.name for t in expected]:
            raise ExportError(f"{name}: graph I/O {names} does not match the contract {[t.name for t in expected]}")
        for v in actual:
            dims = v.type.tensor_type.shape.dim
            if not dims or dims[0].HasField("dim_value"):
                raise ExportError(f"{name}: the batch axis of {v.name!r} is not dynamic in the exported graph")
    for init in model.graph.initializer:
        if init.data_location == 1:  # onnx.TensorProto.EXTERNAL
            raise ExportError(f"{name}: weight {init.name!r} was written as external data")
