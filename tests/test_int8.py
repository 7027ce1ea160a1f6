"""INT8 image graphs: quantization of the tiny bundle's image graph, its parity record in the
manifest, the gate refusing a broken graph, and the runtime picking the INT8 graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qks.engines.base import EngineError
from qks.export.errors import ExportError
from qks.export.int8 import (
    GRAPH_FILE,
    GRAPH_NAME,
    add_int8_graph,
    int8_summary,
    quantize_image_encoder,
    verify_int8,
)
from qks.export.verify import ort_session
from qks.runtime.backend import select_backend
from qks.runtime.bundle import Bundle
from runtime_fixtures import *  # noqa: F403
from runtime_fixtures import PHOTOS, photo


@pytest.fixture(scope="module")
def clean_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8-photos")
    for name in PHOTOS:
        photo(name).save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def int8_bundle(runtime_bundle, clean_photos, tmp_path_factory):
    import shutil

    dst = tmp_path_factory.mktemp("int8") / "bundle"
    shutil.copytree(runtime_bundle, dst, ignore=shutil.ignore_patterns("cache"))
    add_int8_graph(dst, clean_photos)
    return dst


def test_int8_graph_is_recorded_with_its_parity(int8_bundle):
    m = json.loads((int8_bundle / "manifest.json").read_text())
    rec = m["graphs"][GRAPH_NAME]
    assert rec["file"] == GRAPH_FILE and rec["precision"] == "int8" and rec["source"] == "image_encoder"
    assert rec["inputs"] == m["graphs"]["image_encoder"]["inputs"]
    assert rec["outputs"] == m["graphs"]["image_encoder"]["outputs"]
    assert m["files"][GRAPH_FILE]["sha256"] == rec["sha256"]
    ver = rec["verification"]
    assert ver["reference"] == "image_encoder (fp32 ONNX)"
    assert set(ver["tolerance"]) == {"cosine_min", "top5_agreement_min"}
    for kind, n in (("random", 8), ("calibration", len(PHOTOS))):
        q = ver[kind]["query_features"]
        assert q["samples"] == n and q["finite"] and q["bank"] == "default"
        assert ver["tolerance"]["cosine_min"] <= q["cosine_min"] <= 1.0 + 1e-9
        assert 0.0 <= q["top5_agreement"] <= 1.0 and q["max_abs_err"] >= 0
    assert ver["top5_agreement"] >= ver["tolerance"]["top5_agreement_min"]
    assert sorted(ver["calibration_images"]) == sorted(f"{p}.png" for p in PHOTOS)
    ops = rec["int8"]
    assert ops["integer_ops"]["MatMulInteger"] > 0 and ops["integer_ops"]["DynamicQuantizeLinear"] > 0
    assert "Gemm" not in ops["float_ops_left"] and ops["method"] == "dynamic" and ops["per_channel"]
    assert ops["scope"] == "tokens" and ops["fuse_gelu"] and sum(ops["fused_ops"].values()) > 0
    # the fused graph: the trunk's 2 attentions as QAttention (INT8 QKV product), the head's 2
    # self-attentions fp32 (the query path stays fp32), its 2 cross-attentions as MultiHeadAttention
    assert ops["fuse"] and "rejected" not in ops
    assert ops["integer_ops"]["QAttention"] == 2 and ops["fused_ops"]["Attention"] == 2
    assert ops["fused_ops"]["MultiHeadAttention"] == 2 and ops["fused_ops"]["BiasGelu"] == 4
    Bundle.load(int8_bundle)  # the manifest still checks (sha256 of every file)


def test_runtime_picks_the_int8_graph_on_the_cpu(int8_bundle, clean_photos):
    bundle = Bundle.load(int8_bundle)
    engine, reason = select_backend(bundle, "ort-cpu", threads=1)
    with engine:
        assert GRAPH_FILE in reason and engine.precision == "int8"
        pixels = np.stack([bundle.preprocess.load(clean_photos / f"{p}.png") for p in PHOTOS])
        qf = engine.run({"pixels": pixels})["query_features"]
    ref = ort_session(bundle.graphs["image_encoder"].path).run(None, {"pixels": pixels})[0]
    assert qf.shape == ref.shape and np.isfinite(qf).all()
    cos = (qf * ref).sum(-1) / np.linalg.norm(qf, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.99
    engine, reason = select_backend(bundle, "ort-cpu", threads=1, precision="fp32")
    with engine:
        assert engine.precision == "fp32" and "image_encoder.onnx" in reason


def test_missing_precision_is_one_line(runtime_bundle):
    with pytest.raises(EngineError, match="no int8 image graph .*qks-export --int8"):
        select_backend(Bundle.load(runtime_bundle), "ort-cpu", precision="int8")
    engine, _ = select_backend(Bundle.load(runtime_bundle), "ort-cpu", threads=1)  # auto without int8: fp32
    with engine:
        assert engine.precision == "fp32"


def test_a_broken_int8_graph_fails_the_gate(int8_bundle, tmp_path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(int8_bundle / GRAPH_FILE))
    rng = np.random.default_rng(0)
    for i, t in enumerate(model.graph.initializer):  # scramble every int8 weight
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2:
            w = rng.integers(-127, 128, size=tuple(t.dims), dtype=np.int8)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, t.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    bundle = Bundle.load(int8_bundle)
    pixels = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref = ort_session(bundle.graphs["image_encoder"].path).run(None, {"pixels": pixels})[0]
    bank = np.load(bundle.banks["default"].path)
    with pytest.raises(ExportError, match="verification failed: image_encoder_int8 query-feature cosine"):
        verify_int8(broken, {"random": pixels}, {"random": ref}, bank)
    # the intact graph passes the same gate, and a bank of 40 labels makes top-5 agreement non-trivial
    big_bank = np.random.default_rng(2).standard_normal((40, bank.shape[1])).astype(np.float32)
    ver = verify_int8(int8_bundle / GRAPH_FILE, {"random": pixels}, {"random": ref}, big_bank, "random40")
    assert ver["random"]["query_features"]["bank"] == "random40" and "top5_agreement" in ver
    with pytest.raises(ExportError, match="top-5 label agreement"):  # a gate of 100.1 % cannot pass
        verify_int8(int8_bundle / GRAPH_FILE, {"random": pixels}, {"random": ref}, big_bank, top5_min=1.001)


def test_static_and_per_tensor_variants(runtime_bundle, clean_photos, tmp_path):
    bundle = Bundle.load(runtime_bundle)
    src = bundle.graphs["image_encoder"].path
    cal = np.stack([bundle.preprocess.load(clean_photos / f"{p}.png") for p in PHOTOS])
    static = quantize_image_encoder(src, tmp_path / "static.onnx", cal, method="static")
    s = int8_summary(static)
    assert s["integer_ops"]["QuantizeLinear"] > 0 and s["integer_ops"]["DequantizeLinear"] > 0
    per_tensor = quantize_image_encoder(src, tmp_path / "pt.onnx", per_channel=False, quantize_attention=True,
                                        scope="all")
    assert "MatMul" not in int8_summary(per_tensor)["float_ops_left"]  # attention products quantized too
    ref = ort_session(src).run(None, {"pixels": cal})[0]
    for path in (static, per_tensor):
        out = ort_session(path).run(None, {"pixels": cal})[0]
        assert out.shape == ref.shape and np.isfinite(out).all()
    with pytest.raises(ExportError, match="static INT8 quantization needs calibration images"):
        quantize_image_encoder(src, tmp_path / "x.onnx", method="static")


def test_qks_export_int8_writes_the_verified_graph(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner
    from qks.export.cli import main

    out = tmp_path / "bundle"
    res = CliRunner().invoke(main, ["--ckpt", str(tiny_checkpoint), "--out", str(out), "--int8", "-q"])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "manifest.json").read_text())["graphs"][GRAPH_NAME]
    assert rec["file"] == GRAPH_FILE and rec["precision"] == "int8"
    assert rec["verification"]["top5_agreement"] >= rec["verification"]["tolerance"]["top5_agreement_min"]
    engine, reason = select_backend(Bundle.load(out), "ort-cpu", precision="auto")
    assert "int8" in reason


# -- the fused graph (qks.export.fuse) ------------------------------------------------------------------


def test_fused_fp32_graph_is_the_same_function(runtime_bundle, tmp_path):
    import onnx
    from qks.export.fuse import fuse_image_graph, verify_fused

    src = runtime_bundle / "image_encoder.onnx"
    model, stats = fuse_image_graph(onnx.load(str(src)), skip_layer_norm=True)
    assert stats["Attention"] == 4 and stats["MultiHeadAttention"] == 2 and stats["unfused_softmax"] == 0
    assert stats["SkipLayerNormalization"] > 0 and stats["BiasGelu"] == 4
    ops = [n.op_type for n in model.graph.node]
    assert "Softmax" not in ops and ops.count("Transpose") <= 1  # only the patch embedding's is left
    fused = tmp_path / "fused.onnx"
    onnx.save(model, str(fused))
    onnx.checker.check_model(str(fused))
    pixels = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    m = verify_fused(fused, src, pixels)
    assert m["rel_err"] < 1e-5 and m["query_cosine_min"] > 0.999999
    # a wrong rewrite (heads split differently) is caught by the same check
    attn = next(n for n in model.graph.node if n.op_type == "Attention")
    next(a for a in attn.attribute if a.name == "num_heads").i = 1
    onnx.save(model, str(fused))
    with pytest.raises(ExportError, match="the attention fusion changed the result"):
        verify_fused(fused, src, pixels)


def test_int8_falls_back_to_the_unfused_graph_when_fusion_fails(runtime_bundle, tmp_path, monkeypatch):
    import shutil

    import qks.export.fuse as fuse
    from qks.export.int8 import make_int8_graph

    def broken(*a, **k):
        raise ExportError("verification failed: fused image graph differs")

    monkeypatch.setattr(fuse, "verify_fused", broken)
    bundle = Bundle.load(runtime_bundle)
    d = tmp_path / "b"
    d.mkdir()
    shutil.copy(bundle.graphs["image_encoder"].path, d / "image_encoder.onnx")
    pixels = np.random.default_rng(4).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref = ort_session(d / "image_encoder.onnx").run(None, {"pixels": pixels})[0]
    ver, summary = make_int8_graph(d, {"random": pixels}, {"random": ref}, np.load(bundle.banks["default"].path))
    assert summary["fuse"] is False and summary["scope"] == "tokens"
    assert [r.split(":")[0] for r in summary["rejected"]] == ["fused graph, scope tokens", "fused graph, scope trunk"]
    assert "fused image graph differs" in summary["rejected"][0]
    assert "QAttention" not in summary["integer_ops"] and summary["integer_ops"]["MatMulInteger"] > 0
    assert ver["top5_agreement"] >= 0.99 and (d / GRAPH_FILE).is_file()


def test_products_kept_fp32_are_found_by_structure():
    """The queries folded into an unnamed [1, Nq, C] constant (how the dynamo exporter writes
    `queries.unsqueeze(0)`) still seed the query path; the logits of a non-attention Softmax and the
    product of its probabilities (the lite backbone's classifier over locations) are found too."""
    from onnx import TensorProto, helper, numpy_helper
    from qks.export.int8 import _query_path_matmuls, _softmax_matmuls

    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Expand", ["unsqueeze_3", "s3"], ["q"]),  # queries, [1, 3, 4] -> [B, 3, 4]
        helper.make_node("MatMul", ["q", "wq"], ["q1"], name="query_mm"),
        helper.make_node("MatMul", ["x", "wc"], ["logits0"], name="classifier"),
        helper.make_node("Add", ["logits0", "bc"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "we"], ["tok"], name="class_embedding_mean"),
        helper.make_node("MatMul", ["tok", "wk"], ["k"], name="token_mm"),
        helper.make_node("Add", ["q1", "k"], ["y"]),
    ]
    inits = [w("unsqueeze_3", 1, 3, 4), w("wq", 4, 4), w("wc", 4, 6), w("bc", 6), w("we", 6, 4), w("wk", 4, 4),
             numpy_helper.from_array(np.array([1, 3, 4], np.int64), "s3")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])], inits)
    model = helper.make_model(g)
    assert _query_path_matmuls(model) == ["query_mm"]
    assert sorted(_softmax_matmuls(model)) == ["class_embedding_mean", "classifier"]


def test_trunk_scope_keeps_exactly_the_head_fp32(runtime_bundle, tmp_path):
    """scope "trunk": every trunk product INT8 (2 QAttention + 2 out-projections + 4 MLP products in the
    tiny ViT), none of the head's (its self-attention, cross-attention, FFN and projection stay fp32)."""
    src = Bundle.load(runtime_bundle).graphs["image_encoder"].path
    s = int8_summary(quantize_image_encoder(src, tmp_path / "trunk.onnx", scope="trunk"))
    assert s["integer_ops"]["QAttention"] == 2 and s["integer_ops"]["MatMulInteger"] == 6
    assert s["fused_ops"]["Attention"] == 2 and s["fused_ops"]["MultiHeadAttention"] == 2
