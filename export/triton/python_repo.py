"""`qks-triton --backend python BUNDLE REPO`: one Triton Python-backend model that runs the torch-free
runtime (`qks.serving.triton_model`), for Triton servers without the onnxruntime backend -- the one
`nvidia-pytriton` bundles (`make serve-venv`, `qks-triton-server`) -- and for clients that send
encoded images instead of preprocessed pixels.

    REPO/
      qks-triton.json          what was written, from which bundle (backend "python")
      NAME/                    see qks.serving.triton_model for the folder and its inputs/outputs
        config.pbtxt           written by qks.export.triton.config.python_config
        labels.txt
        1/model.py, 1/qks-model.json, 1/<image graph>.onnx, 1/labels.npy

- The image graph is the one `qks-infer --backend ort-cpu` would run (`--image-model auto`: the
  INT8 graph if the bundle has one, else fp32), or `onnx` (fp32), `fp16`, `int8`; TensorRT plans
  need Triton's tensorrt backend (`--backend onnx`).
- `--labels-only` rewrites the whole model folder (the image graph is copied again from the same
  bundle, checked by sha256) and swaps it in atomically; in explicit model-control mode Triton
  serves the old labels until `load_model` has loaded the new ones.
- Writes are whole or nothing, and REPO is replaced only if it is a qks-triton repository, as for
  the ONNX repository (qks.export.triton.onnx_repo).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .common import (
    DEFAULT_MAX_BATCH,
    FORMAT,
    MARKER,
    MARKER_VERSION,
    TritonError,
    TritonReport,
    check_target,
    copy_graph,
    external_data,
    load_bank,
    load_bundle,
    model_names,
    now,
    selection_thresholds,
    staging,
    swap,
    write_marker,
)
from .config import python_config, write_config
from .validate import validate_or_raise

PRECISION = {"auto": "auto", "onnx": "fp32", "fp16": "fp16", "int8": "int8"}
MODEL_PY = '''"""qks on Triton's Python backend (written by qks-triton --backend python). The code is
qks.serving.triton_model from the qks installed in the Python that runs this model."""

try:
    from qks.serving.triton_model import TritonPythonModel  # noqa: F401
except ImportError as e:
    raise ImportError(f"this model needs qks in the Python that Triton's python backend runs ({e}); "
                      "use the serving environment (make serve-venv, then qks-triton-server)") from None
'''


def choose_graph(bundle, image_model: str = "auto"):
    """The bundle's ONNX image graph the Python-backend model runs, as qks-infer's ort-cpu picks it."""
    from ...engines.base import EngineError
    from ...runtime.backend import _ort_graph

    if image_model == "plan":
        raise TritonError("--backend python runs ONNX graphs with ONNX Runtime; a TensorRT plan needs Triton's "
                          "tensorrt backend (--backend onnx)")
    if image_model not in PRECISION:
        raise TritonError(f"unknown --image-model {image_model!r} for --backend python "
                          f"(one of {', '.join(PRECISION)})")
    try:
        graph = _ort_graph(bundle, "cpu", PRECISION[image_model])
    except EngineError as e:
        raise TritonError(str(e)) from None
    # outputs: query features first, then optionally the image embedding (not served by this model)
    if len(graph.inputs) != 1 or not graph.outputs or graph.inputs[0].get("dtype") != "float32":
        raise TritonError(f"{graph.file}: expected one float32 pixels input and the query features output first")
    return graph


def _spec(bundle, graph, bank, max_batch: int, graph_file: str) -> dict:
    from qks import __version__

    from ...serving import triton_model as tm

    mode, k = bundle.scoring
    thresholds, selection = selection_thresholds(bank)
    precision = "fp16" if graph.precision == "fp16" or graph.name.endswith("fp16") else graph.precision
    return {"format": tm.SPEC_FORMAT, "version": tm.SPEC_VERSION, "qks_version": __version__,
            "graph": {"file": graph_file, "name": graph.name, "sha256": graph.sha256, "precision": precision},
            "preprocess": bundle.manifest["preprocess"], "scoring": {"mode": mode, "k": int(k)},
            "bank": {"file": tm.BANK_FILE, "labels": len(bank.names), "dim": int(bank.embeddings.shape[1]),
                     "source": bank.source, "key": bank.key},
            # the `selected` output's thresholds, bank order (qks-calibrate's per label, else 0.5 each)
            "selection": {"thresholds": [float(t) for t in thresholds], "source": selection},
            "max_batch_size": int(max_batch)}


def _write_model(folder: Path, name: str, bundle, graph, bank, max_batch: int) -> dict:
    """NAME/: config, labels, model.py, spec, graph, bank. Returns the marker's record of it."""
    from ...runtime.manifest import sha256_file
    from ...serving import triton_model as tm

    version = folder / "1"
    graph_file = Path(graph.file).name
    copy_graph(graph.path, version, graph_file, external_data(graph.path))
    (version / "model.py").write_text(MODEL_PY, encoding="utf-8")
    np.save(version / tm.BANK_FILE, np.ascontiguousarray(bank.embeddings, dtype=np.float32), allow_pickle=False)
    (folder / tm.LABELS_FILE).write_text("".join(n + "\n" for n in bank.names), encoding="utf-8")
    spec = _spec(bundle, graph, bank, max_batch, graph_file)
    spec["bank"]["sha256"] = sha256_file(version / tm.BANK_FILE)
    (version / tm.SPEC_FILE).write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = python_config(name, graph.inputs[0], len(bank.names), max_batch)
    write_config(folder, cfg, f"qks-triton {now()}: qks.runtime on Triton's python backend; "
                      f"{graph_file} ({spec['graph']['precision']}), {len(bank.names)} labels ({bank.source})\n"
                      f"bundle: {bundle.root}")
    return {"image_model": {"kind": "onnx", "graph": graph.name, "file": graph_file, "sha256": graph.sha256,
                            "precision": spec["graph"]["precision"], "max_batch_size": int(max_batch)},
            "scoring": {"labels": len(bank.names), "bank": bank.source, "bank_key": bank.key,
                        "dim": spec["bank"]["dim"], "mode": spec["scoring"]["mode"], "k": spec["scoring"]["k"],
                        "written": now()}}


