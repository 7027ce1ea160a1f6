"""qks-export on the tiny open_clip config: the bundle contract, ONNX Runtime parity (fp32 and fp16),
dynamic batch, label banks, atomic writes, and one-line errors from the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxconverter_common")

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
FRUIT = ["apple", "banana split", "cherry pie", "Éclair", "东京 ramen"]


def _photos(dst: Path) -> Path:
    skimage = pytest.importorskip("skimage")
    data = Path(skimage.__file__).parent / "data"
    dst.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        shutil.copy(data / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    """One export through the CLI: fp16, a labels file, calibration photos."""
    root = tmp_path_factory.mktemp("export")
    labels = root / "fruit.txt"
    labels.write_text("# a comment\n" + "\n\n".join(FRUIT) + "\n", encoding="utf-8")
    r = _cli(["--ckpt", tiny_checkpoint, "--out", root / "bundle", "--labels", labels, "--fp16",
              "--calibration-images", _photos(root / "photos")])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.stdout and "image_encoder.fp16.onnx" in r.stdout
    return root / "bundle"


@pytest.fixture(scope="module")
def manifest(bundle):
    from qks.runtime.manifest import read_manifest

    return read_manifest(bundle)


@pytest.fixture(scope="module")
def model(tiny_checkpoint, tiny_backbone):
    from qks.checkpoint import model_from_checkpoint

    return model_from_checkpoint(tiny_checkpoint, backbone=tiny_backbone)


def _session(path):
    opts = ort.SessionOptions()
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["NchwcTransformer"])


# --------------------------------------------------------------------------- the bundle contract


def test_bundle_files_and_hashes(bundle, manifest):
    from qks.runtime.manifest import check_relpath, sha256_file

    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert on_disk == sorted([*manifest["files"], "manifest.json"])  # every file recorded, nothing else
    for rel, rec in manifest["files"].items():
        check_relpath(rel)
        assert rec["sha256"] == sha256_file(bundle / rel)
        assert rec["bytes"] == (bundle / rel).stat().st_size
    assert {"image_encoder.onnx", "image_encoder.fp16.onnx", "label_encoder.onnx", "tokenizer.json",
            "prompts.txt", "labels/default.npy", "labels/default.txt", "labels/fruit.npy",
            "labels/fruit.txt"} <= set(manifest["files"])
    assert not list(bundle.parent.glob(".bundle.tmp-*"))  # the temporary folder was renamed
    assert not [p for p in bundle.rglob("*") if p.suffix == ".data" or p.name.endswith(".tmp")]


def test_manifest_describes_the_model(manifest, tiny_checkpoint):
    from qks.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    m = manifest["model"]
    assert m["seen"] == ckpt["seen"] and m["unseen"] == ckpt["unseen"]
    assert (m["queries"], m["embed_dim"], m["layers"], m["token_dim"]) == (4, 32, 2, 64)
    assert m["config"] == ckpt["config"]
    pre = manifest["preprocess"]
    assert pre["size"] == 32 and pre["resize_mode"] == "shortest" and pre["interpolation"] == "bicubic"
    assert len(pre["mean"]) == 3 and len(pre["std"]) == 3
    assert manifest["tokenizer"]["file"] == "tokenizer.json"
    assert manifest["tokenizer"]["context_length"] == 77
    assert manifest["tokenizer"]["kind"] == "clip-bpe"
    assert manifest["tokenizer"]["verification"]["mismatches"] == 0
    assert manifest["prompts"] == {"file": "prompts.txt", "count": 2}
    assert manifest["scoring"] == {"mode": "max", "k": 1}
    assert manifest["engines"] == []
    for key in ("qks", "torch", "onnx", "onnxruntime", "open_clip", "tokenizers", "onnxconverter_common"):
        assert manifest["versions"][key]
    assert [p.name for p in map(Path, manifest["export"]["calibration_images"])] == sorted(PHOTOS)


def test_graph_records_match_the_onnx_files(bundle, manifest):
    expected = {
        "image_encoder": ("image_encoder.onnx", "fp32", [("pixels", "float32", ["batch", 3, 32, 32])],
                          [("query_features", "float32", ["batch", 4, 32]), ("embedding", "float32", ["batch", 32])]),
        "image_encoder_fp16": ("image_encoder.fp16.onnx", "fp16", [("pixels", "float32", ["batch", 3, 32, 32])],
                               [("query_features", "float32", ["batch", 4, 32]), ("embedding", "float32", ["batch", 32])]),
        "label_encoder": ("label_encoder.onnx", "fp32", [("token_ids", "int64", ["batch", 77])],
                          [("text_features", "float32", ["batch", 32])]),
    }
    assert set(manifest["graphs"]) == set(expected)
    dtypes = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}
    for name, (file, precision, ins, outs) in expected.items():
        g = manifest["graphs"][name]
        assert (g["file"], g["precision"]) == (file, precision)
        assert [(t["name"], t["dtype"], t["shape"]) for t in g["inputs"]] == ins
        assert [(t["name"], t["dtype"], t["shape"]) for t in g["outputs"]] == outs
        assert g["dynamic_axes"] == {t[0]: {"0": "batch"} for t in ins + outs}
        assert g["sha256"] == manifest["files"][file]["sha256"]
        proto = onnx.load(str(bundle / file))
        assert g["opset"] == max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
        for spec, value in zip(ins + outs, list(proto.graph.input) + list(proto.graph.output), strict=True):
            dims = value.type.tensor_type.shape.dim
            assert value.name == spec[0]
            assert dtypes[value.type.tensor_type.elem_type] == spec[1]
            assert dims[0].dim_param and not dims[0].HasField("dim_value")  # symbolic batch
            assert [d.dim_value for d in dims[1:]] == spec[2][1:]
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_recorded_verification_is_within_tolerance(manifest):
    g = manifest["graphs"]
    for name, outputs in (("image_encoder", ("random", "calibration")), ("label_encoder", ("random", "prompts"))):
        for kind in outputs:
            for met in g[name]["verification"][kind].values():  # the main output, and the embedding's
                assert met["samples"] > 0
                assert met["max_abs_err"] <= 1e-4 * met["scale"]
                assert met["cosine_min"] > 0.99999
    (bank,) = g["label_encoder"]["verification"]["default_bank"].values()
    assert bank["max_abs_err"] <= 1e-4 * bank["scale"]
    v16 = g["image_encoder_fp16"]["verification"]
    for kind in ("random", "calibration"):
        met = v16[kind]["query_features"]
        assert met["cosine_min"] >= 0.999 and met["top5_agreement"] >= 0.99
    assert v16["top5_agreement"] >= 0.99


# --------------------------------------------------------------------------- ONNX Runtime parity


def test_image_graph_matches_pytorch_fp32(bundle, model):
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref = model.query_features(pixels).numpy()
    got = _session(bundle / "image_encoder.onnx").run(None, {"pixels": pixels.numpy()})[0]
    assert got.dtype == np.float32 and got.shape == (5, 4, 32)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_zero_shot_head_exports_pairs_that_score_like_pytorch(tiny_backbone, tmp_path):
    """A head with the zero-shot term (CLS dropped for the head, kept for CLIP's embedding) exports
    [batch, Nq x 1, D] pair features; a max over them gives PyTorch's logits (head + w * zero-shot)."""
    from conftest import tiny_model_config
    from qks.export.bundle import export_bundle
    from qks.export.verify import scores
    from qks.runtime.manifest import read_manifest

    from qks.checkpoint import save_checkpoint
    from qks.model import QKSModel

    cfg = tiny_model_config(zero_shot=True)
    cfg.drop_cls = True
    torch.manual_seed(0)
    m = QKSModel(cfg, tiny_backbone).eval()
    m.head.zero_shot_weight.fill_(4.0)
    m.head.zero_shot_offset.copy_(torch.randn(32, generator=torch.Generator().manual_seed(7)) * 0.2)
    ckpt = save_checkpoint(tmp_path / "zs.pt", m, seen=["cat", "dog"], unseen=["bird"], prompts=["a {}."])
    export_bundle(ckpt, tmp_path / "bundle", log=lambda *_: None)
    man = read_manifest(tmp_path / "bundle")
    assert man["model"]["queries"] == 4 and man["model"]["config"]["head"]["zero_shot"] is True
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    emb = torch.randn(5, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = m(pixels, emb).numpy()
        plain = m.logits(m.head_features(m.image_tokens(pixels)), emb).numpy()
    got = _session(tmp_path / "bundle" / "image_encoder.onnx").run(None, {"pixels": pixels.numpy()})[0]
    assert got.shape == (3, 4, 32)
    np.testing.assert_allclose(scores(got, emb.numpy()), ref, rtol=1e-4, atol=1e-4)
    assert np.abs(ref - plain).max() > 0.1  # the zero-shot term is really in the graph


def test_projection_only_head_exports_one_feature_per_token(tiny_backbone, tmp_path):
    """A layers=0 checkpoint exports [batch, N_tokens, D] query features; the manifest and graph
    record the traced count, and ONNX Runtime matches PyTorch."""
    from conftest import tiny_model_config
    from qks.export.bundle import export_bundle
    from qks.runtime.manifest import read_manifest

    from qks.checkpoint import save_checkpoint
    from qks.model import QKSModel

    torch.manual_seed(0)
    m = QKSModel(tiny_model_config(layers=0), tiny_backbone).eval()
    ckpt = save_checkpoint(tmp_path / "proj.pt", m, seen=["cat", "dog"], unseen=["bird"], prompts=["a {}."])
    export_bundle(ckpt, tmp_path / "bundle", log=lambda *_: None)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = m.query_features(pixels).numpy()
    n_tokens = tiny_backbone.image_tokens(pixels[:1]).shape[1]
    assert ref.shape == (3, n_tokens, 32) and n_tokens != 4  # not the config's (unused) query count
    man = read_manifest(tmp_path / "bundle")
    assert man["model"]["queries"] == n_tokens and man["model"]["layers"] == 0
    assert man["graphs"]["image_encoder"]["outputs"][0]["shape"] == ["batch", n_tokens, 32]
    got = _session(tmp_path / "bundle" / "image_encoder.onnx").run(None, {"pixels": pixels.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_label_graph_matches_pytorch(bundle, tiny_backbone):
    ids = tiny_backbone.tokenize(["a photo of a zebra.", "x", "two words", "a " * 90])
    with torch.no_grad():
        ref = tiny_backbone.encode_text(ids).numpy()
    got = _session(bundle / "label_encoder.onnx").run(None, {"token_ids": ids.numpy()})[0]
    assert got.shape == (4, 32)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_fp16_graph(bundle, model):
    proto = onnx.load(str(bundle / "image_encoder.fp16.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer) > 10
    # LayerNormalization and Softmax compute in FP32: their inputs come from float32 values
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    for init in proto.graph.initializer:
        types[init.name] = init.data_type
    kept = [n for n in proto.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert kept
    for node in kept:
        assert types.get(node.input[0]) == onnx.TensorProto.FLOAT, node.name
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model.query_features(pixels).numpy()
    got = _session(bundle / "image_encoder.fp16.onnx").run(None, {"pixels": pixels.numpy()})[0]
    assert got.dtype == np.float32
    cos = (got * ref).reshape(4, -1).sum(1) / (np.linalg.norm(got.reshape(4, -1), axis=1)
                                               * np.linalg.norm(ref.reshape(4, -1), axis=1))
    assert cos.min() >= 0.999
    assert np.abs(got - ref).max() > 0  # really a different (FP16) computation


@pytest.mark.parametrize("graph", ["image_encoder.onnx", "image_encoder.fp16.onnx", "label_encoder.onnx"])
def test_dynamic_batch(bundle, tiny_backbone, graph):
    sess = _session(bundle / graph)
    name = sess.get_inputs()[0].name
    if name == "pixels":
        full = np.random.default_rng(3).standard_normal((8, 3, 32, 32)).astype(np.float32)
    else:
        full = tiny_backbone.tokenize([f"label number {i}" for i in range(8)]).numpy()
    whole = sess.run(None, {name: full})[0]
    assert whole.shape[0] == 8
    tol = 1e-2 if "fp16" in graph else 1e-5
    for b in (1, 3, 8):
        out = sess.run(None, {name: full[:b]})[0]
        assert out.shape == (b, *whole.shape[1:])
        np.testing.assert_allclose(out, whole[:b], atol=tol, rtol=0)  # rows do not depend on the batch


# --------------------------------------------------------------------------- label banks


def test_label_banks_are_label_embedder_means(bundle, manifest, tiny_backbone, tiny_checkpoint):
    from qks.runtime.manifest import bank_key

    from qks.checkpoint import load_checkpoint
    from qks.prompts import LabelEmbedder

    ckpt = load_checkpoint(tiny_checkpoint)
    prompts = (bundle / "prompts.txt").read_text(encoding="utf-8").splitlines()
    assert prompts == ckpt["prompts"]
    embed = LabelEmbedder(tiny_backbone, prompts)
    for name, names in (("default", ckpt["seen"] + ckpt["unseen"]), ("fruit", FRUIT)):
        rec = manifest["label_banks"][name]
        arr = np.load(bundle / rec["file"], allow_pickle=False)
        assert arr.dtype == np.float32 and list(arr.shape) == rec["shape"] == [len(names), 32]
        assert (bundle / rec["names_file"]).read_text(encoding="utf-8").splitlines() == names
        np.testing.assert_allclose(arr, embed(names).numpy(), atol=1e-6, rtol=0)
        assert rec["key"] == bank_key(manifest["graphs"]["label_encoder"]["sha256"],
                                      manifest["files"]["prompts.txt"]["sha256"], names)


def test_runtime_path_recomputes_a_bank(bundle, manifest):
    """tokenizer.json + label_encoder.onnx + mean over prompts (what the runtime does for new labels,
    with no torch) gives the exported bank."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    sess = _session(bundle / "label_encoder.onnx")
    prompts = (bundle / "prompts.txt").read_text(encoding="utf-8").splitlines()
    bank = np.load(bundle / "labels/fruit.npy")
    for i, label in enumerate(FRUIT):
        ids = np.array([e.ids for e in tok.encode_batch([p.format(label) for p in prompts])], dtype=np.int64)
        vec = sess.run(None, {"token_ids": ids})[0].mean(axis=0)
        np.testing.assert_allclose(vec, bank[i], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- failures


def test_failed_export_leaves_the_old_bundle_and_no_temp(bundle, tiny_checkpoint, tmp_path, monkeypatch):
    """Verification past tolerance fails with one line; the temp folder is removed and a bundle
    already at `out` is untouched."""
    from qks.export import verify
    from qks.export.bundle import export_bundle
    from qks.export.errors import ExportError

    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(verify, "FP32_REL_TOL", 1e-15)
    with pytest.raises(ExportError) as err:
        export_bundle(tiny_checkpoint, out)
    msg = str(err.value)
    assert "verification failed" in msg and "image_encoder" in msg and "\n" not in msg
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_bad_labels_and_outputs_are_refused(tiny_checkpoint, tmp_path):
    from qks.export.bundle import export_bundle
    from qks.export.errors import ExportError

    cases = [
        (dict(labels={"default": ["x"]}), "reserved"),
        (dict(labels={"../evil": ["x"]}), "label bank name"),
        (dict(labels={"dup": ["a", "a"]}), "duplicate label"),
        (dict(labels={"empty": []}), "no labels"),
        (dict(max_batch=0), "max-batch"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ExportError, match=words):
            export_bundle(tiny_checkpoint, tmp_path / "b", **kwargs)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a qks bundle"):
        export_bundle(tiny_checkpoint, tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="opset"):
        export_bundle(tiny_checkpoint, tmp_path / "b", opset=13)
    assert not (tmp_path / "b").exists()


def _cli(args):
    from click.testing import CliRunner
    from qks.export.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result):
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("qks-export: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_errors_are_one_line(tiny_checkpoint, tmp_path):
    r = _cli(["--ckpt", tmp_path / "missing.pt", "--out", tmp_path / "b"])
    assert r.exit_code == 1 and "checkpoint not found" in _one_error_line(r)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    r = _cli(["--ckpt", garbage, "--out", tmp_path / "b"])
    assert r.exit_code == 1 and "not a loadable qks checkpoint" in _one_error_line(r)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    r = _cli(["--ckpt", tiny_checkpoint, "--out", tmp_path / "b", "--labels", empty])
    assert r.exit_code == 1 and "has no labels" in _one_error_line(r)

    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00cat")
    r = _cli(["--ckpt", tiny_checkpoint, "--out", tmp_path / "b", "--labels", binary])
    assert r.exit_code == 1 and "not UTF-8" in _one_error_line(r)

    r = _cli(["--ckpt", tiny_checkpoint, "--out", tmp_path / "b", "--labels", tmp_path / "nope.txt"])
    assert r.exit_code == 1 and "labels file not found" in _one_error_line(r)

    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli(["--ckpt", tiny_checkpoint, "--out", blocker / "bundle"])
    assert r.exit_code == 1 and "does not exist" in _one_error_line(r)

    r = _cli(["--ckpt", tiny_checkpoint, "--out", blocker])
    assert r.exit_code == 1 and "not a folder" in _one_error_line(r)

    r = _cli(["--ckpt", tiny_checkpoint, "--out", tmp_path / "b", "--calibration-images", tmp_path / "none"])
    assert r.exit_code == 1 and "calibration images" in _one_error_line(r)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.jpg").write_bytes(b"not a jpeg")
    r = _cli(["--ckpt", tiny_checkpoint, "--out", tmp_path / "b", "--calibration-images", broken])
    assert r.exit_code == 1 and "cannot read" in _one_error_line(r) and "bad.jpg" in _one_error_line(r)
    assert not (tmp_path / "b").exists()


def test_missing_optional_dependency_names_the_extra(tiny_checkpoint, tmp_path, monkeypatch):
    import importlib.util

    from qks.export.bundle import export_bundle
    from qks.export.errors import ExportError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxconverter_common" else real(name, *a))
    with pytest.raises(ExportError, match=r"needs onnxconverter_common: pip install 'qks\[export\]'"):
        export_bundle(tiny_checkpoint, tmp_path / "b", fp16=True)
    assert not (tmp_path / "b").exists()


def test_fp16_gates_fail_loudly():
    """The FP16 gates (cosine, top-5 agreement) on synthetic scores: one-line failures."""
    from qks.export import verify
    from qks.export.errors import ExportError

    rng = np.random.default_rng(0)
    qf = rng.standard_normal((6, 4, 16)).astype(np.float32)
    bank = rng.standard_normal((20, 16)).astype(np.float32)
    s = verify.scores(qf, bank)
    assert s.shape == (6, 20)
    np.testing.assert_allclose(s, np.einsum("bqd,ld->bql", qf, bank).max(axis=1), rtol=1e-5, atol=1e-5)
    assert verify.topk_agreement(s, s) == 1.0
    assert verify.topk_agreement(s, -s) == 0.0  # top-5 of 20 reversed: no overlap
    m = verify.compare(qf + 1e-4, qf, queries=True)
    assert m["cosine_min"] > 0.9999 and m["max_abs_err"] == pytest.approx(1e-4, rel=1e-2)
    verify.check_fp16("g", "random", m, 1.0)
    noisy = verify.compare(qf + rng.standard_normal(qf.shape).astype(np.float32), qf)
    with pytest.raises(ExportError, match="cosine vs fp32") as err:
        verify.check_fp16("g", "random", noisy, 1.0)
    assert "\n" not in str(err.value)
    with pytest.raises(ExportError, match="top-5 label agreement"):
        verify.check_fp16("g", "random", m, 0.9)
    with pytest.raises(ExportError, match="non-finite"):
        verify.check_fp16("g", "random", verify.compare(np.full_like(qf, np.inf), qf), 1.0)


def test_label_cache_is_used_and_spot_checked(tiny_checkpoint, tiny_backbone, tmp_path):
    """Export reads qks-train's label cache (no re-embedding); a wrong cached vector is caught by
    the bank check through tokenizer.json + label_encoder.onnx."""
    from qks.export.bundle import export_bundle
    from qks.export.errors import ExportError

    from qks.checkpoint import load_checkpoint
    from qks.prompts import label_key

    ckpt = load_checkpoint(tiny_checkpoint)
    cache = tmp_path / "label_cache"
    cache.mkdir()
    key = label_key(tiny_backbone.text_fingerprint(), ckpt["prompts"], ckpt["seen"][0])
    np.save(cache / f"{key}.npy", np.full(32, 7.0, dtype=np.float32))
    with pytest.raises(ExportError, match="verification failed: label_encoder label bank"):
        export_bundle(tiny_checkpoint, tmp_path / "b", label_cache=cache)
    assert not (tmp_path / "b").exists()
