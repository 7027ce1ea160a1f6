"""FAISS against a numpy matrix product for qks-similar and qks-dupes, at 10k and 100k vectors.

Vectors: D = 512 (open_clip ViT-B-16's embedding), unit length, clustered like a photo library's
(`--clusters` centres, each vector a centre plus noise: cosines to its own centre around 0.7, to other
vectors around 0), with `--planted` near-duplicate pairs (a vector and a copy at cosine ~0.98).

Methods (qks.runtime.vectors):
- numpy: exact; a float32 matrix product in row blocks (BLAS);
- faiss-flat: `IndexFlatIP`, exact (FAISS's own BLAS path), for reference;
- faiss-hnsw: `IndexHNSWFlat` (M 32, efConstruction 80, efSearch 64), approximate: what `--vectors faiss`
  runs.

Tasks:
- similar: build the index, then `--queries` single queries, top-10 (qks-similar: one query per run);
  recall@10 against the exact answer;
- dupes: every pair with cosine >= 0.9 (qks-dupes): numpy's blocked self-product, FAISS HNSW's 16 nearest
  neighbours of every vector; recall of the exact pair set.
Memory: the index's own bytes (numpy: the matrix; FAISS: its serialised size) and the process's peak RSS.

    python -m benchmarks.vector_search [--sizes 10000 100000]

Writes benchmarks/results/vector_search.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 512
THRESHOLD = 0.9
K = 10


def make_vectors(n: int, dim: int, clusters: int, planted: int, seed: int) -> tuple[np.ndarray, set]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(clusters, size=n)] + rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n // 2, planted, replace=False)
    dst = n // 2 + src  # copies overwrite rows in the second half: pairs (i, n/2 + i)
    x[dst] = x[src] + 0.2 * rng.standard_normal((planted, dim)).astype(np.float32) / np.sqrt(dim)
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    return np.ascontiguousarray(x), {(int(a), int(b)) for a, b in zip(src, dst, strict=True)}


class FlatIndex:
    """FAISS's exact inner-product index, for reference (qks does not use it: numpy is as exact)."""

    name = "faiss-flat"

    def __init__(self, x):
        import faiss

        self.index = faiss.IndexFlatIP(x.shape[1])
        self.index.add(x)

    def search(self, q, k):
        return self.index.search(q, k)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _index_bytes(index) -> int:
    if hasattr(index, "x") and not hasattr(index, "index"):
        return int(index.x.nbytes)
    import faiss

    return int(faiss.serialize_index(index.index).nbytes)


def bench_similar(x: np.ndarray, queries: int, seed: int) -> list[dict]:
    from qks.runtime.vectors import FaissIndex, NumpyIndex

    q = x[np.random.default_rng(seed + 1).choice(len(x), queries, replace=False)]
    exact = None
    rows = []
    for cls in (NumpyIndex, FlatIndex, FaissIndex):
        index, build = _timed(lambda cls=cls: cls(x))
        t = time.perf_counter()
        ids = np.concatenate([index.search(q[i:i + 1], K)[1] for i in range(len(q))])
        per_query = (time.perf_counter() - t) / len(q)
        if exact is None:
            exact = ids
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, exact, strict=True)]))
        rows.append({"method": index.name if hasattr(index, "name") else cls.name, "build_s": build,
                     "query_ms": per_query * 1000, "first_query_s": build + per_query, "recall_at_10": recall,
                     "index_mib": _index_bytes(index) / 2**20})
        del index
    return rows


def bench_dupes(x: np.ndarray, planted: set) -> list[dict]:
    from qks.runtime.vectors import FaissIndex, NumpyIndex

    rows, exact = [], None
    for cls in (NumpyIndex, FaissIndex):
        def run(cls=cls):
            index = cls(x)
            return index, index.pairs_above(THRESHOLD, 16)

        (index, pairs), seconds = _timed(run)
        found = {(i, j) for i, j, _c in pairs}
        if exact is None:
            exact = found
        rows.append({"method": cls.name, "seconds": seconds, "pairs": len(found),
                     "recall_exact_pairs": len(found & exact) / max(1, len(exact)),
                     "planted_found": len(found & planted) / len(planted), "index_mib": _index_bytes(index) / 2**20})
        del index
    return rows


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import faiss

    return {"cpu": cpu, "cores": os.cpu_count(), "numpy": np.__version__, "faiss": faiss.__version__,
            "python": platform.python_version()}


def markdown(r: dict) -> str:
    lines = [f"Vectors: {r['dim']}-d, clustered, {r['planted']} planted near-duplicate pairs; {r['machine']['cpu']}, "
             f"{r['machine']['cores']} cores; numpy {r['machine']['numpy']}, faiss {r['machine']['faiss']}", "",
             "qks-similar: build, then one query at a time, top-10", "",
             "| N | method | build s | ms / query | build + 1 query s | recall@10 | index MiB |",
             "|---|---|---|---|---|---|---|"]
    for n, res in r["sizes"].items():
        for m in res["similar"]:
            lines.append(f"| {int(n):,} | {m['method']} | {m['build_s']:.2f} | {m['query_ms']:.2f} | "
                         f"{m['first_query_s']:.2f} | {m['recall_at_10']:.3f} | {m['index_mib']:.0f} |")
    lines += ["", f"qks-dupes: every pair with cosine >= {THRESHOLD} (build included)", "",
              "| N | method | seconds | pairs | recall of exact pairs | planted found | index MiB |",
              "|---|---|---|---|---|---|---|"]
    for n, res in r["sizes"].items():
        for m in res["dupes"]:
            lines.append(f"| {int(n):,} | {m['method']} | {m['seconds']:.1f} | {m['pairs']} | "
                         f"{m['recall_exact_pairs']:.3f} | {m['planted_found']:.3f} | {m['index_mib']:.0f} |")
    lines.append(f"\nPeak RSS of the run: {r['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vector_search", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--clusters", type=int, default=200)
    p.add_argument("--planted", type=int, default=200)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "vector_search")
    a = p.parse_args(argv)
    r = {"dim": a.dim, "clusters": a.clusters, "planted": a.planted, "queries": a.queries, "threshold": THRESHOLD,
         "machine": machine(), "sizes": {}}
    for n in a.sizes:
        x, planted = make_vectors(n, a.dim, a.clusters, a.planted, a.seed)
        print(f"N={n}: similar", flush=True)
        sim = bench_similar(x, a.queries, a.seed)
        print(f"N={n}: dupes", flush=True)
        r["sizes"][str(n)] = {"similar": sim, "dupes": bench_dupes(x, planted)}
    r["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_results(a.out, r, markdown(r))
    return 0


def write_results(out: Path, result: dict, md: str) -> None:
    """Print the table and write OUT.json (the numbers) and OUT.md (the table)."""
    print(md)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(md, encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
