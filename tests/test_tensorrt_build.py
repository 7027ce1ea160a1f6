"""The TensorRT path of qks-export.

In CI it runs with TensorRT for RTX, which parses ONNX and builds engines ahead of time on a CPU:
that proves a TensorRT ONNX parser accepts the graphs, a strongly typed build (FP16 from the FP16
graph) succeeds, and the plans, sidecars and manifest entries say what was built. Deserializing a
plan needs a GPU; with none, the engines' I/O is read from the network the plan was built from.
Tests marked `tensorrt` / `gpu` need NVIDIA TensorRT or a GPU and are skipped in CI.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxconverter_common")


def _rtx():
    from qks.export.errors import ExportError
    from qks.export.tensorrt_build import import_tensorrt, is_rtx

    for name in ("tensorrt_rtx", "tensorrt_rtx_bindings"):
        try:
            trt = import_tensorrt(name)
        except ExportError:
            continue
        if is_rtx(trt):
            return trt
    pytest.skip("TensorRT for RTX is not installed (pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings)")


@pytest.fixture(scope="module")
def rtx_bundle(tiny_checkpoint, tmp_path_factory, request):
    trt = _rtx()
    from qks.export.bundle import export_bundle

    mp = pytest.MonkeyPatch()
    mp.setenv("QKS_TENSORRT_MODULE", trt.__name__)
    request.addfinalizer(mp.undo)
    out = export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("trt") / "bundle", fp16=True, tensorrt=True,
                        max_batch=4)
    return trt, out, json.loads((out / "manifest.json").read_text())


def test_rtx_engines_match_the_manifest(rtx_bundle):
    from qks.runtime.manifest import sha256_file

    trt, bundle, m = rtx_bundle
    engines = {e["graph"]: e for e in m["engines"]}
    assert set(engines) == {"image_encoder_fp16", "label_encoder"}
    for graph, e in engines.items():
        g = m["graphs"][graph]
        # file names: graph, graph sha256, TensorRT version, SM
        stem = f"{graph}-{g['sha256'][:12]}-trtrtx{trt.__version__}-sm{e['sm']}"
        assert e["file"] == f"engines/{stem}.plan" and e["sidecar"] == f"engines/{stem}.json"
        assert re.fullmatch(r"\d{2,3}", e["sm"])
        for rel in (e["file"], e["sidecar"]):
            assert m["files"][rel]["sha256"] == sha256_file(bundle / rel)
        assert (bundle / e["file"]).stat().st_size > 100_000
        # the sidecar holds exactly what the manifest entry says
        side = json.loads((bundle / e["sidecar"]).read_text())
        assert {k: v for k, v in e.items() if k not in ("file", "sidecar")} == side
        assert side["graph_sha256"] == g["sha256"] and side["precision"] == g["precision"]
        assert (side["trt_module"], side["trt_version"], side["trt_flavor"]) == (trt.__name__, trt.__version__,
                                                                                 "tensorrt_rtx")
        assert side["strongly_typed"] is True
        # I/O names and dtypes are the graph's; static dims too
        for kind in ("inputs", "outputs"):
            assert [(t["name"], t["dtype"]) for t in side[kind]] == [(t["name"], t["dtype"]) for t in g[kind]]
            for t, gt in zip(side[kind], g[kind], strict=True):
                assert t["shape"][1:] == gt["shape"][1:] and t["shape"][0] == -1
        # profile: batch 1 .. --max-batch on the dynamic axis, the graph's static dims elsewhere
        (name,) = [t["name"] for t in g["inputs"]]
        static = g["inputs"][0]["shape"][1:]
        assert side["profile"] == {name: {"min": [1, *static], "opt": [4, *static], "max": [4, *static]}}
    assert engines["image_encoder_fp16"]["precision"] == "fp16"
    # TensorRT for RTX has no timing cache (no-op calls since RTX 1.2); TensorRT writes one
    assert all(e["timing_cache"] is None for e in m["engines"])
    assert not (bundle / "engines/timing.cache").exists()
    assert m["versions"][trt.__name__] == trt.__version__


def test_rtx_parser_reads_the_bundle_graphs_as_the_manifest_says(rtx_bundle):
    """An independent parse of each graph (strongly typed) gives the manifest's I/O."""
    from qks.export.tensorrt_build import network_io

    trt, bundle, m = rtx_bundle
    logger = trt.Logger(trt.Logger.ERROR)
    for g in m["graphs"].values():
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        assert parser.parse_from_file(str(bundle / g["file"])), [parser.get_error(i).desc() for i in range(parser.num_errors)]
        ins, outs = network_io(trt, network)
        assert [(t["name"], t["dtype"]) for t in ins] == [(t["name"], t["dtype"]) for t in g["inputs"]]
        assert [(t["name"], t["dtype"]) for t in outs] == [(t["name"], t["dtype"]) for t in g["outputs"]]


