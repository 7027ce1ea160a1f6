"""qks-tag refusing what the Python runtime refuses, in the same words: tampered, foreign and
incomplete bundles, label banks and label lists, bad arguments; and ONNX Runtime loaded at run
time (no link to it, found through the Python package or a flag, a clear line when missing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cpp_fixtures import (
    BUILD,
    TAMPERING,
    compare_records,
    cpp_env,
    flip_byte,
    run_qks_infer,
    run_tool,
    skip_reason,
    write,
)
from runtime_fixtures import manifest_json

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def python_error(bundle: Path) -> str:
    from qks.runtime.bundle import Bundle
    from qks.runtime.manifest import BundleError

    try:
        Bundle.load(bundle)
    except BundleError as e:
        return str(e)
    raise AssertionError("the Python runtime accepted the bundle")


def tag_error(bundle: Path, images: Path, *args) -> str:
    res = run_tool(BUILD, "qks-tag", [images, "--bundle", bundle, *args])
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()  # one line, no trace (after any warnings)
    assert lines[-1].startswith("qks-tag: error: ") and all(ln.startswith("qks-tag: warning: ") for ln in lines[:-1]), res.stderr
    return lines[-1].removeprefix("qks-tag: error: ")


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_bundle_is_refused_in_the_python_runtime_s_words(bundle_copy, images, case):
    TAMPERING[case](bundle_copy)
    if case == "bank_dim_vs_model":
        assert manifest_json(bundle_copy)["model"]["embed_dim"] == 16
    if case == "default_bank_unknown":  # refused when the bank is chosen (LabelBank.from_bundle)
        from qks.runtime.bundle import Bundle

        with pytest.raises(Exception) as e:
            Bundle.load(bundle_copy).default_bank()
        want = str(e.value)
    else:
        want = python_error(bundle_copy)
    assert tag_error(bundle_copy, images, "--threads", "1") == want


def test_a_bad_manifest_json_is_one_line(bundle_copy, images):
    (bundle_copy / "manifest.json").write_text('{"format": "qks-bundle", ')
    got = tag_error(bundle_copy, images)
    assert got.startswith(f"{bundle_copy}/manifest.json: manifest is not valid JSON (")
    assert python_error(bundle_copy).startswith(f"{bundle_copy}/manifest.json: manifest is not valid JSON (")


def test_missing_bundle_folder(tmp_path, images):
    assert tag_error(tmp_path / "nope", images) == f"bundle folder not found: {tmp_path / 'nope'}"


@pytest.mark.parametrize("case", ["graph_bytes_changed", "symlink_outside", "bank_pickle"])
def test_exit_code_2_like_qks_infer(bundle_copy, images, case):
    TAMPERING[case](bundle_copy)
    py = run_qks_infer([images, "--bundle", bundle_copy, "--no-progress"])
    assert py.returncode == 2
    assert py.stderr.strip().splitlines()[-1] == "qks-infer: error: " + tag_error(bundle_copy, images)


def test_no_verify_skips_the_sha256_but_not_the_sizes(bundle_copy, images):
    flip_byte(bundle_copy)  # the graph still loads: one bit of a weight changed
    res = run_tool(BUILD, "qks-tag", [images, "--bundle", bundle_copy, "--no-verify", "--threads", "1"])
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 3
    write(bundle_copy, "prompts.txt", b"short")
    assert "bytes, manifest says" in tag_error(bundle_copy, images, "--no-verify")


# -- label banks and label lists ---------------------------------------------------------------------

def test_bank_option_and_unknown_bank(runtime_bundle, images):
    assert tag_error(runtime_bundle, images, "--bank", "animals") == "bundle has no label bank 'animals' (it has: default)"
    res = run_tool(BUILD, "qks-tag", [images, "--bundle", runtime_bundle, "--bank", "default", "--threads", "1"])
    assert res.returncode == 0 and "labels bundle:default (5)" in res.stderr


def test_labels_need_a_bank_made_by_qks_labels_then_match_qks_infer(bundle_copy, images, tmp_path):
    from cpp_fixtures import ROOT
    labels = tmp_path / "animals.txt"
    labels.write_text("\ufeffzebra\n  giraffe \n\ncat\nzebra\r\n", encoding="utf-8")  # BOM, spaces, blank, repeat
    err = tag_error(bundle_copy, images, "--labels", labels)
    assert "qks-labels --bundle" in err and "--name NAME" in err and "3 labels" in err, err
    made = subprocess.run([sys.executable, "-c", "from qks.runtime.cli import labels_main; labels_main()", "--bundle",
                           str(bundle_copy), "--labels", str(labels), "--name", "animals", "--threads", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert made.returncode == 0, made.stderr
    for option in (["--bank", "animals"], ["--labels", labels]):  # the bank, and the list found by its key
        cpp = run_tool(BUILD, "qks-tag", [images, "--bundle", bundle_copy, "--threads", "1", "--all-scores", *option])
        py = run_qks_infer([images, "--bundle", bundle_copy, "--threads", "1", "--all-scores", "--no-progress", *option])
        assert cpp.returncode == py.returncode == 0, cpp.stderr + py.stderr
        compare_records(cpp.stdout, py.stdout)
        assert list(json.loads(cpp.stdout.splitlines()[0])["scores"]) == ["zebra", "giraffe", "cat"]
        if option[0] == "--labels":  # qks-infer's warning about the repeated label, word for word
            warn = [ln for ln in cpp.stderr.splitlines() if "duplicate" in ln]
            pwarn = [ln for ln in py.stderr.splitlines() if "duplicate" in ln]
            assert warn and [w.replace("qks-tag", "qks-infer") for w in warn] == pwarn


def test_labels_cached_by_qks_infer_are_found(bundle_copy, images, tmp_path):
    labels = tmp_path / "vehicles.txt"
    labels.write_text("bus\ntruck\nbicycle\n")
    py = run_qks_infer([images, "--bundle", bundle_copy, "--threads", "1", "--labels", labels, "--no-progress", "--top-k", "2"])
    assert py.returncode == 0, py.stderr
    assert list((bundle_copy / "labels" / "cache").glob("*.npy"))  # qks-infer cached the bank in the bundle
    cpp = run_tool(BUILD, "qks-tag", [images, "--bundle", bundle_copy, "--threads", "1", "--labels", labels, "--top-k", "2"])
    assert cpp.returncode == 0, cpp.stderr
    assert "labels cache:" in cpp.stderr
    compare_records(cpp.stdout, py.stdout)


def test_label_file_errors_match_qks_infer(runtime_bundle, images, tmp_path):
    cases = {"not_utf8.txt": b"cat\ndog\n\xe9\n", "blank.txt": b"\n  \n", "missing.txt": None}
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        py = run_qks_infer([images, "--bundle", runtime_bundle, "--labels", path, "--no-progress"])
        assert py.returncode == 2
        assert "qks-tag: error: " + tag_error(runtime_bundle, images, "--labels", path) == \
            py.stderr.strip().splitlines()[-1].replace("qks-infer", "qks-tag")
    assert tag_error(runtime_bundle, images, "--labels", tmp_path / "blank.txt", "--bank", "default") == \
        "give --labels or --bank, not both"


# -- arguments and exit codes --------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--threshold", "2"], ["--threshold", "x"], ["--top-k", "0"],
                                  ["--top-k", "x"], ["--precision", "foo"], ["--out"], ["IMAGES=nope"], ["IMAGES=file"],
                                  ["IMAGES="]])
def test_usage_errors_are_qks_infer_s(runtime_bundle, images, args):
    folder = str(images)
    if args[0].startswith("IMAGES="):
        folder = {"nope": "no/such/folder", "file": str(images / "0.png"), "": None}[args[0][7:]]
        args = []
    argv = ([folder] if folder else []) + ["--bundle", str(runtime_bundle), *args]
    py = run_qks_infer([*argv, "--no-progress"] if "--out" not in args else ["--no-progress", *argv])
    cpp = run_tool(BUILD, "qks-tag", argv)
    assert py.returncode == cpp.returncode == 2
    assert cpp.stderr.strip() == py.stderr.strip().splitlines()[-1].replace("qks-infer", "qks-tag")


def test_existing_output_needs_overwrite(runtime_bundle, images, tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    assert tag_error(runtime_bundle, images, "--out", out) == f"{out} exists: pass --overwrite to replace it"
    res = run_tool(BUILD, "qks-tag", [images, "--bundle", runtime_bundle, "--out", out, "--overwrite", "--threads", "1"])
    assert res.returncode == 0 and len(out.read_text().splitlines()) == 3
    assert tag_error(runtime_bundle, images, "--format", "csv") == "qks-tag writes JSONL only (qks-infer --format csv writes CSV)"


def test_help_and_version():
    res = run_tool(BUILD, "qks-tag", ["--help"])
    assert res.returncode == 0 and "--all-scores" in res.stdout and "--precision" in res.stdout
    res = run_tool(BUILD, "qks-tag", ["--version"])
    assert res.returncode == 0 and res.stdout.startswith("qks-tag ")


# -- ONNX Runtime at run time ------------------------------------------------------------------------

def test_onnxruntime_is_loaded_at_run_time_not_linked():
    for f in ("libqks.so", "qks-tag", "tag_image_c"):
        dyn = subprocess.run(["readelf", "-d", str(BUILD / f)], capture_output=True, text=True, check=True).stdout
        needed = [ln for ln in dyn.splitlines() if "(NEEDED)" in ln]
        assert needed and not any("onnxruntime" in ln for ln in needed), needed
    syms = subprocess.run(["readelf", "--dyn-syms", "-W", str(BUILD / "libqks.so")], capture_output=True, text=True).stdout
    assert "OrtGetApiBase" not in syms


def test_onnxruntime_found_through_python_or_refused_in_one_line(runtime_bundle, images):
    env = cpp_env(QKS_PYTHON=sys.executable)
    env.pop("QKS_ORT_LIBRARY")
    res = subprocess.run([str(BUILD / "qks-tag"), str(images), "--bundle", str(runtime_bundle), "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr  # found from `python -c "import onnxruntime"`
    import onnxruntime

    assert f"ONNX Runtime {onnxruntime.__version__}" in res.stderr
    err = tag_error(runtime_bundle, images, "--ort-library", "/no/such/libonnxruntime.so.1.99.0")
    assert err.startswith("cannot load ONNX Runtime from /no/such/libonnxruntime.so.1.99.0 (")
    not_ort = BUILD / "libqks.so"
    assert tag_error(runtime_bundle, images, "--ort-library", not_ort) == f"{not_ort} is not ONNX Runtime (no OrtGetApiBase)"
