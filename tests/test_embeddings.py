"""The image graph's second output `embedding` (issue 22): every precision carries it, PyTorch parity,
the text side, old bundles, and the embedding file pair (qks.runtime.embeddings)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TINY_SPEC
from runtime_fixtures import rewrite_manifest

# Gates, as export verifies them: fp32 against PyTorch (max abs error <= 1e-4 x scale); the reduced
# precisions against the fp32 graph with their query features' cosine gates.
GATES = {"fp32": None, "fp16": 0.999, "int8": 0.99}


@pytest.fixture(scope="module")
def full_bundle(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported with every CPU precision."""
    from qks.export.bundle import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("emb") / "bundle", fp16=True, int8=True)


def _pixels(n=5, size=32, seed=3):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _torch_embedding(ckpt, pixels):
    import torch
    from qks.export.graphs import image_embedding

    from qks.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
    with torch.no_grad():
        return image_embedding(model.backbone, model.image_tokens(torch.from_numpy(pixels))).numpy()


def test_manifest_records_the_embedding(full_bundle):
    from qks.runtime.bundle import Bundle

    m = json.loads((full_bundle / "manifest.json").read_text())
    rec = m["embedding"]
    assert rec["output"] == "embedding" and rec["dim"] == 32 and rec["normalized"] is True
    assert set(rec["graphs"]) == {"image_encoder", "image_encoder_fp16", "image_encoder_int8"}
    assert rec["text"] == {"graph": "label_encoder", "output": "text_features", "dims": 32, "normalize": True,
                           "rule": "L2-normalise the first `dims` values of text_features"}
    for name in rec["graphs"]:
        g = m["graphs"][name]
        assert [o["name"] for o in g["outputs"]] == ["query_features", "embedding"]
        assert g["outputs"][1]["shape"] == ["batch", 32]
        ver = [v["embedding"] for k, v in g["verification"].items() if isinstance(v, dict) and "embedding" in v]
        assert ver and all(v["cosine_min"] >= (GATES[g["precision"]] or 0.99999) for v in ver)
    b = Bundle.load(full_bundle)
    assert b.embedding_output == "embedding" and b.embedding_dim == 32 and b.text_embedding_rule() == (32, True)


@pytest.mark.parametrize("precision", list(GATES))
def test_every_precision_matches_pytorch(full_bundle, tiny_checkpoint, precision):
    from qks.runtime.backend import select_backend
    from qks.runtime.bundle import Bundle

    bundle = Bundle.load(full_bundle)
    pixels = _pixels()
    ref = _torch_embedding(tiny_checkpoint, pixels)
    engine, _ = select_backend(bundle, "ort-cpu", precision=precision)
    with engine:
        out = engine.run({"pixels": pixels})
    assert set(out) == {"query_features", "embedding"}
    emb = out["embedding"]
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
    if GATES[precision] is None:
        assert np.abs(emb - ref).max() <= 1e-4
    else:
        assert (emb * ref).sum(axis=1).min() >= GATES[precision]


def test_openvino_returns_the_embedding(full_bundle, tiny_checkpoint):
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'qks[openvino]')")
    from qks.runtime.backend import select_backend
    from qks.runtime.bundle import Bundle

    pixels = _pixels()
    engine, _ = select_backend(Bundle.load(full_bundle), "openvino", precision="fp32")
    with engine:
        emb = engine.run({"pixels": pixels})["embedding"]
    assert np.abs(emb - _torch_embedding(tiny_checkpoint, pixels)).max() <= 1e-4


def test_zero_shot_bundle_image_and_text_embeddings(tiny_backbone, tmp_path):
    """A zero-shot bundle: its image embedding is open_clip's normalised encode_image, and a text lands
    in the same space through the label graph (the manifest's rule) as open_clip's normalised text."""
    import torch
    import torch.nn.functional as F
    from qks.export.bundle import export_zero_shot
    from qks.runtime.bundle import Bundle
    from qks.runtime.search import embed_text

    out = export_zero_shot(TINY_SPEC, tmp_path / "zs", labels={"animals": ["cat", "dog"]})
    bundle = Bundle.load(out)
    assert bundle.text_embedding_rule() == (32, True)  # text_features is [N, 33]: scale * t, then the bias
    pixels = _pixels(3)
    with torch.no_grad():
        model = tiny_backbone.model
        ref_img = F.normalize(model.encode_image(torch.from_numpy(pixels)), dim=-1).numpy()
        ref_txt = F.normalize(model.encode_text(tiny_backbone.tokenize(["a dog on a beach"])), dim=-1).numpy()[0]
    from qks.runtime.backend import select_backend

    engine, _ = select_backend(bundle, "ort-cpu", precision="fp32")
    with engine:
        emb = engine.run({"pixels": pixels})["embedding"]
    assert np.abs(emb - ref_img).max() <= 1e-4
    assert np.abs(embed_text(bundle, "a dog on a beach") - ref_txt).max() <= 1e-4


