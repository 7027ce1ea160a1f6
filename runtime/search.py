"""`qks-similar` and `qks-dupes`: search the embeddings `qks-infer --embeddings OUT.npy` wrote.

qks-similar OUT.npy QUERY | --text "a dog on a beach" [--top-k 10]
    QUERY: an image of the index (its name as qks-infer wrote it), or any image file, embedded with the
    bundle (--bundle, default: the one the index was made with). --text embeds the text with the bundle's
    label graph (qks.runtime.bundle.Bundle.text_embedding_rule) into the same space.
qks-dupes OUT.npy [--threshold 0.97]
    Groups of near-duplicates: connected components of the pairs with cosine >= threshold.

Output: JSONL (default) or plain text. Errors: one line on stderr, exit 2; never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from ..engines.base import EngineError
from .backend import BACKENDS as ENGINE_BACKENDS
from .bundle import Bundle
from .cli import _fail
from .embeddings import EmbeddingsError, embeddings_meta, load_embeddings, text_embedding
from .manifest import BundleError
from .preprocess import PreprocessError
from .vectors import BACKENDS, VectorError, connected_groups, open_index

# qks-dupes' default cosine threshold (benchmarks/near_duplicates.py; RESULTS.md, "Near-duplicates"), measured
# with the lite backbone on scikit-image's photos: JPEG re-encodes (q50), crops to 85-90 % and half-size
# copies stay at or above 0.98, different photos at or below 0.948, and from 0.97 up no group joins two
# photos through a copy (at 0.95-0.96 one or two do). Its embedding is semantic: two scenes of the same
# cut-out on another plain background reach 0.99+, which no threshold separates from a copy. No CLIP
# weights are available offline to measure a CLIP tower.
DUPES_THRESHOLD = 0.97
_ERRORS = (BundleError, EmbeddingsError, EngineError, PreprocessError, VectorError, OSError)


# -- queries --------------------------------------------------------------------------------------


def _bundle_for(index: dict, bundle_dir: Path | None, what: str) -> Bundle:
    """--bundle, else the bundle the index was made with; it must have made these vectors."""
    path = bundle_dir or (Path(index["bundle"]) if index.get("bundle") else None)
    if path is None:
        raise BundleError(f"{what} needs the bundle: pass --bundle")
    bundle = Bundle.load(path)
    mine = embeddings_meta(bundle)["bundle_sha256"]
    if index.get("bundle_sha256") not in (None, mine):
        raise BundleError(f"the embeddings were made with another model than {bundle.root} "
                          "(image graph sha256 differs): use that bundle, or rerun qks-infer --embeddings")
    return bundle


def embed_image(bundle: Bundle, path: Path, backend: str = "auto") -> np.ndarray:
    """[D]: the bundle's embedding of one image file."""
    from .backend import select_backend

    out_name = bundle.require_embedding()
    try:
        pixels = bundle.preprocess.load(path)[None]
    except PreprocessError as e:
        raise PreprocessError(f"{path}: {e}") from None
    engine, _reason = select_backend(bundle, backend)
    with engine:
        return engine.run({engine.inputs[0].name: pixels})[out_name][0]


def embed_text(bundle: Bundle, text: str) -> np.ndarray:
    """[D]: the text's embedding in the image embedding's space (the label graph's text_features, the
    manifest's rule: first `dims` values, L2-normalised)."""
    from .labels import label_engine, tokenize

    dims, normalize = bundle.text_embedding_rule()
    ids, mask = tokenize(bundle, [text])
    with label_engine(bundle) as engine:
        feeds = {"token_ids": ids}
        if "attention_mask" in {i.name for i in engine.inputs}:
            feeds["attention_mask"] = mask
        features = engine.run(feeds)[engine.outputs[0].name]
    head = features[0, :dims]
    if not np.isfinite(head).all() or not head.any():
        raise EngineError("the label graph gave a zero or non-finite text embedding")
    return text_embedding(features[:1], dims, normalize)[0]


