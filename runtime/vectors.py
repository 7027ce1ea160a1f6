"""Nearest neighbours over L2-normalised embeddings (cosine = dot product): exact numpy, or FAISS HNSW.

Two backends, one interface (`VectorIndex`): `search(queries, k)` -> (cosines, row ids), best first, and
`pairs_above(threshold, k)` -> every pair (i < j) whose cosine is >= threshold (each row's k nearest
neighbours for FAISS: an approximate search, so a pair can be missed; exact for numpy).

- "numpy": a float32 matrix product in row blocks (BLAS), exact, no build step.
- "faiss": `faiss.IndexHNSWFlat` (inner product), built once per process; approximate.

`auto` picks by collection size from benchmarks/vector_search.py's measurements (benchmarks/RESULTS.md,
"Vector search"): exact numpy below `FAISS_FROM` vectors, FAISS HNSW at and above for the all-pairs
search of qks-dupes; a single qks-similar query is always exact (one matrix-vector product is faster
than building any index, and the CLI builds it afresh each run).
"""

from __future__ import annotations

import numpy as np

BACKENDS = ("auto", "numpy", "faiss")
FAISS_FROM = 50_000  # qks-dupes: exact below, HNSW at and above (RESULTS.md, "Vector search")
BLOCK = 2048  # query rows per matrix product: bounds memory at BLOCK x N float32
HNSW_M = 32  # graph degree
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64


class VectorError(ValueError):
    """A vector-search backend that cannot run; the message says why, in one line."""


class NumpyIndex:
    name = "numpy"
    exact = True

    def __init__(self, vectors: np.ndarray):
        self.x = np.ascontiguousarray(vectors, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.x))
        scores = np.empty((len(q), k), np.float32)
        ids = np.empty((len(q), k), np.int64)
        for s in range(0, len(q), BLOCK):
            sims = q[s:s + BLOCK] @ self.x.T
            scores[s:s + BLOCK], ids[s:s + BLOCK] = _top_k(sims, k)
        return scores, ids

    def pairs_above(self, threshold: float, k: int | None = None) -> list[tuple[int, int, float]]:
        """Every pair i < j with cosine >= threshold (`k` is ignored: exact)."""
        out = []
        for s in range(0, len(self.x), BLOCK):
            sims = self.x[s:s + BLOCK] @ self.x[s:].T  # columns from s on: the pairs j > i of these rows
            rows, cols = np.nonzero(sims >= threshold)
            keep = cols > rows  # each pair once, no self-pairs
            r, c = rows[keep], cols[keep]
            out.extend(zip((r + s).tolist(), (c + s).tolist(), sims[r, c].tolist(), strict=True))
        return out


class FaissIndex:
    name = "faiss"
    exact = False

    def __init__(self, vectors: np.ndarray):
        faiss = import_faiss()
        self.x = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = faiss.IndexHNSWFlat(self.x.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        self.index.hnsw.efSearch = HNSW_EF_SEARCH
        self.index.add(self.x)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self.x))
        self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, ids.astype(np.int64)

    def pairs_above(self, threshold: float, k: int | None = None) -> list[tuple[int, int, float]]:
        """Pairs i < j among each row's `k` nearest (default 16) with cosine >= threshold. A duplicate
        group larger than k still joins up through its members' own neighbour lists."""
        scores, ids = self.search(self.x, min(k or 16, len(self.x)))
        pairs = {}
        for i, (row_s, row_i) in enumerate(zip(scores, ids, strict=True)):
            for c, j in zip(row_s.tolist(), row_i.tolist(), strict=True):
                if j >= 0 and j != i and c >= threshold:
                    key = (min(i, j), max(i, j))
                    pairs[key] = max(pairs.get(key, c), c)
        return [(i, j, c) for (i, j), c in sorted(pairs.items())]


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise VectorError("--backend faiss needs faiss-cpu: pip install 'qks[library]'") from None
    return faiss


def open_index(vectors: np.ndarray, backend: str = "auto", *, all_pairs: bool = False):
    """The index for `vectors` [N, D]. auto: numpy, or FAISS for an all-pairs search of at least
    FAISS_FROM vectors when faiss is installed."""
    if backend not in BACKENDS:
        raise VectorError(f"unknown vector backend {backend!r} (one of {', '.join(BACKENDS)})")
    if backend == "auto":
        backend = "faiss" if all_pairs and len(vectors) >= FAISS_FROM and _has_faiss() else "numpy"
    return FaissIndex(vectors) if backend == "faiss" else NumpyIndex(vectors)


def _has_faiss() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def _top_k(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest values and their columns, largest first (ties: lower column first)."""
    if k < sims.shape[1]:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(sims.shape[1]), sims.shape).copy()
    vals = np.take_along_axis(sims, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(vals, order, axis=1), ids.astype(np.int64)


def connected_groups(n: int, pairs: list[tuple[int, int, float]]) -> list[tuple[list[int], float, float]]:
    """Groups (connected components of the pair graph) of 2 or more rows: (rows sorted, the lowest and
    highest cosine of the pairs that join them), largest group first."""
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j, _c in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    lo: dict[int, float] = {}
    hi: dict[int, float] = {}
    for i, _j, c in pairs:
        r = find(i)
        lo[r], hi[r] = min(lo.get(r, c), c), max(hi.get(r, c), c)
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    groups = [(rows, lo[r], hi[r]) for r, rows in members.items() if len(rows) > 1]
    return sorted(groups, key=lambda g: (-len(g[0]), g[0][0]))
