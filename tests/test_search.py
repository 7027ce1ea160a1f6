"""qks-similar and qks-dupes (qks.runtime.search) on real photos embedded by the lite backbone's real
weights: planted re-encodes, crops and resizes found, different photos kept apart, text and image-file
queries, both vector backends, and bad input as one-line errors."""

from __future__ import annotations

import importlib.util
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_fixtures import photo

HAS_FAISS = importlib.util.find_spec("faiss") is not None
ORIGINALS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def lite_bundle(lite_zero_shot_bundle):
    return lite_zero_shot_bundle


def _copies(img):
    """A JPEG re-encode, a centred crop to 90 % and a half-size copy."""
    w, h = img.size
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=60)
    buf.seek(0)
    from PIL import Image

    return {"q60": Image.open(buf).convert("RGB"), "crop90": img.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
            "half": img.resize((w // 2, h // 2), Image.BICUBIC)}


@pytest.fixture(scope="module")
def library(lite_bundle, tmp_path_factory):
    """Four photos, one planted copy each of three of them (chelsea has none), embedded the way
    qks-infer --embeddings does; returns (root, emb.npy)."""
    from qks.runtime.backend import select_backend
    from qks.runtime.bundle import Bundle
    from qks.runtime.embeddings import embeddings_meta, save_embeddings

    root = tmp_path_factory.mktemp("library")
    images = {}
    for name in ORIGINALS:
        img = photo(name).convert("RGB")
        img.thumbnail((320, 320))
        images[f"{name}.jpg"] = img
    plant = {"astronaut": "q60", "coffee": "crop90", "rocket": "half"}
    for name, kind in plant.items():
        images[f"copies/{name}_{kind}.jpg"] = _copies(images[f"{name}.jpg"])[kind]
    (root / "copies").mkdir()
    for rel, img in images.items():
        img.save(root / rel, quality=92)
    bundle = Bundle.load(lite_bundle)
    engine, _ = select_backend(bundle, "ort-cpu", precision="fp32")
    with engine:
        pixels = np.stack([bundle.preprocess.load(root / rel) for rel in images])
        vectors = engine.run({"pixels": pixels})["embedding"]
    npy, _ = save_embeddings(root / "emb.npy", list(images), vectors, embeddings_meta(bundle, root))
    return root, npy


def _run(cmd, args):
    r = CliRunner().invoke(cmd, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _lines(out):
    return [json.loads(ln) for ln in out.splitlines() if ln.strip()]


@pytest.mark.parametrize("vectors", ["numpy", pytest.param("faiss", marks=pytest.mark.skipif(
    not HAS_FAISS, reason="faiss-cpu is not installed (pip install 'qks[library]')"))])
def test_dupes_groups_the_planted_copies_only(library, vectors):
    from qks.runtime.search import dupes_main

    _root, npy = library
    code, out, err = _run(dupes_main, [npy, "--vectors", vectors])
    assert code == 0, err
    groups = {frozenset(g["images"]) for g in _lines(out)}
    assert groups == {frozenset({"astronaut.jpg", "copies/astronaut_q60.jpg"}),
                      frozenset({"coffee.jpg", "copies/coffee_crop90.jpg"}),
                      frozenset({"rocket.jpg", "copies/rocket_half.jpg"})}
    assert all(g["min_cosine"] >= 0.95 and g["size"] == 2 for g in _lines(out))
    assert "3 groups" in err and ("exact" if vectors == "numpy" else "approximate") in err
    code, out, _ = _run(dupes_main, [npy, "--threshold", "1", "--format", "plain", "--vectors", vectors])
    assert code == 0 and out == ""


def test_similar_to_an_indexed_image_and_to_a_new_file(library, tmp_path):
    from qks.runtime.search import similar_main

    root, npy = library
    code, out, err = _run(similar_main, [npy, "coffee.jpg", "-k", "3"])
    assert code == 0, err
    hits = _lines(out)
    assert [h["rank"] for h in hits] == [1, 2, 3] and "coffee.jpg" not in [h["image"] for h in hits]
    assert hits[0]["image"] == "copies/coffee_crop90.jpg" and hits[0]["cosine"] >= hits[1]["cosine"]
    new = tmp_path / "chelsea_crop.png"  # not in the index: embedded with the index's bundle
    _copies(photo("chelsea").convert("RGB"))["crop90"].save(new)
    code, out, err = _run(similar_main, [npy, new, "-k", "1", "--format", "plain"])
    assert code == 0, err
    cos, name = out.split()
    assert name == "chelsea.jpg" and float(cos) > 0.95


def test_similar_to_a_text(library):
    from qks.runtime.search import similar_main

    _root, npy = library
    code, out, err = _run(similar_main, [npy, "--text", "a photo of a cat", "-k", "2"])
    assert code == 0, err
    hits = _lines(out)
    assert hits[0]["image"] == "chelsea.jpg" and hits[0]["query"] == "text:a photo of a cat"


def test_bad_input_is_one_line(library, runtime_bundle, tmp_path):
    from qks.runtime.search import dupes_main, similar_main

    root, npy = library
    cases = [
        (dupes_main, [tmp_path / "none.npy"], "not found"),
        (similar_main, [npy], "give one query"),
        (similar_main, [npy, "coffee.jpg", "--text", "cup"], "give one query"),
        (similar_main, [npy, "nowhere.jpg"], "neither an image of the index nor an image file"),
        (similar_main, [npy, root / "emb.json"], "emb.json: not a readable image"),  # a file that is not an image
        (similar_main, [npy, "--text", "a cat", "--bundle", runtime_bundle], "another model"),
    ]
    for cmd, args, match in cases:
        code, out, err = _run(cmd, args)
        assert code == 2 and out == "", (args, out)
        assert err.count("\n") == 1 and match in err and "Traceback" not in err, (args, err)


def test_numpy_pairs_span_blocks(monkeypatch):
    """The exact all-pairs search works block by block: pairs inside a block, across blocks and in the last
    (partial) block all come back, each once, with their cosines."""
    from qks.runtime import vectors

    monkeypatch.setattr(vectors, "BLOCK", 4)
    x = np.random.default_rng(1).standard_normal((11, 32)).astype(np.float32)
    for i, j in ((1, 2), (3, 9), (9, 10)):  # within block 0, across blocks 0 and 2, within the last block
        x[j] = x[i] + 0.01 * np.random.default_rng(j).standard_normal(32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    want = [(i, j) for i in range(11) for j in range(i + 1, 11) if sims[i, j] >= 0.9]
    got = vectors.NumpyIndex(x).pairs_above(0.9)
    assert [(i, j) for i, j, _c in got] == want and len(want) >= 3
    assert [c for _i, _j, c in got] == pytest.approx([float(sims[i, j]) for i, j in want], abs=1e-6)


def test_vector_backends_agree(tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'qks[library]')")
    from qks.runtime.vectors import FaissIndex, NumpyIndex, connected_groups

    x = np.random.default_rng(0).standard_normal((3000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[1] = x[0] + 0.01 * x[2]
    x[1] /= np.linalg.norm(x[1])
    q = x[:50]
    s_np, i_np = NumpyIndex(x).search(q, 10)
    s_f, i_f = FaissIndex(x).search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_np, i_f, strict=True)])
    assert recall >= 0.9 and i_np[0, 0] == 0 and i_np[0, 1] == 1
    assert np.all(np.diff(s_np, axis=1) <= 0)
    for index in (NumpyIndex(x), FaissIndex(x)):
        assert connected_groups(len(x), index.pairs_above(0.9)) == [([0, 1], pytest.approx(float(x[0] @ x[1]), abs=1e-5),
                                                                    pytest.approx(float(x[0] @ x[1]), abs=1e-5))]