def _query_vector(names, vectors, index, query, text, bundle_dir, backend) -> tuple[np.ndarray, str, int | None]:
    """(query vector, what it is for the output, its row in the index or None)."""
    if text is not None:
        return embed_text(_bundle_for(index, bundle_dir, "--text"), text), f"text:{text}", None
    rows = {n: i for i, n in enumerate(names)}
    if query in rows:
        return vectors[rows[query]], query, rows[query]
    path = Path(query)
    if not path.is_file():
        raise EmbeddingsError(f"{query!r} is neither an image of the index nor an image file")
    return embed_image(_bundle_for(index, bundle_dir, "an image file query"), path, backend), str(path), None


# -- commands -------------------------------------------------------------------------------------

_EMB = click.argument("embeddings", type=click.Path(dir_okay=False, path_type=Path))
_FORMAT = click.option("--format", "fmt", type=click.Choice(["jsonl", "plain"]), default="jsonl", show_default=True)
_VECTORS = click.option("--vectors", "vector_backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                        help="Search backend: exact numpy, or FAISS HNSW (approximate); auto picks by size.")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_EMB
@click.argument("query", required=False)
@click.option("--text", help="A text query, embedded with the bundle's text graph.")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Bundle for --text or an image-file query (default: the one the embeddings were made with).")
@click.option("--top-k", "-k", type=click.IntRange(1), default=10, show_default=True)
@click.option("--backend", type=click.Choice(ENGINE_BACKENDS), default="auto",
              show_default=True, help="Engine that embeds an image-file query.")
@_FORMAT
@_VECTORS
def similar_main(embeddings, query, text, bundle_dir, top_k, backend, fmt, vector_backend):
    """The images nearest to QUERY (an image of the index, or an image file) or to --text, by cosine."""
    prog = "qks-similar"
    if (query is None) == (text is None):
        _fail(prog, "give one query: an image (name in the index or a file) or --text")
    try:
        names, vectors, index = load_embeddings(embeddings)
        if not names:
            raise EmbeddingsError(f"{embeddings} holds no images")
        qv, what, row = _query_vector(names, vectors, index, query, text, bundle_dir, backend)
        idx = open_index(vectors, vector_backend)
        scores, ids = idx.search(qv[None], top_k + (row is not None))
    except _ERRORS as e:
        _fail(prog, str(e) or type(e).__name__)
    hits = [(int(i), float(c)) for i, c in zip(ids[0], scores[0], strict=True) if i >= 0 and i != row][:top_k]
    for rank, (i, c) in enumerate(hits, 1):
        if fmt == "jsonl":
            click.echo(json.dumps({"query": what, "rank": rank, "image": names[i], "cosine": round(c, 6)},
                                  ensure_ascii=False))
        else:
            click.echo(f"{c:.4f}  {names[i]}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_EMB
@click.option("--threshold", type=click.FloatRange(-1, 1), default=DUPES_THRESHOLD, show_default=True,
              help="Cosine at or above which two images are near-duplicates.")
@click.option("--neighbours", type=click.IntRange(2), default=16, show_default=True,
              help="FAISS: nearest neighbours examined per image.")
@_FORMAT
@_VECTORS
def dupes_main(embeddings, threshold, neighbours, fmt, vector_backend):
    """Groups of near-duplicate images: every image joined to another at cosine >= --threshold."""
    prog = "qks-dupes"
    try:
        names, vectors, _index = load_embeddings(embeddings)
        idx = open_index(vectors, vector_backend, all_pairs=True) if names else None
        pairs = idx.pairs_above(threshold, neighbours) if idx else []
    except _ERRORS as e:
        _fail(prog, str(e) or type(e).__name__)
    groups = connected_groups(len(names), pairs)
    for g, (rows, lo, hi) in enumerate(groups, 1):
        images = [names[i] for i in rows]
        if fmt == "jsonl":
            click.echo(json.dumps({"group": g, "size": len(rows), "images": images, "min_cosine": round(lo, 6),
                                   "max_cosine": round(hi, 6)}, ensure_ascii=False))
        else:
            click.echo(f"group {g} ({len(rows)} images, cosine {lo:.4f}-{hi:.4f})")
            for name in images:
                click.echo(f"  {name}")
    method = f"{idx.name} ({'exact' if idx.exact else 'approximate'})" if idx else "none"
    click.echo(f"{prog}: {len(groups)} groups, {sum(len(r) for r, _, _ in groups)} images, threshold {threshold:g}, "
               f"{len(names)} searched with {method}", err=True)