def test_rtx_plan_deserializes_when_a_gpu_is_present(rtx_bundle):
    from qks.export.tensorrt_build import engine_io, gpu_info

    trt, bundle, m = rtx_bundle
    e = m["engines"][0]
    if gpu_info() is None:
        assert e["io_source"].startswith("parsed network")
        assert engine_io(trt, (bundle / e["file"]).read_bytes()) is None
        pytest.skip("no CUDA GPU: TensorRT for RTX plans cannot be deserialized here")
    assert e["io_source"] == "deserialized engine"
    io = engine_io(trt, (bundle / e["file"]).read_bytes())
    assert io["profile"] == e["profile"]


def test_rtx_target_and_missing_module_errors(tmp_path, monkeypatch):
    from qks.export.errors import ExportError
    from qks.export.tensorrt_build import build_engine, import_tensorrt

    monkeypatch.delenv("QKS_TENSORRT_MODULE", raising=False)
    with pytest.raises(ExportError, match=r"--tensorrt needs NVIDIA TensorRT .*pip install") as err:
        import_tensorrt("no_such_tensorrt_module")
    assert "\n" not in str(err.value)
    trt = _rtx()
    onnx_file = tmp_path / "tiny.onnx"
    _tiny_onnx(onnx_file)
    with pytest.raises(ExportError, match="cannot target SM90"):
        build_engine(onnx_file, tmp_path / "engines", "tiny", "0" * 64, "fp32", compute_capability="90",
                     module=trt.__name__)
    side = build_engine(onnx_file, tmp_path / "engines", "tiny", "0" * 64, "fp32", max_batch=2,
                        compute_capability="89", module=trt.__name__)
    assert side["sm"] == "89" and side["profile"]["x"] == {"min": [1, 4], "opt": [2, 4], "max": [2, 4]}


def test_parser_errors_are_one_line(tmp_path):
    from qks.export.errors import ExportError
    from qks.export.tensorrt_build import build_engine

    trt = _rtx()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an onnx file")
    with pytest.raises(ExportError, match="ONNX parser rejected bad.onnx") as err:
        build_engine(bad, tmp_path / "engines", "bad", "0" * 64, "fp32", module=trt.__name__)
    assert "\n" not in str(err.value)


def _tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [float(i) for i in range(16)])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_tensorrt_engine_profile_and_io(tiny_checkpoint, tmp_path, monkeypatch):
    """NVIDIA TensorRT 10/11 on a GPU: the plan deserializes and its I/O and profile are the
    manifest's (run by the project's device-check script where a GPU is lent)."""
    from qks.export.bundle import export_bundle
    from qks.export.tensorrt_build import engine_io, import_tensorrt

    trt = import_tensorrt("tensorrt")
    monkeypatch.setenv("QKS_TENSORRT_MODULE", "tensorrt")
    out = export_bundle(tiny_checkpoint, tmp_path / "bundle", fp16=True, tensorrt=True, max_batch=8)
    m = json.loads((out / "manifest.json").read_text())
    assert {e["graph"] for e in m["engines"]} == {"image_encoder_fp16", "label_encoder"}
    assert (out / "engines/timing.cache").is_file() and "engines/timing.cache" in m["files"]
    for e in m["engines"]:
        assert e["trt_module"] == "tensorrt" and e["io_source"] == "deserialized engine"
        assert e["timing_cache"] == "engines/timing.cache"
        io = engine_io(trt, (out / e["file"]).read_bytes())
        assert io["profile"] == e["profile"]
        g = m["graphs"][e["graph"]]
        assert [(t["name"], t["dtype"]) for t in io["inputs"]] == [(t["name"], t["dtype"]) for t in g["inputs"]]
        assert [(t["name"], t["dtype"]) for t in io["outputs"]] == [(t["name"], t["dtype"]) for t in g["outputs"]]
