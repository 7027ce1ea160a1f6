"""The `--backend onnx` repository: image model + scoring model + ensemble, for Triton's onnxruntime
and tensorrt backends (NGC containers), and its `--labels-only` rewrite of the scoring model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .common import (
    FORMAT,
    LABELS_FILE,
    MARKER,
    MARKER_VERSION,
    TritonError,
    TritonReport,
    check_target,
    copy_graph,
    load_bank,
    load_bundle,
    model_names,
    now,
    staging,
    swap,
    write_marker,
)
from .config import ensemble_config, image_config, write_config
from .image_model import choose_image_model
from .scoring import write_scoring
from .validate import _tritonclient_available, validate_or_raise, validate_repository


def write_repository(bundle_dir: str | Path, repo: str | Path, *, labels: str | Path | None = None,
                     bank: str | None = None, name: str = "qks", image_model: str = "auto",
                     max_batch: int | None = None, gpu_sm: str | None = None, log=None) -> TritonReport:
    """Write the whole Triton repository for a bundle (see the module docstring)."""
    log = log or (lambda msg: None)
    repo = Path(repo)
    names = model_names(name)
    if max_batch is not None and max_batch < 1:
        raise TritonError(f"--max-batch must be >= 1 (got {max_batch})")
    check_target(repo)
    bundle = load_bundle(bundle_dir)
    image = choose_image_model(bundle, image_model, max_batch, gpu_sm)
    # outputs: query features first (scored by NAME_scoring), then optionally the image embedding
    if len(image.inputs) != 1 or not image.outputs:
        raise TritonError(f"the image model has {len(image.inputs)} inputs and {len(image.outputs)} outputs; "
                          "expected pixels -> query_features")
    lbank = load_bank(bundle, labels, bank)
    log(f"image model: {image.source.name} as {image.platform}, max_batch_size {image.max_batch} ({image.reason})")
    mode, k = bundle.scoring
    opset = _opset(bundle, image.graph)
    with staging(repo, "qks-triton") as tmp:
        # the image model
        img_dir = tmp / names["image"]
        copy_graph(image.source, img_dir / "1", image.filename, image.extra_files)
        note = (f"\nserve with a Triton release built on TensorRT {image.trt_version}, on sm_{image.sm} GPUs"
                if image.kind == "plan" else "")
        write_config(img_dir, image_config(names["image"], image),
                      f"qks-triton {now()}: {image.source.name} ({image.precision}) from bundle {bundle.root}{note}")
        # the scoring model
        scoring = write_scoring(tmp / names["scoring"], names["scoring"], lbank, image.outputs[0], image.max_batch,
                                 mode, k, opset, bundle.root)
        # the ensemble
        ens_dir = tmp / names["ensemble"]
        (ens_dir / "1").mkdir(parents=True)
        write_config(ens_dir, ensemble_config(names["ensemble"], names["image"], names["scoring"], image),
                      f"qks-triton {now()}: pixels (preprocessed as qks.runtime does) -> probabilities\n"
                      f"output dims -1: the label count is the scoring model's ({names['scoring']}/{LABELS_FILE})")
        marker = {
            "format": FORMAT, "version": MARKER_VERSION, "backend": "onnx", "name": name, "models": names,
            "written": now(),
            "bundle": str(bundle.root),
            "image_model": {"kind": image.kind, "graph": image.graph, "file": image.source.name,
                            "sha256": image.sha256, "precision": image.precision, "platform": image.platform,
                            "max_batch_size": image.max_batch, "inputs": image.inputs, "outputs": image.outputs,
                            "sm": image.sm, "trt_version": image.trt_version, "reason": image.reason},
            "label_encoder_sha256": bundle.graphs["label_encoder"].sha256 if "label_encoder" in bundle.graphs else None,
            "scoring": scoring,
        }
        write_marker(tmp, marker)
        validated = validate_or_raise(tmp)
        swap(tmp, repo, repo.absolute().parent / f".{repo.name}.old-{os.getpid()}")
    return TritonReport(repo, name, names, image, len(lbank.names), lbank.source, validated)


def _opset(bundle, graph: str) -> int:
    rec = bundle.manifest["graphs"].get(graph) or bundle.manifest["graphs"].get("image_encoder") or {}
    try:
        return max(17, int(rec.get("opset", 17)))
    except (TypeError, ValueError):
        return 17


def write_onnx_labels_only(bundle_dir, repo: Path, marker: dict, *, labels=None, bank=None, log=None) -> TritonReport:
    """Rewrite only REPO/NAME_scoring for another label list; the image model and ensemble stay."""
    log = log or (lambda msg: None)
    names = marker.get("models") or {}
    img = marker.get("image_model") or {}
    if set(names) != {"image", "scoring", "ensemble"} or not img.get("outputs"):
        raise TritonError(f"{repo / MARKER}: incomplete record; regenerate the repository")
    for role in ("image", "ensemble"):
        if not (repo / names[role] / "config.pbtxt").is_file():
            raise TritonError(f"{repo}: {names[role]}/config.pbtxt is missing; regenerate the repository")
    bundle = load_bundle(bundle_dir)
    # the bank must come from the bundle the image model came from
    shas = {g.sha256 for g in bundle.graphs.values()} | {bundle.sha256(e["file"]) for e in bundle.engines}
    if img.get("sha256") not in shas:
        raise TritonError(f"{repo}'s image model ({img.get('file')}) is not from this bundle; labels for it must be "
                          "encoded with its own bundle (or regenerate the whole repository)")
    lbank = load_bank(bundle, labels, bank)
    mode, k = bundle.scoring
    qf = img["outputs"][0]
    with staging(repo, "qks-triton-scoring") as tmp:
        scoring = write_scoring(tmp / names["scoring"], names["scoring"], lbank, qf, int(img["max_batch_size"]),
                                 mode, k, _opset(bundle, img.get("graph", "image_encoder")), bundle.root)
        validated = _scoring_fits(tmp, repo, names)
        swap(tmp / names["scoring"], repo / names["scoring"], tmp / "old")
        write_marker(repo, {**marker, "scoring": scoring, "written": scoring["written"]})
    log(f"scoring model: {len(lbank.names)} labels ({lbank.source}) -> {repo / names['scoring']}")
    return TritonReport(repo, marker["name"], names, None, len(lbank.names), lbank.source, validated)


def _scoring_fits(tmp: Path, repo: Path, names: dict) -> bool:
    """The new scoring model in TMP against the repository's other models' configs (False: tritonclient
    is not there to check with); TritonError if it does not fit."""
    if not _tritonclient_available():
        return False
    check = tmp / "check"
    check.mkdir()
    for role in ("image", "ensemble"):
        (check / names[role] / "1").mkdir(parents=True)
        shutil.copyfile(repo / names[role] / "config.pbtxt", check / names[role] / "config.pbtxt")
    os.replace(tmp / names["scoring"], check / names["scoring"])
    problems = validate_repository(check, models=[names["scoring"]])  # + the ensemble's wiring
    if problems:
        raise TritonError(f"the new scoring model does not fit the repository: {problems[0]}")
    os.replace(check / names["scoring"], tmp / names["scoring"])
    return True
