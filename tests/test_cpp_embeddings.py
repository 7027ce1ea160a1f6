"""libqks's image embedding (issue 22) through the C ABI: cpp/examples/embed_image.c (qks.h only) gives
the Python runtime's embedding of the same bundle and images, an error entry for an image it cannot
decode, and for a bundle exported before embeddings a status and one line, never a crash; the same under
AddressSanitizer/UBSan."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from cpp_fixtures import ASAN_BUILD, BUILD, make_broken_images, make_odd_images, run_tool, skip_reason
from test_cpp_abi import assert_clean

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb-images")
    make_odd_images(root / "odd")
    make_broken_images(root / "broken")
    return sorted((root / "odd").glob("*.jpg"))[:3] + sorted((root / "odd").glob("*.png"))[:2], root / "broken" / "text.jpg"


@pytest.fixture(scope="module")
def old_bundle(runtime_bundle, tmp_path_factory):
    """The bundle as an export before embeddings wrote it."""
    from test_embeddings import _strip_embedding

    old = tmp_path_factory.mktemp("old") / "bundle"
    shutil.copytree(runtime_bundle, old, ignore=shutil.ignore_patterns("cache"))
    _strip_embedding(old)
    return old


def _python_embeddings(bundle_dir, paths):
    from qks.runtime.backend import select_backend
    from qks.runtime.bundle import Bundle

    bundle = Bundle.load(bundle_dir)
    engine, _ = select_backend(bundle, "ort-cpu", precision="auto")  # the C++ side's auto: int8, else fp32
    with engine:
        return engine.run({"pixels": np.stack([bundle.preprocess.load(p) for p in paths])})["embedding"]


def _check(res, good, bad, ref):
    lines = res.stdout.splitlines()
    assert res.returncode == 1, res.stderr  # one image failed
    assert lines[-1] == f"{bad}: error: not a readable image (unidentified format)"
    rows = [json.loads(ln) for ln in lines[:-1]]
    assert [r["image"] for r in rows] == [str(p) for p in good]
    got = np.array([r["embedding"] for r in rows], np.float32)
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5  # same pixels, same graph
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)


def test_c_program_embeds_like_the_python_runtime(runtime_bundle, images):
    good, bad = images
    _check(run_tool(BUILD, "embed_image_c", [runtime_bundle, *good, bad]), good, bad,
           _python_embeddings(runtime_bundle, good))


def test_old_bundle_is_a_status_and_one_line(old_bundle, images):
    good, _bad = images
    res = run_tool(BUILD, "embed_image_c", [old_bundle, good[0]])
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == (f"embed_image: {old_bundle.resolve()}: this bundle has no image embedding output "
                          "(exported before embeddings); re-export it with qks-export\n")
    tag = run_tool(BUILD, "tag_image_c", [old_bundle, good[0]])  # it still tags
    assert tag.returncode == 0 and tag.stdout.count("\n") == 2, tag.stderr


def _qks_tag_pair(build, bundle, folder, out):
    """qks-tag --embeddings on `folder`; returns (run, names, vectors, index)."""
    from qks.runtime.embeddings import load_embeddings

    res = run_tool(build, "qks-tag", [folder, "--bundle", bundle, "--embeddings", out, "--out", out.with_suffix(".jsonl")],
                   timeout=600)
    return (res, *load_embeddings(out)) if res.returncode in (0, 1) else (res, None, None, None)


def test_qks_tag_writes_the_pair_qks_similar_reads(runtime_bundle, images, tmp_path):
    from qks.runtime.bundle import Bundle
    from qks.runtime.embeddings import embeddings_meta

    good, bad = images
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in [*good, bad]:
        shutil.copy(p, folder / p.name)
    res, names, vectors, index = _qks_tag_pair(BUILD, runtime_bundle, folder, tmp_path / "emb.npy")
    assert res.returncode == 1, res.stderr  # the broken image is an error record and has no row
    assert names == sorted(p.name for p in good)
    ref = _python_embeddings(runtime_bundle, [folder / n for n in names])
    assert np.abs(vectors - ref).max() <= 1e-5
    assert index["bundle_sha256"] == embeddings_meta(Bundle.load(runtime_bundle))["bundle_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.json", "emb.jsonl", "emb.npy", "photos"]


def test_qks_tag_refuses_embeddings_from_an_old_bundle(old_bundle, images, tmp_path):
    good, _bad = images
    res = run_tool(BUILD, "qks-tag", [good[0].parent, "--bundle", old_bundle, "--embeddings", tmp_path / "e.npy"])
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "re-export it with qks-export" in res.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(skip_reason(ASAN_BUILD) is not None, reason=skip_reason(ASAN_BUILD) or "")
def test_sanitizer_build(runtime_bundle, old_bundle, images, tmp_path):
    good, bad = images
    res = run_tool(ASAN_BUILD, "embed_image_c", [runtime_bundle, *good, bad], timeout=600)
    old = run_tool(ASAN_BUILD, "embed_image_c", [old_bundle, good[0]], timeout=600)
    for r in (res, old):
        assert_clean(r)
    _check(res, good, bad, _python_embeddings(runtime_bundle, good))
    assert old.returncode == 2 and "re-export it with qks-export" in old.stderr
    tag, names, vectors, _index = _qks_tag_pair(ASAN_BUILD, runtime_bundle, good[0].parent, tmp_path / "emb.npy")
    assert_clean(tag)
    assert len(names) == len(vectors) > 0
