"""qks-infer --embeddings: one L2-normalised row per tagged image, named in the index in record order,
equal to the image graph's own `embedding` output; --resume and --update keep the rows of images not run
again and give the rows of a full run; an old bundle without the output is refused in one line."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image
from qks.runtime.embeddings import load_embeddings
from runtime_fixtures import *  # noqa: F403


def _qks_infer(photo_library, bundle, *args):
    return qks_infer(photo_library, bundle, "--batch-size", "2", *args)  # noqa: F405


def test_embeddings_follow_the_records_and_the_graph(runtime_bundle, photo_library, tmp_path):
    import onnxruntime as ort
    from qks.runtime.bundle import Bundle

    out, emb = tmp_path / "tags.jsonl", tmp_path / "emb.npy"
    res = _qks_infer(photo_library, runtime_bundle, "--out", out, "--embeddings", emb)
    assert res.returncode == 1, res.stderr  # the broken image: an error record, and no row
    names, vectors, index = load_embeddings(emb)
    assert names == [r["image"] for r in read_jsonl(out) if "error" not in r]  # noqa: F405
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert index["root"] == str(photo_library) and index["dim"] == vectors.shape[1]
    bundle = Bundle.load(runtime_bundle)
    graph = bundle.graph("image_encoder")
    session = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
    pixels = bundle.preprocess.load(photo_library / names[0])[None]
    (direct,) = session.run(["embedding"], {session.get_inputs()[0].name: pixels})
    assert np.allclose(direct[0], vectors[0], atol=1e-5)


def test_update_and_resume_keep_rows_and_equal_a_full_run(runtime_bundle, photo_library, tmp_path):
    out, emb = tmp_path / "tags.jsonl", tmp_path / "emb.npy"
    assert _qks_infer(photo_library, runtime_bundle, "--out", out, "--embeddings", emb, "--exclude", "sub").returncode == 0
    Image.new("RGB", (50, 40), (30, 60, 200)).save(photo_library / "blue.png")
    (photo_library / "rocket.webp").unlink()
    res = _qks_infer(photo_library, runtime_bundle, "--out", out, "--embeddings", emb, "--exclude", "sub", "--update")
    assert res.returncode == 0 and "1 images tagged (0 errors, 1 unchanged, 1 removed)" in res.stderr, res.stderr
    full_out, full_emb = tmp_path / "full.jsonl", tmp_path / "full.npy"
    _qks_infer(photo_library, runtime_bundle, "--out", full_out, "--embeddings", full_emb, "--exclude", "sub")
    names, vectors, _ = load_embeddings(emb)
    full_names, full_vectors, _ = load_embeddings(full_emb)
    assert names == full_names == ["astronaut.jpg", "blue.png"]
    assert np.allclose(vectors, full_vectors, atol=1e-6)
    # an interrupted run resumed: rows of the first part kept, the rest added
    half = tmp_path / "half.jsonl"
    half.write_text(full_out.read_text().splitlines(keepends=True)[0])
    shutil.copy(tmp_path / "full.json", tmp_path / "half_emb.json")
    shutil.copy(full_emb, tmp_path / "half_emb.npy")
    res = _qks_infer(photo_library, runtime_bundle, "--out", half, "--embeddings", tmp_path / "half_emb.npy",
                     "--exclude", "sub", "--resume")
    assert res.returncode == 0, res.stderr
    assert load_embeddings(tmp_path / "half_emb.npy")[0] == full_names


def test_a_bundle_without_the_output_is_refused(runtime_bundle, photo_library, tmp_path):
    old = tmp_path / "old_bundle"
    shutil.copytree(runtime_bundle, old)
    # as exported before embeddings: the manifest has no embedding record
    rewrite_manifest(old, lambda m: m.pop("embedding"))  # noqa: F405
    res = _qks_infer(photo_library, old, "--out", tmp_path / "t.jsonl", "--embeddings", tmp_path / "e.npy")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "re-export it with qks-export" in res.stderr, \
        res.stderr
    assert not (tmp_path / "t.jsonl").exists()
