"""The C++ side (cpp/: libqks, qks-tag, qks-pixels) against the Python runtime on the same bundle.

- the image graph's input tensor bit for bit on a folder of odd images (every JPEG subsampling,
  progressive, grey, CMYK, every EXIF orientation, XMP, all PNG depths and colour types, Adam7,
  palettes short or missing, 16-bit, GIFs of every layout, thin strips past the intermediate-size
  limit, ...), and the same error text for every broken one;
- the query features bit for bit (same ONNX Runtime library, loaded by dlopen);
- qks-tag's records and exit codes against qks-infer's with each label-choice option.

Probabilities are compared within 1e-5, not byte for byte: numpy's float32 matmul (OpenBLAS) and
its SIMD exp round differently from any portable C++ (and from numpy on another CPU), so about one
value in thirty differs in its last (7th) digit; keys, order, label choice and error texts are equal.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from cpp_fixtures import (
    BUILD,
    compare_records,
    make_broken_images,
    make_odd_images,
    ort_library,
    run_qks_infer,
    run_tool,
    skip_reason,
)
from PIL import Image

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

BMP_NOTE = "cannot decode image: a BMP file (qks-tag reads JPEG, PNG and GIF; qks-infer reads it)"


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("odd") / "images"
    return root, make_odd_images(root)


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("broken") / "images"
    return root, make_broken_images(root)


def python_pixels(bundle: Path, paths: list[Path]) -> list:
    """Each path's tensor from the Python runtime, or its PreprocessError text."""
    from qks.runtime.bundle import Bundle
    from qks.runtime.preprocess import PreprocessError

    pp = Bundle.load(bundle).preprocess
    out = []
    for p in paths:
        try:
            out.append(pp.load(p))
        except PreprocessError as e:
            out.append(str(e))
    return out


def cpp_pixels(bundle: Path, paths: list[Path], tmp: Path, build: Path = BUILD) -> list:
    out_dir = tmp / "pixels"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    res = run_tool(build, "qks-pixels", ["--bundle", bundle, "--out", out_dir, *paths])
    assert res.returncode == 0, res.stderr
    got = []
    for i in range(len(paths)):
        npy = out_dir / f"{i}.npy"
        got.append(np.load(npy) if npy.is_file() else (out_dir / f"{i}.err").read_text())
    return got


def assert_same_pixels(want: list, got: list, names: list[str]) -> None:
    bad = []
    for name, w, g in zip(names, want, got, strict=True):
        if isinstance(w, str) or isinstance(g, str):
            if w != g:
                bad.append(f"{name}: python {w!r} / c++ {g!r}")
        elif w.shape != g.shape or w.dtype != g.dtype or not np.array_equal(w.view(np.uint32), g.view(np.uint32)):
            diff = np.abs(w - g).max() if w.shape == g.shape else "shape"
            bad.append(f"{name}: tensors differ (max {diff})")
    assert not bad, "\n".join(bad)


# -- preprocessing -------------------------------------------------------------------------------------

def test_odd_images_give_the_python_tensor_bit_for_bit(runtime_bundle, odd, tmp_path):
    root, names = odd
    paths = [root / n for n in names]
    want = python_pixels(runtime_bundle, paths)
    assert not any(isinstance(w, str) for w in want), [w for w in want if isinstance(w, str)]
    assert_same_pixels(want, cpp_pixels(runtime_bundle, paths, tmp_path), names)


def test_broken_images_give_the_python_error_text(runtime_bundle, broken, tmp_path):
    root, names = broken
    paths = [root / n for n in names]
    want = python_pixels(runtime_bundle, paths)
    got = cpp_pixels(runtime_bundle, paths, tmp_path)
    bmp = names.index("a_bmp.bmp")
    assert got[bmp] == BMP_NOTE and not isinstance(want[bmp], str)  # formats qks-tag does not read: named
    keep = [i for i in range(len(names)) if i != bmp]
    decodable = {"jpeg_corrupt.jpg", "png_short_data.png"}  # damaged, yet Pillow decodes them (so must we)
    assert {names[i] for i in keep if not isinstance(want[i], str)} == decodable
    assert_same_pixels([want[i] for i in keep], [got[i] for i in keep], [names[i] for i in keep])
    texts = {want[i] for i in keep if isinstance(want[i], str)}  # many distinct failures are covered
    assert len(texts) >= 15, texts
    assert any("bytes not processed" in t for t in texts)


