"""Engines: ONNX Runtime on the CPU for real; TensorRT plan checks without a GPU; TrtEngine on a GPU."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from qks.engines.base import EngineError, TensorInfo
from qks.engines.ort import OrtEngine
from qks.engines.plan import check_compatible, normalize_sm, read_sidecar, sidecar_path
from runtime_fixtures import *  # noqa: F403


@pytest.fixture(scope="module")
def image_graph(runtime_bundle):
    return runtime_bundle / "image_encoder.onnx"


def test_ort_metadata(image_graph):
    with OrtEngine(image_graph, "cpu", intra_op_threads=1) as eng:
        assert eng.backend == "ort-cpu"
        (inp,) = eng.inputs
        out, emb = eng.outputs  # query features first, then the image embedding (issue 22)
        assert isinstance(inp, TensorInfo) and inp.name == "pixels" and inp.dtype == "float32"
        assert not isinstance(inp.shape[0], int) and inp.shape[1:] == (3, 32, 32)
        assert out.name == "query_features" and out.dtype == "float32" and out.shape[1:] == (4, 32)
        assert emb.name == "embedding" and emb.dtype == "float32" and emb.shape[1:] == (32,)
        assert "pixels float32" in eng.describe()


def test_ort_dynamic_batch(image_graph):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 32, 32), dtype=np.float32)
    with OrtEngine(image_graph, "cpu", intra_op_threads=1, inter_op_threads=1) as eng:
        whole = eng.run({"pixels": x})["query_features"]
        singles = np.concatenate([eng.run({"pixels": x[i:i + 1]})["query_features"] for i in range(5)])
        pair = eng.run({"pixels": x[1:3]})["query_features"]
    assert whole.shape == (5, 4, 32) and whole.dtype == np.float32
    np.testing.assert_allclose(whole, singles, rtol=0, atol=1e-5)
    np.testing.assert_allclose(pair, whole[1:3], rtol=0, atol=1e-5)


def test_ort_disabled_optimizers_option_gives_the_same_result(image_graph):
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with OrtEngine(image_graph, intra_op_threads=1) as a, \
            OrtEngine(image_graph, intra_op_threads=1, disabled_optimizers=["NchwcTransformer"]) as b:
        np.testing.assert_allclose(a.run({"pixels": x})["query_features"], b.run({"pixels": x})["query_features"],
                                   rtol=0, atol=1e-6)


def test_ort_feed_checks(image_graph):
    with OrtEngine(image_graph, intra_op_threads=1) as eng:
        with pytest.raises(EngineError, match="inputs must be"):
            eng.run({"image": np.zeros((1, 3, 32, 32), np.float32)})
        with pytest.raises(EngineError, match="rank"):
            eng.run({"pixels": np.zeros((3, 32, 32), np.float32)})
        with pytest.raises(EngineError, match="shape"):
            eng.run({"pixels": np.zeros((1, 3, 16, 16), np.float32)})
        out = eng.run({"pixels": np.zeros((1, 3, 32, 32), np.float64)})  # cast to the input dtype
        assert out["query_features"].dtype == np.float32
    with pytest.raises(EngineError, match="closed"):
        eng.run({"pixels": np.zeros((1, 3, 32, 32), np.float32)})


def test_ort_unloadable_gpu_provider_is_detected_from_the_session(image_graph):
    """The CPU wheel (and onnxruntime-gpu without a driver) falls back to the CPU; that is an error."""
    import onnxruntime as ort

    active = None
    try:
        with OrtEngine(image_graph, "cuda") as eng:
            active = eng.active_providers
    except EngineError as e:
        assert "CUDAExecutionProvider" in str(e) and "fell back" in str(e)
    else:  # a machine where CUDA really loads
        assert active[0] == "CUDAExecutionProvider" and "CUDAExecutionProvider" in ort.get_available_providers()


def test_ort_bad_model_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(EngineError, match="cannot load bad.onnx"):
        OrtEngine(bad)
    with pytest.raises(EngineError, match="unknown onnxruntime provider"):
        OrtEngine(bad, "rocm")


# -- TensorRT plan sidecars (pure Python) ----------------------------------------------------------

SIDECAR = {"graph": "image_encoder_fp16", "graph_sha256": "ab" * 32, "trt_module": "tensorrt", "trt_version": "10.8.0.43",
           "sm": "90", "gpu_name": "NVIDIA H100 80GB HBM3", "precision": "fp16",
           "profile": {"pixels": [[1, 3, 224, 224], [8, 3, 224, 224], [32, 3, 224, 224]]},
           "inputs": [], "outputs": [], "built": "2026-11-26T00:00:00Z"}


def test_sidecar_compatibility():
    check_compatible(SIDECAR, "10.8.0.43", (9, 0), trt_module="tensorrt")
    with pytest.raises(EngineError, match=r"built with TensorRT 10\.8\.0\.43, this machine has TensorRT 10\.9\.0"):
        check_compatible(SIDECAR, "10.9.0", "90")
    with pytest.raises(EngineError, match=r"built for GPU sm_90 \(NVIDIA H100 80GB HBM3\), this GPU is sm_89"):
        check_compatible(SIDECAR, "10.8.0.43", "8.9")
    with pytest.raises(EngineError, match="built by tensorrt, this machine has tensorrt_rtx"):
        check_compatible(SIDECAR, "10.8.0.43", "90", trt_module="tensorrt_rtx")
    assert [normalize_sm(s) for s in (90, "90", "9.0", "sm_90", "SM90", (9, 0))] == ["90"] * 6


def test_sidecar_files(tmp_path):
    plan = tmp_path / "engines" / "x.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"plan")
    with pytest.raises(EngineError, match="no sidecar"):
        read_sidecar(plan)
    sidecar_path(plan).write_text(json.dumps(SIDECAR))
    assert sidecar_path(plan).name == "x.json" and read_sidecar(plan)["sm"] == "90"
    assert read_sidecar(plan, plan.with_name("x.json"))["gpu_name"] == SIDECAR["gpu_name"]
    sidecar_path(plan).write_text("{broken")
    with pytest.raises(EngineError, match="unreadable plan sidecar"):
        read_sidecar(plan)


def test_trt_engine_without_tensorrt_names_the_extra(tmp_path):
    pytest.importorskip("onnxruntime")
    from qks.engines.trt import TrtEngine

    try:
        import tensorrt  # noqa: F401
        pytest.skip("NVIDIA TensorRT is installed here")
    except ImportError:
        pass

    plan = tmp_path / "x.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(EngineError, match="no sidecar"):
        TrtEngine(plan)
    plan.with_suffix(".json").write_text(json.dumps(SIDECAR))
    with pytest.raises(EngineError, match=r"TensorRT is not installed \(tensorrt\): pip install 'qks\[tensorrt\]'"):
        TrtEngine(plan)
    plan.with_suffix(".json").write_text(json.dumps(dict(SIDECAR, trt_module="evil_module")))
    with pytest.raises(EngineError, match="unknown TensorRT module 'evil_module'"):
        TrtEngine(plan)


# -- native TensorRT (needs a GPU and TensorRT 10/11; skipped elsewhere) ---------------------------

def _build_plan(onnx_path, plan_path, max_batch=8):
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("pixels", (1, 3, 32, 32), (4, 3, 32, 32), (max_batch, 3, 32, 32))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    plan_path.write_bytes(bytes(plan))
    from qks.engines.trt import cuda_device

    dev = cuda_device()
    sidecar = dict(SIDECAR, graph="image_encoder", trt_version=trt.__version__, sm=dev["sm"], gpu_name=dev["name"],
                   precision="fp32")
    sidecar_path(plan_path).write_text(json.dumps(sidecar))
    return plan_path


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_trt_engine_dynamic_batch_and_cuda_graph(image_graph, tmp_path):
    from qks.engines.trt import TrtEngine

    plan = _build_plan(image_graph, tmp_path / "image_encoder.plan")
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32), dtype=np.float32)
    with OrtEngine(image_graph, intra_op_threads=1) as ref_engine:
        ref = ref_engine.run({"pixels": x})["query_features"]
    with TrtEngine(plan) as eng:
        assert eng.max_batch == 8 and eng.inputs[0].name == "pixels"
        for n in (1, 3, 8):
            np.testing.assert_allclose(eng.run({"pixels": x[:n]})["query_features"], ref[:n], atol=1e-3)
        with pytest.raises(EngineError, match="outside the plan's profile"):
            eng.run({"pixels": np.zeros((9, 3, 32, 32), np.float32)})
    with TrtEngine(plan, cuda_graph=True) as eng:
        for n in (4, 4, 4, 2, 4, 4):  # capture, replay, another shape, back, replay
            np.testing.assert_allclose(eng.run({"pixels": x[:n]})["query_features"], ref[:n], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_trt_engine_refuses_a_plan_for_another_gpu(image_graph, tmp_path):
    from qks.engines.trt import TrtEngine

    plan = _build_plan(image_graph, tmp_path / "image_encoder.plan")
    meta = json.loads(sidecar_path(plan).read_text())
    sidecar_path(plan).write_text(json.dumps(dict(meta, sm="12.7", gpu_name="a future GPU")))
    with pytest.raises(EngineError, match="built for GPU sm_127"):
        TrtEngine(plan)


# -- backend selection -----------------------------------------------------------------------------

def test_auto_backend_says_what_it_picked_and_why(runtime_bundle):
    from qks.runtime.backend import select_backend
    from qks.runtime.bundle import Bundle

    engine, reason = select_backend(Bundle.load(runtime_bundle), "auto", threads=1)
    with engine:
        assert "\n" not in reason
        if engine.backend == "ort-cpu":  # this machine: no GPU, no TensorRT
            assert reason.startswith("auto: picked ort-cpu (image_encoder.onnx, threads=1) because tensorrt: ")
            assert "ort-cuda: " in reason
        x = np.zeros((2, 3, 32, 32), np.float32)
        assert engine.run({"pixels": x})["query_features"].shape == (2, 4, 32)


def test_named_backend_that_cannot_run_is_an_error(bundle_copy):
    from qks.runtime.backend import select_backend
    from qks.runtime.bundle import Bundle
    from qks.runtime.manifest import file_record, write_manifest

    b = Bundle.load(bundle_copy)
    with pytest.raises(EngineError, match="backend tensorrt cannot run: the bundle has no TensorRT plan"):
        select_backend(b, "tensorrt")
    with pytest.raises(EngineError, match="unknown backend"):
        select_backend(b, "cuda")
    # a bundle with a plan: on a machine without TensorRT the message names the extra
    (bundle_copy / "engines").mkdir()
    (bundle_copy / "engines" / "image_encoder.plan").write_bytes(b"plan bytes")
    (bundle_copy / "engines" / "image_encoder.json").write_text(json.dumps(SIDECAR))
    m = json.loads((bundle_copy / "manifest.json").read_text())
    for rel in ("engines/image_encoder.plan", "engines/image_encoder.json"):
        m["files"][rel] = file_record(bundle_copy, rel)
    m["engines"] = [{"file": "engines/image_encoder.plan", "sidecar": "engines/image_encoder.json",
                     "graph": "image_encoder", "precision": "fp32"}]
    write_manifest(bundle_copy, m)
    b = Bundle.load(bundle_copy)
    # Without a GPU, whichever is missing first is named: TensorRT, cuda-python, or the device.
    no_gpu = r"TensorRT is not installed: pip install 'qks\[tensorrt\]'|needs cuda-python|no CUDA device|was built"
    try:
        engine = select_backend(b, "tensorrt")[0]
    except EngineError as e:
        assert str(e).startswith("backend tensorrt cannot run: ") and re.search(no_gpu, str(e)), str(e)
        engine, reason = select_backend(b, "auto", threads=1)
        engine.close()
        assert re.search("tensorrt: (" + no_gpu + ")", reason), reason
    else:  # a GPU machine with TensorRT: the fake plan must be refused by its sidecar
        engine.close()
        pytest.fail("a fake plan was accepted")


def test_fp16_graph_on_ort_cpu(runtime_bundle):
    """The FP16 image graph (fp32 I/O) runs on ONNX Runtime CPU with the NchwcTransformer disabled and
    agrees with the fp32 graph."""
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with OrtEngine(runtime_bundle / "image_encoder.onnx", intra_op_threads=1) as fp32, \
            OrtEngine(runtime_bundle / "image_encoder.fp16.onnx", intra_op_threads=1,
                      disabled_optimizers=["NchwcTransformer"]) as fp16:
        assert fp16.inputs[0].dtype == "float32" and fp16.outputs[0].dtype == "float32"
        a = fp32.run({"pixels": x})["query_features"]
        b = fp16.run({"pixels": x})["query_features"]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() > 0.999


def test_backends_come_from_one_registry():
    """The CLI choices, auto's order and qks-bench's list all derive from runtime.backend.REGISTRY."""
    from qks.runtime import backend as B
    from qks.runtime.bench import BENCH_BACKENDS
    from qks.runtime.cli import _infer

    assert list(B.REGISTRY) == ["tensorrt", "ort-cuda", "openvino", "ort-cpu"]  # auto's order
    assert B.BACKENDS == ("auto", *B.REGISTRY)
    assert BENCH_BACKENDS == (*B.REGISTRY, "torch")
    (choice,) = [p.type.choices for p in _infer.params if p.name == "backend"]
    assert tuple(choice) == B.BACKENDS
    assert {b.device for b in B.REGISTRY.values()} == {"cpu", "gpu"}
    for spec in B.REGISTRY.values():
        assert spec.precisions and set(spec.precisions) <= set(B.PRECISIONS) and spec.help


def test_check_precision_without_opening_an_engine(runtime_bundle):
    from qks.runtime.backend import check_precision
    from qks.runtime.bundle import Bundle

    b = Bundle.load(runtime_bundle)
    check_precision(b, "auto", "fp16")  # the bundle has the fp16 graph
    check_precision(b, "openvino", "bf16")
    with pytest.raises(EngineError, match="no int8 image graph"):
        check_precision(b, "ort-cpu", "int8")
    with pytest.raises(EngineError, match="ort-cpu runs precision fp32, fp16, int8, not bf16"):
        check_precision(b, "ort-cpu", "bf16")