def _strip_embedding(bundle_dir):
    """Make `bundle_dir` what an export before embeddings wrote: graphs without the output, no record."""
    import onnx
    from qks.runtime.manifest import file_record

    def edit(m):
        m.pop("embedding")
        for name, g in list(m["graphs"].items()):
            if not name.startswith("image_encoder"):
                continue
            proto = onnx.load(str(bundle_dir / g["file"]))
            keep = [o for o in proto.graph.output if o.name != "embedding"]
            del proto.graph.output[:]
            proto.graph.output.extend(keep)
            onnx.save(proto, str(bundle_dir / g["file"]))
            g["outputs"] = [o for o in g["outputs"] if o["name"] != "embedding"]
            g["dynamic_axes"].pop("embedding", None)
            m["files"][g["file"]] = file_record(bundle_dir, g["file"])
            g["sha256"] = m["files"][g["file"]]["sha256"]

    rewrite_manifest(bundle_dir, edit)


def test_old_bundle_tags_and_refuses_embeddings_in_one_line(runtime_bundle, tmp_path):
    from qks.runtime.backend import select_backend
    from qks.runtime.bundle import Bundle
    from qks.runtime.manifest import BundleError

    old = tmp_path / "old"
    shutil.copytree(runtime_bundle, old, ignore=shutil.ignore_patterns("cache"))
    _strip_embedding(old)
    bundle = Bundle.load(old)
    assert bundle.embedding_output is None
    for precision in ("fp32", "fp16"):
        engine, _ = select_backend(bundle, "ort-cpu", precision=precision)
        with engine:
            assert set(engine.run({"pixels": _pixels(2)})) == {"query_features"}  # still tags
    with pytest.raises(BundleError) as e:
        bundle.require_embedding()
    msg = str(e.value)
    assert "\n" not in msg and str(bundle.root) in msg and "re-export it with qks-export" in msg


# -- the file pair ---------------------------------------------------------------------------------


def _unit(n, d=8, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_save_load_round_trip(tmp_path):
    from qks.runtime.embeddings import load_embeddings, save_embeddings

    vec = _unit(3)
    npy, idx = save_embeddings(tmp_path / "emb.npy", ["a.jpg", "sub/b.png", "ü.heic"], vec,
                               {"root": "/photos", "bundle_sha256": "abc"})
    assert (npy.name, idx.name) == ("emb.npy", "emb.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.json", "emb.npy"]  # no temp files left
    for path in ("emb.npy", "emb.json", "emb"):
        names, got, meta = load_embeddings(tmp_path / path)
        assert names == ["a.jpg", "sub/b.png", "ü.heic"] and np.array_equal(got, vec)
        assert meta["root"] == "/photos" and meta["dim"] == 8 and meta["count"] == 3
    save_embeddings(tmp_path / "empty.npy", [], np.zeros((0, 8), np.float32))
    assert load_embeddings(tmp_path / "empty.npy")[0] == []


@pytest.mark.parametrize("names, vectors, match", [
    (["a", "b"], _unit(3), "3 vectors for 2 image names"),
    (["a", "a"], _unit(2), "appears twice"),
    (["a"], np.full((1, 4), np.nan, np.float32), "NaN"),
    (["a"], np.ones((1, 4), np.float32), "not L2-normalised"),
    (["a"], np.ones(4, np.float32), "2-D"),
])
def test_save_refuses_bad_input(tmp_path, names, vectors, match):
    from qks.runtime.embeddings import EmbeddingsError, save_embeddings

    with pytest.raises(EmbeddingsError, match=match):
        save_embeddings(tmp_path / "e.npy", names, vectors)
    assert not list(tmp_path.iterdir())


def test_load_refuses_a_mismatched_or_damaged_pair(tmp_path):
    from qks.runtime.embeddings import EmbeddingsError, load_embeddings, save_embeddings

    with pytest.raises(EmbeddingsError, match="not found"):
        load_embeddings(tmp_path / "none.npy")
    save_embeddings(tmp_path / "e.npy", ["a", "b"], _unit(2))
    np.save(tmp_path / "e.npy", _unit(2, seed=1))  # another array under the same index
    with pytest.raises(EmbeddingsError, match="not the array"):
        load_embeddings(tmp_path / "e.npy")
    (tmp_path / "e.json").write_text("{not json")
    with pytest.raises(EmbeddingsError, match="not a valid index"):
        load_embeddings(tmp_path / "e.npy")
    (tmp_path / "e.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(EmbeddingsError, match="not a qks embeddings index"):
        load_embeddings(tmp_path / "e.npy")
