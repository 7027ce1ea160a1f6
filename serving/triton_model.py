"""The qks model inside Triton's Python backend: the torch-free runtime behind one Triton model.

`qks-triton --backend python BUNDLE REPO` writes the model folder this module serves:

    REPO/NAME/
      config.pbtxt             backend "python", dynamic batching, inputs and outputs below
      labels.txt               the label names, one a line (also Triton's classification labels)
      1/model.py               `from qks.serving.triton_model import TritonPythonModel`
      1/qks-model.json         SPEC: the image graph, preprocessing, scoring, label bank (+ sha256s)
      1/<image graph>.onnx     the bundle's image graph (ONNX Runtime, CPU)
      1/labels.npy             the label bank, float32 [L, D]

Inputs (each request gives exactly one of them, batch first):
- `pixels` FP32 [B, 3, H, W]: preprocessed as `qks.runtime` does (`Bundle.preprocess`);
- `image` BYTES [B, 1]: encoded image files (JPEG, PNG, WebP, ...), decoded and preprocessed here
  exactly as `qks-infer` does, so clients need no preprocessing code.
Outputs: `probabilities` and `logits` FP32 [B, L] -- `qks-infer`'s numbers: the image graph, max
(or top-k sum) over the query tokens of the dot products with the bank, sigmoid; and `selected` BOOL
[B, L]: p >= the label's threshold (the spec's "selection": qks-calibrate's per label, else 0.5 each).

The requests of one `execute` call (Triton's dynamic batcher groups them) run as one engine batch;
encoded images are decoded in a small thread pool. A request that cannot be served (an image that
does not decode, both or neither input, non-finite outputs) gets an error response with a one-line
reason; the others in the batch are answered normally. Wrong shapes and dtypes never get here:
Triton refuses them against config.pbtxt.

`QksServingModel` is the same computation without Triton (the tests call it directly);
`TritonPythonModel` is the thin adapter Triton loads. This module imports Triton's
`triton_python_backend_utils` only inside Triton, and never torch.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SPEC_FILE = "qks-model.json"
SPEC_FORMAT = "qks-triton-python"
SPEC_VERSION = 1
BANK_FILE = "labels.npy"
LABELS_FILE = "labels.txt"
PIXELS, IMAGE = "pixels", "image"
PROBS, LOGITS = "probabilities", "logits"
SELECTED = "selected"  # BOOL [B, L]: p >= the label's threshold (qks-calibrate's, else 0.5)
DECODE_THREADS = 4


class ServingError(ValueError):
    """A model folder that cannot be loaded; one line (Triton shows it as the load error)."""


class RequestError(ValueError):
    """A request that cannot be answered; one line, sent back as the request's error response."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


# -- loading ---------------------------------------------------------------------------------------


def read_spec(version_dir: Path) -> dict:
    path = Path(version_dir) / SPEC_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ServingError(f"{path} is missing: rewrite the repository with qks-triton --backend python") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServingError(f"{path}: unreadable ({_one_line(e)})") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ServingError(f"{path}: not a qks-triton Python-backend model")
    if spec.get("version") != SPEC_VERSION:
        raise ServingError(f"{path}: written by another qks (model version {spec.get('version')!r}, this qks reads "
                           f"{SPEC_VERSION}); rewrite the repository with this qks-triton")
    return spec


def _checked_file(version_dir: Path, rec: dict) -> Path:
    """A file the spec names, inside the version folder, with the sha256 it records."""
    from ..runtime.manifest import BundleError, check_relpath, sha256_file

    try:
        path = Path(version_dir) / check_relpath(rec["file"])
    except (BundleError, KeyError, TypeError) as e:
        raise ServingError(f"{SPEC_FILE}: a file entry is invalid ({e})") from None
    if not path.is_file():
        raise ServingError(f"{path.name} is missing from {version_dir}")
    if rec.get("sha256") and sha256_file(path) != rec["sha256"]:
        raise ServingError(f"{path.name} does not match its sha256 in {SPEC_FILE} (corrupt or modified)")
    return path


def _read_labels(path: Path) -> list[str]:
    from ..runtime.bundle import read_names
    from ..runtime.manifest import BundleError

    try:
        return read_names(path)
    except FileNotFoundError:
        raise ServingError(f"{path} is missing") from None
    except BundleError as e:
        raise ServingError(str(e)) from None