@pytest.mark.parametrize("mode,interp", [("squash", "bicubic"), ("shortest", "bilinear"), ("squash", "bilinear")])
def test_other_resize_modes_and_filters(bundle_copy, odd, tmp_path, mode, interp):
    from runtime_fixtures import rewrite_manifest

    def edit(m):
        m["preprocess"].update(resize_mode=mode, interpolation=interp, size=24)

    rewrite_manifest(bundle_copy, edit)
    root, names = odd
    names = [n for n in names if n.endswith((".jpg", ".png"))][::3] + ["thin_strip.png", "strip_3x30000.png"]
    paths = [root / n for n in names]
    want = python_pixels(bundle_copy, paths)
    assert not any(isinstance(w, str) for w in want)
    assert all(w.shape == (3, 24, 24) for w in want)
    assert_same_pixels(want, cpp_pixels(bundle_copy, paths, tmp_path), names)


def test_resize_matches_pillow_on_many_sizes(bundle_copy, tmp_path):
    """Random sizes around the bundle's (up, down, one axis, both, the vertical-pass-first case of
    Pillow 13 when the height shrinks by more than twice the width), saved losslessly."""
    rng = np.random.default_rng(7)
    root = tmp_path / "sizes"
    root.mkdir()
    names = []
    for i in range(40):
        w, h = (int(v) for v in rng.integers(1, 400, 2))
        if i % 4 == 0:
            h = int(w * rng.uniform(3, 9)) + 1
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:02d}_{w}x{h}.png")
        names.append(f"{i:02d}_{w}x{h}.png")
    paths = [root / n for n in names]
    assert_same_pixels(python_pixels(bundle_copy, paths), cpp_pixels(bundle_copy, paths, tmp_path), names)


# -- the engine --------------------------------------------------------------------------------------

class _Options(ctypes.Structure):
    _fields_ = [("precision", ctypes.c_char_p), ("threads", ctypes.c_int), ("bank", ctypes.c_char_p),
                ("labels_file", ctypes.c_char_p), ("ort_library", ctypes.c_char_p), ("verify", ctypes.c_int)]


def load_libqks():
    lib = ctypes.CDLL(str(BUILD / "libqks.so"))
    lib.qks_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Options), ctypes.POINTER(ctypes.c_void_p)]
    lib.qks_last_error.restype = ctypes.c_char_p
    lib.qks_tag_files.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t,
                                  ctypes.POINTER(ctypes.c_void_p)]
    lib.qks_tag_rgb.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_size_t,
                                ctypes.POINTER(ctypes.c_void_p)]
    for f in ("qks_results_query_features", "qks_results_probabilities"):
        getattr(lib, f).restype = ctypes.POINTER(ctypes.c_float)
        getattr(lib, f).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.qks_results_error.restype = ctypes.c_char_p
    lib.qks_results_error.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    for f in ("qks_queries", "qks_dim", "qks_label_count", "qks_image_size"):
        getattr(lib, f).restype = ctypes.c_size_t
        getattr(lib, f).argtypes = [ctypes.c_void_p]
    lib.qks_results_free.argtypes = [ctypes.c_void_p]
    lib.qks_close.argtypes = [ctypes.c_void_p]
    return lib


@contextlib.contextmanager
def opened(lib, bundle: Path):
    """qks_open with one ONNX Runtime thread and the wheel's library; qks_close at the end."""
    opts = _Options()
    lib.qks_options_init(ctypes.byref(opts))
    opts.threads = 1
    opts.ort_library = ort_library().encode()
    tagger = ctypes.c_void_p()
    assert lib.qks_open(str(bundle).encode(), ctypes.byref(opts), ctypes.byref(tagger)) == 0, lib.qks_last_error()
    try:
        yield tagger
    finally:
        lib.qks_close(tagger)


def test_query_features_and_probabilities_match_the_python_engine(runtime_bundle, odd):
    from qks.runtime.backend import select_backend
    from qks.runtime.bundle import Bundle
    from qks.runtime.labels import LabelBank
    from qks.runtime.scoring import logits, sigmoid

    root, names = odd
    paths = [root / n for n in names[:8]]
    lib = load_libqks()
    with opened(lib, runtime_bundle) as tagger:
        nq, d, n_labels = lib.qks_queries(tagger), lib.qks_dim(tagger), lib.qks_label_count(tagger)
        arr = (ctypes.c_char_p * len(paths))(*[str(p).encode() for p in paths])
        res = ctypes.c_void_p()
        assert lib.qks_tag_files(tagger, arr, len(paths), ctypes.byref(res)) == 0, lib.qks_last_error()
        try:
            assert all(lib.qks_results_error(res, i) is None for i in range(len(paths)))
            qf = np.stack([np.ctypeslib.as_array(lib.qks_results_query_features(res, i), (nq, d)).copy()
                           for i in range(len(paths))])
            probs = np.stack([np.ctypeslib.as_array(lib.qks_results_probabilities(res, i), (n_labels,)).copy()
                              for i in range(len(paths))])
        finally:
            lib.qks_results_free(res)
    bundle = Bundle.load(runtime_bundle)
    engine, _ = select_backend(bundle, "ort-cpu", threads=1, precision="fp32")
    with engine:
        want_qf = engine.run({"pixels": np.stack([bundle.preprocess.load(p) for p in paths])})["query_features"]
    np.testing.assert_array_equal(qf, want_qf)  # same graph, same ONNX Runtime, same batch: same bits
    bank = LabelBank.from_bundle(bundle)
    want_p = sigmoid(logits(want_qf, bank.embeddings, *bundle.scoring))
    np.testing.assert_allclose(probs, want_p, rtol=0, atol=1e-6)


