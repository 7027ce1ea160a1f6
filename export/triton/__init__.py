"""`qks-triton BUNDLE REPO`: a Triton Inference Server model repository from a bundle (no torch).

The default `--backend onnx` repository, for Triton's onnxruntime and tensorrt backends (NGC
containers), holds three models (NAME defaults to `qks`):

    REPO/
      qks-triton.json          what was written, from which bundle (Triton ignores files here)
      NAME_image/              pixels [B,3,H,W] -> query_features [B,Nq,D]
        config.pbtxt           platform onnxruntime_onnx (or tensorrt_plan), dynamic batching
        1/model.onnx           the bundle's image graph (+ its external data), or 1/model.plan
      NAME_scoring/            query_features [B,Nq,D] -> probabilities, logits [B,L], selected (BOOL
                               [B,L]: p >= the label's threshold, qks-calibrate's or 0.5)
        config.pbtxt           platform onnxruntime_onnx; probabilities carry label_filename
        labels.txt             the label names, one a line (Triton's classification extension)
        1/model.onnx           a small ONNX graph holding the label bank: MatMul, max (or top-k
                               sum) over the queries, Sigmoid -- what qks-infer computes
      NAME/                    platform ensemble: pixels -> probabilities (and logits, selected)
        config.pbtxt
        1/                     (empty: Triton needs a version folder)

`--backend python` writes one Python-backend model that runs the torch-free runtime
(`qks.serving.triton_model`) instead; see `python_repo`.

- Image model (`image_model`): `--image-model auto` takes a TensorRT plan from the bundle's
  `engines` when one was built by NVIDIA TensorRT for the GPU named by `--gpu-sm` (TensorRT for
  RTX plans do not load in Triton's tensorrt backend), else the fp32 ONNX graph for Triton's
  onnxruntime backend; `onnx`, `fp16`, `int8` and `plan` ask for one. A plan's `max_batch_size` is
  its optimisation profile's max batch (a profile whose min batch is not 1 is refused); otherwise
  `--max-batch` (default: the bundle's plan profile max if it has a plan, else 32). Tensor names,
  dtypes and dims are the graph's own (manifest or plan sidecar), with the batch dimension dropped.
- Scoring model (`scoring`): the label bank is `--labels FILE` (encoded with the bundle's label
  encoder exactly as qks-infer does, cached), `--bank NAME`, or the bundle's default bank. Nq and D
  come from the image graph's recorded output shape. The ensemble's outputs have dims [-1], so a
  new label list only rewrites NAME_scoring (`--labels-only`).
- Writes are whole or nothing (`common`): a new repository is built in a temporary folder beside
  REPO, validated, then renamed into place; `--labels-only` swaps only the model holding the labels.
  An existing REPO is replaced only if it is a qks-triton repository holding nothing else.
- `validate_repository(repo)` (and `--check REPO`, `validate`) parses every `config.pbtxt` with the
  `ModelConfig` protobuf that tritonclient ships and checks files, ONNX I/O and ensemble wiring.
  Without tritonclient (`pip install 'qks[triton]'`) writing still works and says the validation
  was skipped.

Modules, each importing only those before it: common -> config -> image_model, scoring ->
validate -> onnx_repo, python_repo -> cli. This file only re-exports their public names.
"""

from .cli import main, write_labels_only
from .common import (
                     DEFAULT_MAX_BATCH,
                     FORMAT,
                     LABELS_FILE,
                     LOGITS,
                     MARKER,
                     MARKER_VERSION,
                     PROBS,
                     TritonError,
                     TritonReport,
                     check_target,
                     copy_graph,
                     tritonclient_missing,
                     write_marker,
)
from .config import ensemble_config, image_config, python_config, scoring_config
from .image_model import IMAGE_MODELS, ImageModel, choose_image_model
from .onnx_repo import write_onnx_labels_only, write_repository
from .python_repo import choose_graph, write_python_labels_only, write_python_repository
from .scoring import scoring_model
from .validate import validate_repository

__all__ = ["DEFAULT_MAX_BATCH", "FORMAT", "IMAGE_MODELS", "LABELS_FILE", "LOGITS", "MARKER", "MARKER_VERSION", "PROBS",
           "ImageModel", "TritonError", "TritonReport", "check_target", "choose_graph", "choose_image_model",
           "copy_graph", "ensemble_config", "image_config", "main", "python_config", "scoring_config", "scoring_model",
           "tritonclient_missing", "validate_repository", "write_labels_only", "write_marker",
           "write_onnx_labels_only", "write_python_labels_only", "write_python_repository", "write_repository"]