def _open_engine(graph_path: Path, precision: str, threads: int | None):
    from ..engines.base import EngineError
    from ..engines.ort import OrtEngine
    from ..runtime.backend import FP16_ORT_OPTIONS

    try:
        return OrtEngine(graph_path, "cpu", intra_op_threads=threads,
                         disabled_optimizers=FP16_ORT_OPTIONS if precision == "fp16" else None)
    except EngineError as e:
        raise ServingError(str(e)) from None


# -- the computation ---------------------------------------------------------------------------------


class QksServingModel:
    """A qks-triton Python-backend model folder, loaded: pixels or encoded images -> probabilities, logits."""

    def __init__(self, model_dir: str | Path, version: str = "1", threads: int | None = None):
        from ..runtime.bundle import load_npy
        from ..runtime.manifest import BundleError
        from ..runtime.preprocess import Preprocess

        version_dir = Path(model_dir) / version
        spec = read_spec(version_dir)
        try:
            self.preprocess = Preprocess.from_dict(spec["preprocess"])
            graph, bank = spec["graph"], spec["bank"]
            self.mode, self.k = spec["scoring"]["mode"], int(spec["scoring"]["k"])
            self.max_batch = int(spec["max_batch_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ServingError(f"{version_dir / SPEC_FILE}: incomplete ({type(e).__name__}: {e})") from None
        self.engine = _open_engine(_checked_file(version_dir, graph), graph.get("precision", "fp32"), threads)
        try:
            self.embeddings = np.ascontiguousarray(load_npy(_checked_file(version_dir, bank), "label bank"), np.float32)
        except BundleError as e:
            raise ServingError(str(e)) from None
        self.names = _read_labels(Path(model_dir) / LABELS_FILE)
        if self.embeddings.ndim != 2 or len(self.names) != self.embeddings.shape[0]:
            raise ServingError(f"{LABELS_FILE} has {len(self.names)} labels, {BANK_FILE} is "
                               f"{list(self.embeddings.shape)}")
        # the `selected` output's thresholds: the spec's (written by qks-triton), else 0.5 for every label
        thresholds = (spec.get("selection") or {}).get("thresholds")
        self.thresholds = np.asarray(thresholds if thresholds is not None else [0.5] * len(self.names), np.float32)
        if self.thresholds.shape != (len(self.names),):
            raise ServingError(f"{SPEC_FILE}: {self.thresholds.size} selection thresholds for {len(self.names)} labels")
        self.in_name, self.out_name = self.engine.inputs[0].name, self.engine.outputs[0].name
        self.size = self.preprocess.size
        self._pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="qks-decode")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    def decode(self, blob) -> np.ndarray:
        """One encoded image file (bytes) -> pixels [3, S, S]; RequestError with the decoder's reason."""
        from ..runtime.preprocess import PreprocessError

        data = bytes(blob) if not isinstance(blob, bytes) else blob
        if not data:
            raise RequestError("empty image (0 bytes)")
        try:
            return self.preprocess.load(io.BytesIO(data))
        except PreprocessError as e:
            raise RequestError(str(e)) from None
        except Exception as e:  # a decoder bug is this request's error, not the server's
            raise RequestError(f"cannot decode image: {_one_line(e)}") from None

    def decode_all(self, blobs: list) -> list:
        """Decode in the pool; each item is pixels or the RequestError it raised."""
        def one(blob):
            try:
                return self.decode(blob)
            except RequestError as e:
                return e
        return list(self._pool.map(one, blobs))

    def check_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """What Triton's shape check does not cover when a caller bypasses it (direct use)."""
        want = (3, self.size, self.size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise RequestError(f"pixels must be [B, {', '.join(map(str, want))}], got {list(pixels.shape)}")
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def query_features(self, pixels: np.ndarray) -> np.ndarray:
        step = self.max_batch
        outs = [self.engine.run({self.in_name: pixels[i:i + step]})[self.out_name] for i in range(0, len(pixels), step)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def score(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """pixels [N, 3, S, S] -> (probabilities [N, L], logits [N, L], finite [N]): qks-infer's numbers."""
        from ..runtime.scoring import logits as score_logits
        from ..runtime.scoring import sigmoid

        qf = self.query_features(self.check_pixels(pixels))
        lg = score_logits(qf, self.embeddings, self.mode, self.k).astype(np.float32)
        finite = np.isfinite(qf.reshape(len(qf), -1)).all(axis=1) & np.isfinite(lg).all(axis=1)
        return sigmoid(lg).astype(np.float32), lg, finite


# -- requests ------------------------------------------------------------------------------------------


def request_pixels(model: QksServingModel, pixels: np.ndarray | None, images: np.ndarray | None):
    """One request's inputs -> its pixels, or the RequestError that answers it. `images` must already
    be decoded (a list of arrays or RequestErrors, `QksServingModel.decode_all`)."""
    if (pixels is None) == (images is None):
        return RequestError(f"give exactly one input: {PIXELS!r} (FP32 [B, 3, {model.size}, {model.size}], "
                            f"preprocessed) or {IMAGE!r} (BYTES [B, 1], encoded image files)"
                            + (", not both" if pixels is not None else ""))
    if pixels is not None:
        try:
            return model.check_pixels(pixels)
        except RequestError as e:
            return e
    bad = [(i, r) for i, r in enumerate(images) if isinstance(r, RequestError)]
    if bad:
        i, err = bad[0]
        where = f"image {i + 1} of {len(images)}" if len(images) > 1 else "image"
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return RequestError(f"{where}: {err}{more}")
    return np.stack(images)


def decode_requests(model: QksServingModel, images: list[np.ndarray | None]) -> list[list | None]:
    """Every request's encoded images (BYTES [B, 1], or None) decoded in one pool pass, regrouped."""
    blobs = [None if imgs is None else list(np.asarray(imgs, dtype=object).reshape(-1)) for imgs in images]
    flat = iter(model.decode_all([b for bs in blobs if bs is not None for b in bs]))
    return [None if bs is None else [next(flat) for _ in bs] for bs in blobs]


def serve_batch(model: QksServingModel, requests: list[tuple[np.ndarray | None, np.ndarray | None]]) -> list:
    """Requests as (pixels or None, encoded images [B, 1] or None) -> per request (probabilities, logits)
    or a RequestError; all servable requests run as one engine batch."""
    decoded = decode_requests(model, [imgs for _pix, imgs in requests])
    inputs = [request_pixels(model, pix, dec) for (pix, _), dec in zip(requests, decoded, strict=True)]
    good = [x for x in inputs if isinstance(x, np.ndarray)]
    if not good:
        return inputs
    probs, lg, finite = model.score(np.concatenate(good))
    results, start = [], 0
    for x in inputs:
        if isinstance(x, RequestError):
            results.append(x)
            continue
        rows, start = slice(start, start + len(x)), start + len(x)
        results.append((probs[rows], lg[rows]) if finite[rows].all() else
                       RequestError("model output is not finite (NaN or inf): check the pixels"))
    return results


# -- Triton's Python backend -------------------------------------------------------------------------


class TritonPythonModel:
    """What Triton's Python backend loads (model.py re-exports it)."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils  # only inside Triton

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        threads = (config.get("parameters", {}).get("intra_op_threads", {}).get("string_value") or "0").strip()
        try:
            self.model = QksServingModel(args["model_repository"], args["model_version"], int(threads) or None)
        except ServingError as e:
            raise pb_utils.TritonModelException(str(e)) from None

    def _tensor(self, request, name):
        t = self.pb.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    def _error(self, message: str):
        err = self.pb.TritonError
        code = getattr(err, "INVALID_ARG", None)
        return self.pb.InferenceResponse(error=err(message) if code is None else err(message, code))

    def execute(self, requests):
        inputs = [(self._tensor(r, PIXELS), self._tensor(r, IMAGE)) for r in requests]
        try:
            results = serve_batch(self.model, inputs)
        except Exception as e:  # an engine failure answers every request of this batch, the server stays up
            results = [RequestError(f"inference failed: {_one_line(e)}")] * len(inputs)
        responses = []
        for res in results:
            if isinstance(res, RequestError):
                responses.append(self._error(str(res)))
            else:
                probs, lg = res
                responses.append(self.pb.InferenceResponse([self.pb.Tensor(PROBS, probs), self.pb.Tensor(LOGITS, lg),
                                                            self.pb.Tensor(SELECTED, probs >= self.model.thresholds)]))
        return responses

    def finalize(self) -> None:
        self.model.close()
