"""What both repository kinds share: the qks-triton.json record, the whole-or-nothing write (staging
folder, swap), the bundle and label bank loading, graph copies with their external data, and the
one-line TritonError. Imports no other module of this package."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExportError, one_line

MARKER = "qks-triton.json"
FORMAT = "qks-triton"
MARKER_VERSION = 1
DEFAULT_MAX_BATCH = 32
IMAGE_QUEUE_DELAY_US = 100  # wait at most 0.1 ms for more requests to batch with
PROBS, LOGITS = "probabilities", "logits"
# BOOL [B, L]: p >= the label's threshold (the bank's per-label thresholds from qks-calibrate, else 0.5 for
# every label: qks-infer's default); a client that wants another rule applies it to the probabilities
SELECTED = "selected"


def selection_thresholds(bank) -> tuple:
    """(float32 [L] thresholds of the `selected` output, a few words on where they come from)."""
    import numpy as np

    if getattr(bank, "thresholds", None) is not None:
        return np.asarray(bank.thresholds, dtype=np.float32), "per-label thresholds (qks-calibrate)"
    return np.full(len(bank.names), 0.5, dtype=np.float32), "0.5 for every label (qks-infer's default)"
LABELS_FILE = "labels.txt"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")
INSTALL_HINT = "pip install 'qks[triton]'"


class TritonError(ExportError):
    """A repository that cannot be written or checked; one line."""


@dataclass
class TritonReport:
    path: Path
    name: str
    models: dict  # role -> model name
    image: object | None  # the ImageModel served (--backend onnx; image_model.py), else None
    labels: int
    bank_source: str
    validated: bool  # False: tritonclient is not installed, the configs were not parsed
    problems: list[str] = field(default_factory=list)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def load_bundle(bundle_dir):
    from ...runtime.bundle import Bundle
    from ...runtime.manifest import BundleError

    try:
        return Bundle.load(bundle_dir)
    except BundleError as e:
        raise TritonError(str(e)) from None


def load_bank(bundle, labels: str | Path | None, bank: str | None):
    from ...engines.base import EngineError
    from ...runtime.labels import LabelBank, LabelError, read_label_file
    from ...runtime.manifest import BundleError

    if labels is not None and bank is not None:
        raise TritonError("give --labels or --bank, not both")
    try:
        if labels is not None:
            return LabelBank.for_labels(bundle, read_label_file(labels))
        return LabelBank.from_bundle(bundle, bank)
    except (LabelError, BundleError, EngineError) as e:
        raise TritonError(str(e) or type(e).__name__) from None


def model_names(name: str) -> dict:
    if not MODEL_NAME.fullmatch(name):
        raise TritonError(f"model name {name!r}: use letters, digits, '_' and '-' (at most 64, not '-' first)")
    return {"image": f"{name}_image", "scoring": f"{name}_scoring", "ensemble": name}


def read_marker(repo: Path) -> dict | None:
    path = repo / MARKER
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TritonError(f"{path}: unreadable ({one_line(e)})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise TritonError(f"{path}: not a qks-triton record")
    if m.get("version") != MARKER_VERSION:
        raise TritonError(f"{path}: written by another qks-triton (record version {m.get('version')!r}); "
                          "regenerate the repository")
    return m


def check_target(repo: str | Path) -> dict | None:
    """REPO may be new, an empty folder, or a qks-triton repository holding nothing else (TritonError
    otherwise); returns its qks-triton.json record, if any."""
    repo = Path(repo)
    if not repo.exists():
        if repo.is_symlink():
            raise TritonError(f"{repo} is a broken symbolic link")
        return None
    if not repo.is_dir():
        raise TritonError(f"{repo} exists and is not a folder")
    entries = sorted(p.name for p in repo.iterdir())
    if not entries:
        return None
    marker = read_marker(repo)
    if marker is None:
        raise TritonError(f"{repo} exists and is not a qks Triton repository (no {MARKER}); "
                          "choose a new folder or empty it")
    ours = {MARKER, *marker.get("models", {}).values()}
    other = [e for e in entries if e not in ours]
    if other:
        raise TritonError(f"{repo} also holds {', '.join(other[:5])}; qks-triton replaces only a repository it "
                          "wrote alone (give Triton a second --model-repository for other models)")
    return marker


def _tmp_beside(repo: Path, what: str) -> Path:
    parent = repo.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{repo.name}.{what}-", dir=parent))
    except OSError as e:
        raise TritonError(f"cannot write beside {repo}: {e.strerror or e}") from None


@contextlib.contextmanager
def staging(repo: Path, what: str):
    """A temporary folder beside REPO for a whole-or-nothing write: an OSError becomes one TritonError
    line, and the folder is removed whatever happens."""
    tmp = _tmp_beside(repo, what)
    try:
        yield tmp
    except OSError as e:
        raise TritonError(f"cannot write {repo}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_marker(folder: Path, marker: dict) -> None:
    """FOLDER/qks-triton.json, replaced atomically."""
    part = folder / (MARKER + ".tmp")
    part.write_text(json.dumps(marker, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(part, folder / MARKER)


def copy_graph(source: Path, version_dir: Path, filename: str, extra_files: list[str]) -> None:
    """A graph file into a model's version folder as FILENAME, with its external data files beside it."""
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, version_dir / filename)
    for rel in extra_files:
        src = source.parent / rel
        if not src.is_file():
            raise TritonError(f"{source.name}: its external data file {rel} is missing")
        (version_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, version_dir / rel)


def swap(new: Path, dest: Path, aside: Path) -> None:
    """Put `new` at `dest`, replacing what is there: renames on one file system, the old one moved to
    `aside` (outside the repository, where Triton does not look) and removed only after the new one
    is in place."""
    old = None
    if dest.exists():
        old = aside
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def external_data(path: Path) -> list[str]:
    """Files an ONNX graph keeps its tensors in (external data), relative to the graph's folder."""
    try:
        import onnx
    except ImportError:
        raise TritonError(f"reading {path.name} needs the onnx package: {INSTALL_HINT} (the serving environment "
                          "has no onnx: write the repository from the qks[triton] one)") from None

    from ...runtime.manifest import BundleError, check_relpath

    found = external_locations(onnx.load(str(path), load_external_data=False))
    for loc in found:
        try:
            check_relpath(loc)
        except BundleError as e:
            raise TritonError(f"{path.name}: external data {e}") from None
    return found


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_tensors(g)


def external_locations(model) -> list[str]:
    import onnx

    locs = []
    for t in _all_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in locs:
                locs.append(loc)
    return locs


def tritonclient_missing() -> str | None:
    """Why tritonclient's model-config protobuf cannot be imported (None: it can). tritonclient
    installed without its gRPC part raises RuntimeError ("does not include grpc support")."""
    try:
        from tritonclient.grpc import model_config_pb2  # noqa: F401
    except ImportError:
        return f"tritonclient is not installed ({INSTALL_HINT})"
    except RuntimeError:
        return f"tritonclient is installed without its gRPC part ({INSTALL_HINT}, which adds tritonclient[grpc])"
    return None
