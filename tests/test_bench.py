"""qks-bench on the tiny bundle: the JSON report's structure, the table, the torch baseline and its
ratios, and a run without torch. Structure and sign only: no timing thresholds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from runtime_fixtures import *  # noqa: F403
from runtime_fixtures import BLOCK_TORCH

FAST = ["--batch-sizes", "1,2", "--iters", "2", "--warmup", "1", "--e2e-batches", "2", "--threads", "1",
        "--workers", "1", "--quiet"]
RECORD_KEYS = {"backend", "precision", "batch", "stage", "p50_ms", "p95_ms", "p99_ms", "images_per_s",
               "ratio_to_torch", "stages"}


def _bench(args, blocked=False, timeout=300):
    code = (BLOCK_TORCH if blocked else "import sys\n") + (
        f"sys.argv = ['qks-bench'] + {args!r}\n"
        "from qks.runtime.bench import main\n"
        "try:\n    main()\n"
        "finally:\n"
        "    print('TORCH_LOADED', 'torch' in sys.modules, file=sys.stderr)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def _positive(x):
    return isinstance(x, (int, float)) and x > 0


def _check_records(results, backends, batches):
    assert {(r["backend"], r["batch"], r["stage"]) for r in results} == {
        (b, n, s) for b in backends for n in batches for s in ("engine", "end_to_end")}
    for r in results:
        assert RECORD_KEYS <= set(r)
        assert all(_positive(r[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "images_per_s"))
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        if r["stage"] == "end_to_end":
            assert set(r["stages"]) >= {"decode", "preprocess", "engine", "score"}
            assert all(_positive(r["stages"][k]) for k in ("decode", "preprocess", "engine", "score"))
            assert r["images"] == 2 * r["batch"] and _positive(r["fraction_of_engine"])
        else:
            assert _positive(r["stages"]["engine"])


def test_bench_with_the_torch_baseline(runtime_bundle, tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    res = _bench(["--bundle", str(runtime_bundle), "--backends", "ort-cpu,torch", "--ckpt", str(tiny_checkpoint),
                  "--precision", "fp32,fp16", "--out", str(out), *FAST])
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert set(report) >= {"machine", "method", "results", "skipped", "date", "command"}
    mach = report["machine"]
    assert mach["cpu"]["model"] and mach["cpu"]["usable_cpus"] >= 1
    assert set(mach["cpu"]["isa_summary"]) == {"AVX-512", "VNNI", "AVX512-BF16", "AMX-INT8", "AMX-BF16"}
    assert {"numpy", "onnxruntime", "torch"} <= set(mach["versions"])
    model = mach["model"]
    assert (model["queries"], model["layers"], model["embed_dim"], model["labels"]) == (4, 2, 32, 5)
    assert model["backbone"].startswith("openclip:") and model["image_size"] == 32
    assert "synthetic" in report["method"]["images"] and report["method"]["iters"] == 2
    results = report["results"]
    _check_records([r for r in results if r["precision"] != "fp16"], ("ort-cpu", "torch"), (1, 2))
    assert {(r["batch"], r["stage"]) for r in results if r["precision"] == "fp16"} == {
        (1, "engine"), (1, "end_to_end"), (2, "engine"), (2, "end_to_end")}
    for r in results:
        assert _positive(r["ratio_to_torch"])
        if r["backend"] == "torch":
            assert r["ratio_to_torch"] == pytest.approx(1.0) and r["precision"] == "fp32"
    table = res.stdout
    assert "p50 ms" in table and "x torch" in table and "ort-cpu" in table and "torch" in table
    assert "Intel" in table or mach["cpu"]["model"] in table


def test_bench_runs_without_torch(runtime_bundle, tiny_checkpoint, photo_dir, tmp_path):
    out = tmp_path / "bench.json"
    res = _bench(["--bundle", str(runtime_bundle), "--backends", "ort-cpu,ort-cuda,torch", "--ckpt",
                  str(tiny_checkpoint), "--images", str(photo_dir), "--out", str(out), *FAST], blocked=True)
    assert res.returncode == 0, res.stderr
    assert "TORCH_LOADED False" in res.stderr
    report = json.loads(out.read_text())
    _check_records(report["results"], ("ort-cpu",), (1, 2))
    assert all(r["ratio_to_torch"] is None for r in report["results"])
    skipped = {s["backend"]: s["reason"] for s in report["skipped"]}
    assert "torch is not importable" in skipped["torch"] and "ort-cuda" in skipped
    assert str(photo_dir) in report["method"]["images"]
    e2e = [r for r in report["results"] if r["stage"] == "end_to_end"]
    assert all(r["errors"] >= 0 for r in e2e)  # the folder's broken.jpg becomes an error record when cycled in
    assert "skipped torch" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--backends", "ort-gpu"], "unknown backend 'ort-gpu'"),
    (["--precision", "int4"], "unknown precision 'int4'"),
    (["--batch-sizes", "1,x"], "not a comma-separated list"),
    (["--backends", "torch"], "no backend can run: torch: no --ckpt given"),
])
def test_bench_errors_are_one_line(runtime_bundle, args, message):
    res = _bench(["--bundle", str(runtime_bundle), "--no-end-to-end", *args])
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("TORCH_LOADED")]
    assert len(lines) == 1 and lines[0].startswith("qks-bench: error:") and message in lines[0], res.stderr


def test_gpu_bench_script_smoke_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu/bench_torch.py --device cpu --quick: the GPU script's Python runs, checks parity
    first and writes its JSON and markdown tables (the GPU run itself needs a GPU machine)."""
    from pathlib import Path

    from conftest import TINY_SPEC

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "bench_torch.py"
    res = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick", "--backbone", TINY_SPEC,
                          "--head", "tiny", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["model"]["gflop_per_image"] > 0 and report["peak"]["fp32"] > 0 and report["peak"]["bf16"] > 0
    assert set(report["parity"]) == {"bf16"}
    p = report["parity"]["bf16"]
    assert p["finite"] and -1 <= p["cosine_min"] <= 1 and 0 <= p["top5_agreement"] <= 1
    assert {(r["mode"], r["batch"]) for r in report["results"]} == {("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)}
    assert all(_positive(r["ms"]) and _positive(r["images_per_s"]) and _positive(r["fraction_of_peak"])
               for r in report["results"])
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "## Correctness vs fp32 eager" in md and "| bf16 | 2 |" in md


def test_bench_every_precision_with_parity_and_peak(runtime_bundle, tiny_checkpoint, photo_dir, tmp_path):
    """--precision all: every backend's precisions that run here plus the torch fp32 and bf16 baselines,
    each with its parity against torch fp32 on the photos and its fraction of the measured GEMM peak."""
    out = tmp_path / "bench.json"
    res = _bench(["--bundle", str(runtime_bundle), "--backends", "ort-cpu,openvino,torch", "--ckpt",
                  str(tiny_checkpoint), "--precision", "all", "--images", str(photo_dir), "--peak",
                  "--peak-size", "256", "--no-end-to-end", "--out", str(out), *FAST[:2], "--iters", "1", "--warmup", "0", "--threads", "1",
                  "--quiet"])
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    rows = {(r["backend"], r["precision"]) for r in report["results"] if r["batch"] == 1}
    assert {("torch", "fp32"), ("torch", "bf16"), ("ort-cpu", "fp32"), ("ort-cpu", "fp16")} <= rows
    try:
        import openvino  # noqa: F401
        assert {("openvino", "fp32"), ("openvino", "bf16")} <= rows
    except ImportError:
        assert any(s["backend"] == "openvino" for s in report["skipped"])
    peak = report["method"]["gemm_peak"]
    assert _positive(peak["ort_fp32"]) and _positive(peak["ort_int8"]) and _positive(report["method"]["flops_per_image"])
    for r in report["results"]:
        p = r["parity"]
        assert p["reference"] == "torch fp32" and p["images"] == 5  # the photos that decode
        assert -1 <= p["cosine_min"] <= 1 and 0 <= p["top5_agreement"] <= 1 and isinstance(p["gate"], bool)
        if (r["backend"], r["precision"]) in (("torch", "fp32"), ("ort-cpu", "fp32")):
            assert p["gate"] and p["cosine_min"] > 0.9999
        if r["precision"] in ("fp32", "bf16", "int8"):
            assert _positive(r["gops"]) and _positive(r["fraction_of_peak"])
    table = res.stdout
    assert "cos min" in table and "top-5" in table and "peak" in table and "bf16" in table
