"""The embedding file pair that `qks-infer --embeddings` writes and `qks-similar` / `qks-dupes` read.

`OUT.npy`: float32 [N, D], row i the L2-normalised image embedding of image i (the bundle's "embedding"
output). `OUT.json`: the index,

    {"format": "qks-embeddings", "version": 1, "images": [display names, row order], "count": N, "dim": D,
     "npy_sha256": sha256 of OUT.npy, "root": the tagged folder, "bundle": bundle path,
     "bundle_sha256": the fp32 image graph's sha256 (what makes two runs' vectors comparable),
     "model": backbone spec, "output": "embedding", ...anything the writer adds}

Both files are written to temporary files and moved into place with `os.replace`, the .npy first and
the .json last. The index holds the .npy's sha256, so a reader that finds an index whose array is not
the one it was written with (a write killed between the two moves, a file replaced by hand) refuses the
pair with a one-line error instead of pairing names with the wrong rows.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from qks.hashing import sha256_file

FORMAT = "qks-embeddings"
VERSION = 1
NORM_TOLERANCE = 1e-3  # |norm - 1| allowed for a row (float32 rounding of an fp16/int8 graph's output)


class EmbeddingsError(ValueError):
    """An embedding file pair that cannot be written or read; the message says why, in one line."""


def pair_paths(path: str | Path) -> tuple[Path, Path]:
    """"OUT.npy", "OUT.json" or "OUT" -> (OUT.npy, OUT.json)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (".npy", ".json") else path
    return stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")


def embeddings_meta(bundle, root: str | Path | None = None) -> dict:
    """The index fields that say where the vectors come from: bundle path, its image graph's sha256 (the
    identity two runs must share for their rows to be mixed), backbone spec, output name, root folder."""
    graph = bundle.graphs.get("image_encoder") or next(g for n, g in bundle.graphs.items() if n.startswith("image_encoder"))
    meta = {"bundle": str(bundle.root), "bundle_sha256": graph.sha256,
            "model": (bundle.manifest.get("model") or {}).get("backbone"), "output": bundle.require_embedding()}
    if root is not None:
        meta["root"] = str(root)
    return meta


def text_embedding(text_features: np.ndarray, dims: int, normalize: bool = True) -> np.ndarray:
    """[N, dims] float32: texts' embeddings in the image embedding's space from the label graph's
    text_features [N, F] (the manifest's rule: the first `dims` values, L2-normalised). The one copy of
    the rule: qks-export verifies it against the backbone and qks-similar applies it."""
    t = np.asarray(text_features)[:, :dims].astype(np.float64)
    if normalize:
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    return t.astype(np.float32)


def check_vectors(vectors, count: int | None = None, what: str = "embeddings") -> np.ndarray:
    """float32 [N, D], finite, rows of unit length; EmbeddingsError otherwise."""
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise EmbeddingsError(f"{what}: not a numeric array ({e})") from None
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise EmbeddingsError(f"{what}: must be a 2-D array [images, dim], got shape {list(arr.shape)}")
    if count is not None and arr.shape[0] != count:
        raise EmbeddingsError(f"{what}: {arr.shape[0]} vectors for {count} image names")
    if not np.isfinite(arr).all():
        raise EmbeddingsError(f"{what}: holds NaN or infinite values")
    norms = np.sqrt(np.einsum("ij,ij->i", arr, arr))  # float32 is ample for the tolerance; no copy
    bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
    if len(bad):
        raise EmbeddingsError(f"{what}: row {int(bad[0])} has norm {norms[bad[0]]:.4g}, not 1 (not L2-normalised)")
    return np.ascontiguousarray(arr)


def save_embeddings(path: str | Path, names: list[str], vectors, meta: dict | None = None) -> tuple[Path, Path]:
    """Write the pair for `names` (row order) and `vectors` [N, D]; returns (npy, json) paths.
    `meta`: extra index fields (`embeddings_meta(bundle, root)` and anything else); the fields this
    module owns (format, images, count, dim, npy_sha256) cannot be overridden."""
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise EmbeddingsError(f"embeddings: image name {dup!r} appears twice")
    arr = check_vectors(vectors, len(names)) if names else np.zeros((0, _dim(vectors)), np.float32)
    npy, idx = pair_paths(path)
    if not npy.parent.is_dir():
        raise EmbeddingsError(f"embeddings: folder {npy.parent} does not exist")
    tmp_npy = _temp(npy)
    try:
        with open(tmp_npy, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        index = {**(meta or {}), "format": FORMAT, "version": VERSION, "images": names, "count": len(names),
                 "dim": int(arr.shape[1]), "npy_sha256": sha256_file(tmp_npy)}
        tmp_idx = _temp(idx)
        try:
            with open(tmp_idx, "w", encoding="utf-8") as f:
                json.dump(index, f, ensure_ascii=False)
                f.write("\n")
            os.replace(tmp_npy, npy)
            os.replace(tmp_idx, idx)
        finally:
            Path(tmp_idx).unlink(missing_ok=True)
    except OSError as e:
        raise EmbeddingsError(f"embeddings: cannot write {npy.name}/{idx.name} in {npy.parent}: {e.strerror or e}") from None
    finally:
        Path(tmp_npy).unlink(missing_ok=True)
    return npy, idx


def load_embeddings(path: str | Path) -> tuple[list[str], np.ndarray, dict]:
    """(names, vectors float32 [N, D], the whole index) of a pair written by `save_embeddings`;
    EmbeddingsError (one line) when a file is missing, unreadable or the two do not belong together."""
    npy, idx = pair_paths(path)
    for p in (npy, idx):
        if not p.is_file():
            raise EmbeddingsError(f"embeddings: {p} not found (write it with qks-infer --embeddings {npy})")
    try:
        index = json.loads(idx.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise EmbeddingsError(f"embeddings: {idx.name} is not a valid index ({type(e).__name__})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise EmbeddingsError(f"embeddings: {idx.name} is not a qks embeddings index")
    if index.get("version") != VERSION:
        raise EmbeddingsError(f"embeddings: {idx.name} has version {index.get('version')!r}; this qks reads {VERSION}")
    names = index.get("images")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise EmbeddingsError(f"embeddings: {idx.name} has no list of image names")
    if index.get("npy_sha256") != sha256_file(npy):
        raise EmbeddingsError(f"embeddings: {npy.name} is not the array {idx.name} was written with "
                              "(modified, or a write was cut short): rerun qks-infer --embeddings")
    try:
        arr = np.load(npy, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, SyntaxError... for a damaged header
        raise EmbeddingsError(f"embeddings: {npy.name} is not a valid .npy file ({type(e).__name__})") from None
    if arr.ndim == 2 and arr.shape[0] == 0:
        return [], arr.astype(np.float32), index
    arr = check_vectors(arr, len(names), npy.name)
    if index.get("dim") not in (None, arr.shape[1]):
        raise EmbeddingsError(f"embeddings: {idx.name} says dim {index.get('dim')}, {npy.name} has {arr.shape[1]}")
    return names, arr, index


def _dim(vectors) -> int:
    shape = np.shape(vectors)
    return int(shape[1]) if len(shape) == 2 else 0


def _temp(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp
