"""The OpenVINO engine on the tiny bundle: parity with ONNX Runtime, the compiled-model cache (hit,
stale refused and rebuilt, a read-only bundle's cache in the user cache), and its registry entry."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from qks.engines.base import EngineError
from qks.engines.ort import OrtEngine
from qks.runtime.backend import BACKENDS, REGISTRY, select_backend
from qks.runtime.bundle import Bundle
from runtime_fixtures import *  # noqa: F403

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed (make venv installs it)")
from qks.engines.openvino import OpenVinoEngine  # noqa: E402

X = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(runtime_bundle):
    with OrtEngine(runtime_bundle / "image_encoder.onnx", intra_op_threads=1) as eng:
        return eng.run({"pixels": X})["query_features"]


def test_fp32_and_bf16_against_onnx_runtime(runtime_bundle, reference, tmp_path):
    for precision, atol in (("fp32", 1e-4), ("bf16", None)):
        with OpenVinoEngine(runtime_bundle / "image_encoder.onnx", precision=precision, threads=1,
                            cache_dirs=[tmp_path]) as eng:
            assert eng.backend == "openvino" and eng.inputs[0].name == "pixels" and eng.inputs[0].shape[0] is None
            out = eng.run({"pixels": X})["query_features"]
            assert out.shape == reference.shape == (3, 4, 32) and out.dtype == np.float32
            if atol:  # fp32 asked explicitly: OpenVINO's CPU default is bf16 where the CPU has it
                np.testing.assert_allclose(out, reference, rtol=0, atol=atol)
            cos = (out * reference).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(reference, axis=-1)
            assert cos.min() > 0.99
            with pytest.raises(EngineError, match="rank"):
                eng.run({"pixels": X[0]})
    with pytest.raises(EngineError, match="closed"):
        eng.run({"pixels": X})


def test_compiled_model_cache_hit_stale_and_unreadable(runtime_bundle, reference, tmp_path):
    graph = runtime_bundle / "image_encoder.onnx"
    first = OpenVinoEngine(graph, threads=1, cache_dirs=[tmp_path])
    assert first.cache_status == "miss" and first.cache_file.parent == tmp_path
    meta = json.loads(first.cache_file.with_suffix(".json").read_text())
    assert meta["openvino"] == ov.__version__.split("-")[0] and meta["precision"] == "f32" and meta["cpu"]
    assert len(meta["graph_sha256"]) == 64
    blob = first.cache_file
    first.close()
    second = OpenVinoEngine(graph, threads=1, cache_dirs=[tmp_path])
    assert second.cache_status == "hit"
    np.testing.assert_allclose(second.run({"pixels": X})["query_features"], reference, rtol=0, atol=1e-4)
    second.close()
    # a blob compiled by another OpenVINO (its sidecar says so) is refused and rebuilt in place
    blob.with_suffix(".json").write_text(json.dumps(dict(meta, openvino="2020.1", cpu="another CPU")))
    third = OpenVinoEngine(graph, threads=1, cache_dirs=[tmp_path])
    assert third.cache_status == "stale (openvino, cpu differ)"
    assert json.loads(blob.with_suffix(".json").read_text()) == meta  # rewritten for this machine
    third.close()
    # a damaged blob with a matching sidecar is rebuilt, never trusted
    blob.write_bytes(b"not a compiled model")
    fourth = OpenVinoEngine(graph, threads=1, cache_dirs=[tmp_path])
    assert fourth.cache_status == "unreadable"
    np.testing.assert_allclose(fourth.run({"pixels": X})["query_features"], reference, rtol=0, atol=1e-4)
    assert blob.stat().st_size > 1000 and not list(tmp_path.glob(".ov-*"))


def test_unwritable_bundle_caches_in_the_user_cache(bundle_copy, tmp_path):
    (bundle_copy / "cache").write_text("a file where the cache folder would go: not writable, even as root")
    engine, _reason = select_backend(Bundle.load(bundle_copy), "openvino", threads=1)
    with engine:
        assert engine.cache_status == "miss" and (tmp_path / "user-cache" / "openvino") in engine.cache_file.parents


def test_registry_entry_and_selection(bundle_copy, reference):
    assert "openvino" in BACKENDS and REGISTRY["openvino"].device == "cpu"
    bundle = Bundle.load(bundle_copy)
    engine, reason = select_backend(bundle, "openvino", threads=1)
    with engine:
        assert reason == "openvino: requested (image_encoder.onnx, compiled model: miss, threads=1)"
        assert engine.precision == "fp32" and engine.cache_file.parent == bundle_copy / "cache" / "openvino"
        np.testing.assert_allclose(engine.run({"pixels": X})["query_features"], reference, rtol=0, atol=1e-4)
    engine, reason = select_backend(Bundle.load(bundle_copy), "openvino", threads=1, precision="bf16")
    with engine:
        assert engine.precision == "bf16" and "compiled model: miss" in reason
    engine, reason = select_backend(Bundle.load(bundle_copy), "openvino", threads=1)
    engine.close()
    assert "compiled model: hit" in reason
    with pytest.raises(EngineError, match="backend openvino cannot run: openvino runs precision fp32, bf16, not int8"):
        select_backend(bundle, "openvino", precision="int8")
    # auto does not adopt it (not measured faster at parity) and says so
    engine, reason = select_backend(bundle, "auto", threads=1)
    engine.close()
    assert engine.backend == "ort-cpu" and "openvino: not faster than ort-cpu" in reason


def test_missing_graph_and_bad_precision(tmp_path, runtime_bundle):
    with pytest.raises(EngineError, match="no graph file"):
        OpenVinoEngine(tmp_path / "missing.onnx")
    with pytest.raises(EngineError, match="unknown precision 'int4'"):
        OpenVinoEngine(runtime_bundle / "image_encoder.onnx", precision="int4")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(EngineError, match="openvino: cannot compile bad.onnx"):
        OpenVinoEngine(bad, cache_dirs=[])
    shutil.rmtree(tmp_path, ignore_errors=True)