def _marker(name: str, bundle, model: dict) -> dict:
    return {"format": FORMAT, "version": MARKER_VERSION, "backend": "python", "name": name,
            "models": {"model": name}, "written": now(), "bundle": str(bundle.root), **model}


def write_python_repository(bundle_dir, repo, *, labels=None, bank=None, name: str = "qks", image_model: str = "auto",
                            max_batch: int | None = None, log=None) -> TritonReport:
    """Write REPO with one Python-backend model NAME for a bundle (see the module docstring)."""
    log = log or (lambda msg: None)
    repo = Path(repo)
    model_names(name)  # the name's rules
    if max_batch is not None and max_batch < 1:
        raise TritonError(f"--max-batch must be >= 1 (got {max_batch})")
    check_target(repo)
    bundle = load_bundle(bundle_dir)
    graph = choose_graph(bundle, image_model)
    lbank = load_bank(bundle, labels, bank)
    max_batch = max_batch or DEFAULT_MAX_BATCH
    log(f"model {name}: {graph.file} on ONNX Runtime in Triton's python backend, max_batch_size {max_batch}")
    with staging(repo, "qks-triton") as tmp:
        model = _write_model(tmp / name, name, bundle, graph, lbank, max_batch)
        write_marker(tmp, _marker(name, bundle, model))
        validated = validate_or_raise(tmp)
        swap(tmp, repo, repo.absolute().parent / f".{repo.name}.old-{os.getpid()}")
    return TritonReport(repo, name, {"model": name}, None, len(lbank.names), lbank.source, validated)


def write_python_labels_only(bundle_dir, repo: Path, marker: dict, *, labels=None, bank=None, log=None) -> TritonReport:
    """Rewrite REPO's Python-backend model for another label list, from the bundle its graph came from."""
    log = log or (lambda msg: None)
    name, img = marker.get("name"), marker.get("image_model") or {}
    if not name or marker.get("models") != {"model": name} or not img.get("graph"):
        raise TritonError(f"{repo / MARKER}: incomplete record; regenerate the repository")
    bundle = load_bundle(bundle_dir)
    graph = bundle.graphs.get(img["graph"])
    if graph is None or graph.sha256 != img.get("sha256"):
        raise TritonError(f"{repo}'s image model ({img.get('file')}) is not from this bundle; labels for it must be "
                          "encoded with its own bundle (or regenerate the whole repository)")
    lbank = load_bank(bundle, labels, bank)
    with staging(repo, "qks-triton-labels") as tmp:
        model = _write_model(tmp / name, name, bundle, graph, lbank, int(img["max_batch_size"]))
        validated = validate_or_raise(tmp, models=[name])
        swap(tmp / name, repo / name, tmp / "old")
        write_marker(repo, {**marker, **model, "written": model["scoring"]["written"]})
    log(f"model {name}: {len(lbank.names)} labels ({lbank.source}) -> {repo / name}")
    return TritonReport(repo, name, {"model": name}, None, len(lbank.names), lbank.source, validated)