def test_tag_rgb_equals_tagging_the_same_pixels_from_a_file(runtime_bundle, tmp_path):
    lib = load_libqks()
    with opened(lib, runtime_bundle) as tagger:
        rgb = np.random.default_rng(3).integers(0, 256, (45, 70, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / "a.png")
        padded = np.zeros((45, 80, 3), np.uint8)  # rows with padding: stride > 3 * width
        padded[:, :70] = rgb
        n = lib.qks_label_count(tagger)
        out = []
        for call in ("file", "rgb"):
            res = ctypes.c_void_p()
            if call == "file":
                arr = (ctypes.c_char_p * 1)(str(tmp_path / "a.png").encode())
                assert lib.qks_tag_files(tagger, arr, 1, ctypes.byref(res)) == 0
            else:
                assert lib.qks_tag_rgb(tagger, padded.tobytes(), 70, 45, 80 * 3, ctypes.byref(res)) == 0
            out.append(np.ctypeslib.as_array(lib.qks_results_probabilities(res, 0), (n,)).copy())
            lib.qks_results_free(res)
        np.testing.assert_array_equal(out[0], out[1])
        res = ctypes.c_void_p()
        assert lib.qks_tag_rgb(tagger, padded.tobytes(), 70, 45, 10, ctypes.byref(res)) == 1  # stride < 3 * width
        assert b"stride" in lib.qks_last_error()
        assert not res.value


# -- qks-tag against qks-infer -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(odd, broken, tmp_path_factory) -> Path:
    """Odd + broken images (no BMP: qks-tag does not read it), odd names, and things find_images skips."""
    root = tmp_path_factory.mktemp("folder") / "images"
    shutil.copytree(odd[0], root / "odd", symlinks=True)
    shutil.copytree(broken[0], root / "broken", symlinks=True)
    (root / "broken" / "a_bmp.bmp").unlink()
    data = (odd[0] / "sub420.jpg").read_bytes()
    (root / "new\nline,\"quoted\".jpg").write_bytes(data)
    with open(os.path.join(os.fsencode(root), b"caf\xe9.JPG"), "wb") as f:  # not UTF-8
        f.write(data)
    (root / ".jpg").write_bytes(data)  # no suffix for pathlib: not listed
    (root / ".hidden.jpg").write_bytes(data)  # suffix .jpg: listed
    (root / "folder.jpg").mkdir()
    (root / "folder.jpg" / "inner.png").write_bytes((odd[0] / "rgb.png").read_bytes())
    os.mkfifo(root / "pipe.jpg")
    os.symlink(root / "odd", root / "odd_again")  # a folder reached twice: walked once
    (root / "notes.txt").write_text("not an image\n")
    return root


@pytest.mark.parametrize("options", [["--all-scores"], [], ["--top-k", "2"], ["--threshold", "0.97"],
                                     ["--top-k", "3", "--threshold", "0.99", "--batch-size", "3"]],
                         ids=["all-scores", "default", "top-k", "threshold", "top-k+threshold"])
def test_records_and_exit_code_match_qks_infer(runtime_bundle, folder, tmp_path, options):
    common = [folder, "--bundle", runtime_bundle, "--threads", "1", *options]
    py = run_qks_infer([*common, "--no-progress", "--out", tmp_path / "py.jsonl"])
    cpp = run_tool(BUILD, "qks-tag", [*common, "--out", tmp_path / "cpp.jsonl"])
    assert py.returncode == 1, py.stderr
    assert cpp.returncode == py.returncode, cpp.stderr
    compare_records((tmp_path / "cpp.jsonl").read_text(encoding="utf-8"), (tmp_path / "py.jsonl").read_text(encoding="utf-8"))
    summary = re.compile(r"(\d+ images tagged \(\d+ errors, 0 already done\))")
    assert summary.search(cpp.stderr).group(1) == summary.search(py.stderr).group(1)
    assert "Traceback" not in cpp.stderr


def test_odd_names_and_skipped_entries_are_listed_like_qks_infer(runtime_bundle, folder, tmp_path):
    res = run_tool(BUILD, "qks-tag", [folder, "--bundle", runtime_bundle, "--threads", "1", "--out", tmp_path / "o.jsonl"])
    names = [json.loads(line)["image"] for line in (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()]
    assert res.returncode == 1
    assert "caf\\xe9.JPG" in names and 'new\nline,"quoted".jpg' in names and "folder.jpg/inner.png" in names
    assert ".hidden.jpg" in names
    assert not any(n in ("pipe.jpg", "notes.txt", ".jpg") for n in names)
    assert not any(n.startswith("odd_again/") for n in names)  # the same folder twice: walked once
    assert b'"caf\\\\xe9.JPG"' in (tmp_path / "o.jsonl").read_bytes()


def test_all_tagged_exits_0_and_stdout_output(runtime_bundle, odd, tmp_path):
    root = tmp_path / "good"
    shutil.copytree(odd[0], root)
    py = run_qks_infer([root, "--bundle", runtime_bundle, "--threads", "1", "--no-progress", "--top-k", "1"])
    cpp = run_tool(BUILD, "qks-tag", [root, "--bundle", runtime_bundle, "--threads", "1", "--top-k", "1"])
    assert py.returncode == cpp.returncode == 0, cpp.stderr
    compare_records(cpp.stdout, py.stdout)
    assert len(cpp.stdout.splitlines()) == len(odd[1])


def test_fp16_graph_matches_qks_infer(runtime_bundle, odd, tmp_path):
    root = tmp_path / "few"
    root.mkdir()
    for n in odd[1][:12]:
        shutil.copy(odd[0] / n, root / n)
    common = [root, "--bundle", runtime_bundle, "--threads", "1", "--precision", "fp16", "--all-scores"]
    py = run_qks_infer([*common, "--no-progress"])
    cpp = run_tool(BUILD, "qks-tag", common)
    assert py.returncode == cpp.returncode == 0, cpp.stderr
    assert "image_encoder.fp16.onnx" in cpp.stderr
    compare_records(cpp.stdout, py.stdout)
    missing = run_tool(BUILD, "qks-tag", [root, "--bundle", runtime_bundle, "--precision", "int8"])
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        "qks-tag: error: the bundle has no int8 image graph (qks-export --int8); it has: fp32, fp16")


def test_empty_folder(runtime_bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_tool(BUILD, "qks-tag", [tmp_path / "empty", "--bundle", runtime_bundle, "--out", tmp_path / "o.jsonl"])
    assert res.returncode == 0, res.stderr
    assert "warning: no images under" in res.stderr
    assert (tmp_path / "o.jsonl").read_text() == ""


def test_interrupt_exits_130_with_whole_records(runtime_bundle, odd, tmp_path):
    import signal
    import subprocess
    import time

    root = tmp_path / "many"
    root.mkdir()
    data = (odd[0] / "big.jpg").read_bytes()
    for i in range(300):
        (root / f"{i:03d}.jpg").write_bytes(data)
    out = tmp_path / "o.jsonl"
    from cpp_fixtures import cpp_env

    proc = subprocess.Popen([str(BUILD / "qks-tag"), str(root), "--bundle", str(runtime_bundle), "--threads", "1",
                             "--workers", "1", "--batch-size", "1", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, env=cpp_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while (not out.exists() or out.stat().st_size == 0) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = out.read_text().splitlines()
    assert proc.returncode == 130, err
    assert "interrupted" in err.strip().splitlines()[-1]
    assert 1 <= len(lines) < 300
    assert all(json.loads(line)["image"].endswith(".jpg") for line in lines)  # whole records only


def test_int8_graph_is_auto_on_the_cpu_and_matches_qks_infer(runtime_bundle, odd, tmp_path):
    from qks.export.int8 import add_int8_graph

    bundle = tmp_path / "bundle"
    shutil.copytree(runtime_bundle, bundle, ignore=shutil.ignore_patterns("cache"))
    root = tmp_path / "few"
    root.mkdir()
    for n in odd[1][:10]:
        shutil.copy(odd[0] / n, root / n)
    add_int8_graph(bundle, root)
    common = [root, "--bundle", bundle, "--threads", "1", "--all-scores", "--batch-size", "4"]
    py = run_qks_infer([*common, "--no-progress"])
    cpp = run_tool(BUILD, "qks-tag", common)
    assert py.returncode == cpp.returncode == 0, cpp.stderr
    assert "image_encoder.int8.onnx" in cpp.stderr and "image_encoder.int8.onnx" in py.stderr
    compare_records(cpp.stdout, py.stdout)  # same batches: INT8 graphs quantize activations per batch
