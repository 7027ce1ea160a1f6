"""Per-label thresholds stored in a bundle (qks-calibrate) used by every front end, with the same
selections as Python's `runtime.scoring.select` on the same probabilities: qks-tag and libqks (C and
C++ API), and the front ends that go through RecordBuilder (qks-infer, the Ray tagger, qks-serve)."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import pytest
from cpp_fixtures import BUILD, ort_library, run_tool, skip_reason
from qks.runtime.bundle import Bundle
from qks.runtime.calibrate import store
from qks.runtime.scoring import select, thresholds_for
from qks.runtime.thresholds import Fit, Target, document
from runtime_fixtures import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
cpp_only = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


@pytest.fixture(scope="module")
def calibrated(runtime_bundle, photo_dir, tmp_path_factory):
    """A copy of the runtime bundle whose default bank has per-label thresholds, set between the photos'
    probabilities (qks-infer's all-scores records, the ones qks-tag also decodes: not WebP) so every
    label keeps some photos and drops others; and those probabilities by image."""
    import shutil

    from qks.runtime.backend import select_backend
    from qks.runtime.infer import RecordBuilder, decode_image
    from qks.runtime.labels import LabelBank

    bundle = tmp_path_factory.mktemp("calibrated") / "bundle"
    shutil.copytree(runtime_bundle, bundle, ignore=shutil.ignore_patterns("cache"))
    b = Bundle.load(bundle)
    engine, _ = select_backend(b, "ort-cpu", threads=1, precision="fp32")
    with engine:
        build = RecordBuilder(engine, LabelBank.from_bundle(b), b.scoring, all_scores=True)
        images = ["astronaut.jpg", "sub/coffee.png", "sub/deeper/chelsea.JPG", "sub/camera_gray.png"]
        scores = {r["image"]: r["scores"] for r in build([decode_image(photo_dir, i, b.preprocess) for i in images])}
    names = (bundle / "labels" / "default.txt").read_text().splitlines()
    probs = np.array([[s[n] for n in names] for s in scores.values()], dtype=np.float32)
    # halfway between two photos' probabilities (records round them to 7 digits): some pass, some not
    ranked = np.sort(probs, axis=0)
    k = np.arange(len(names)) % (len(probs) - 1)
    thr = ((ranked[k, np.arange(len(names))] + ranked[k + 1, np.arange(len(names))]) / 2).astype(np.float32)
    fitted = Fit(thr, float(thr.mean()), [{"name": n, "fallback": False} for n in names])
    store(b, "default", document(fitted, bank="default", bank_key=b.banks["default"].key, target=Target("f1"),
                                 min_positives=5, data={}, created="test"))
    return bundle, names, thr, scores


def expected(scores: dict, names: list[str], top_k, threshold, thr) -> dict:
    """What Python's select gives on the same probabilities, by image."""
    rule = thresholds_for(type("Bank", (), {"thresholds": thr})(), top_k, threshold)
    out = {}
    for image, s in scores.items():
        p = np.array([s[n] for n in names], dtype=np.float32)
        out[image] = [n for n, _ in select(p, names, top_k, rule)]
    return out


@cpp_only
@pytest.mark.parametrize("options, top_k, threshold", [([], None, None), (["--top-k", "2"], 2, None),
                                                       (["--threshold", "0.3"], None, 0.3)],
                         ids=["per-label", "per-label+top-k", "explicit-threshold"])
def test_qks_tag_selects_with_the_stored_thresholds(calibrated, photo_dir, tmp_path, options, top_k, threshold):
    bundle, names, thr, scores = calibrated
    res = run_tool(BUILD, "qks-tag", [photo_dir, "--bundle", bundle, "--threads", "1", "--out", tmp_path / "o.jsonl",
                                      *options])
    assert res.returncode == 1, res.stderr  # the photo folder holds a broken file
    assert ("per-label thresholds of the bank" in res.stderr) == (threshold is None)
    got = {r["image"]: list(r["labels"]) for r in read_jsonl(tmp_path / "o.jsonl") if "labels" in r}
    want = expected(scores, names, top_k, threshold, thr)
    assert got == want  # every photo qks-tag decodes (not rocket.webp), each with Python's selection
    if threshold is None:  # the per-label thresholds select: neither every label nor none
        assert any(0 < len(v) < len(names) for v in got.values())


@cpp_only
def test_libqks_c_api_gives_the_thresholds_and_selects_with_them(calibrated, runtime_bundle, photo_dir):
    bundle, names, thr, scores = calibrated
    lib = ctypes.CDLL(str(BUILD / "libqks.so"))

    class Options(ctypes.Structure):
        _fields_ = [("precision", ctypes.c_char_p), ("threads", ctypes.c_int), ("bank", ctypes.c_char_p),
                    ("labels_file", ctypes.c_char_p), ("ort_library", ctypes.c_char_p), ("verify", ctypes.c_int)]

    lib.qks_label_thresholds.restype = ctypes.POINTER(ctypes.c_float)
    lib.qks_results_select.restype = ctypes.c_size_t
    lib.qks_results_record.restype = ctypes.c_char_p
    lib.qks_last_error.restype = ctypes.c_char_p

    def open_(path):
        o = Options()
        lib.qks_options_init(ctypes.byref(o))
        o.ort_library, o.threads = ort_library().encode(), 1
        t = ctypes.c_void_p()
        assert lib.qks_open(str(path).encode(), ctypes.byref(o), ctypes.byref(t)) == 0, lib.qks_last_error()
        return t

    plain = open_(runtime_bundle)
    assert not lib.qks_label_thresholds(plain)  # NULL: no thresholds
    lib.qks_close(plain)
    t = open_(bundle)
    try:
        got = lib.qks_label_thresholds(t)
        assert [got[i] for i in range(len(names))] == thr.tolist()
        image = "astronaut.jpg"
        paths = (ctypes.c_char_p * 1)(str(photo_dir / image).encode())
        res = ctypes.c_void_p()
        assert lib.qks_tag_files(t, paths, 1, ctypes.byref(res)) == 0
        idx = (ctypes.c_size_t * len(names))()
        for top_k, threshold in ((0, -1.0), (2, -1.0), (0, 0.3)):
            n = lib.qks_results_select(res, 0, top_k, ctypes.c_double(threshold), idx, len(names))
            want = expected({image: scores[image]}, names, top_k or None, None if threshold < 0 else threshold, thr)
            assert [names[idx[i]] for i in range(n)] == want[image]
            rec = json.loads(lib.qks_results_record(res, 0, image.encode(), top_k, ctypes.c_double(threshold), 0))
            assert list(rec["labels"]) == want[image]
        lib.qks_results_free(res)
    finally:
        lib.qks_close(t)


def test_calibrated_bank_in_python(calibrated):
    bundle, names, thr, _ = calibrated
    from qks.runtime.labels import LabelBank

    bank = LabelBank.from_bundle(Bundle.load(bundle))
    assert np.array_equal(bank.thresholds, thr)
    # a --labels list that is exactly the calibrated bank is that bank (same key), thresholds included;
    # any other list is encoded or cached and has none
    assert np.array_equal(LabelBank.for_labels(Bundle.load(bundle), names).thresholds, thr)
    assert LabelBank.for_labels(Bundle.load(bundle), names[:2]).thresholds is None


@cpp_only
@pytest.mark.parametrize("options", [[], ["--top-k", "2"], ["--threshold", "0.3"]])
def test_qks_infer_and_qks_tag_agree(calibrated, photo_dir, tmp_path, options):
    from runtime_fixtures import run_blocked

    bundle = calibrated[0]
    common = [str(photo_dir), "--bundle", str(bundle), "--threads", "1", *options]
    py = run_blocked("infer", [*common, "--no-progress", "--out", str(tmp_path / "py.jsonl")])
    cpp = run_tool(BUILD, "qks-tag", [*common, "--out", tmp_path / "cpp.jsonl"])
    assert py.returncode == cpp.returncode == 1, py.stderr
    label_lists = lambda p: {r["image"]: list(r["labels"]) for r in read_jsonl(p) if "labels" in r}  # noqa: E731
    cpp_lists = label_lists(tmp_path / "cpp.jsonl")  # qks-tag does not decode WebP: that one is an error there
    assert {k: v for k, v in label_lists(tmp_path / "py.jsonl").items() if k in cpp_lists} == cpp_lists


def test_ray_tagger_records_use_the_stored_thresholds(calibrated, photo_dir):
    pytest.importorskip("ray")
    from qks.runtime.ray_tagger import QksTagger

    bundle, names, thr, scores = calibrated
    tagger = QksTagger(str(bundle), backend="ort-cpu", threads=1)
    rec = tagger.tag([str(photo_dir / "astronaut.jpg")])[0]
    assert list(rec["labels"]) == expected({"astronaut.jpg": scores["astronaut.jpg"]}, names, None, None,
                                           thr)["astronaut.jpg"]


def _query_features(bundle: Path, photo_dir: Path, images: list[str]) -> np.ndarray:
    from qks.runtime.backend import select_backend

    b = Bundle.load(bundle)
    engine, _ = select_backend(b, "ort-cpu", threads=1, precision="fp32")
    with engine:
        pixels = np.stack([b.preprocess.load(photo_dir / i) for i in images])
        return engine.run({engine.inputs[0].name: pixels})["query_features"]


def test_triton_onnx_repository_selects_with_the_stored_thresholds(calibrated, photo_dir, tmp_path):
    """The scoring model's `selected` output is p >= the label's stored threshold, as Python's select."""
    import onnxruntime as ort
    from qks.export.triton import write_repository
    from qks.runtime.scoring import logits, sigmoid

    bundle, names, thr, scores = calibrated
    write_repository(bundle, tmp_path / "repo")
    images = sorted(scores)
    qf = _query_features(bundle, photo_dir, images)
    sess = ort.InferenceSession(str(tmp_path / "repo" / "qks_scoring" / "1" / "model.onnx"))
    probs, selected = sess.run(["probabilities", "selected"], {"query_features": qf})
    bank = Bundle.load(bundle).banks["default"]
    want_probs = sigmoid(logits(qf, np.load(bank.path), *Bundle.load(bundle).scoring))
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6)
    for i in range(len(images)):
        assert [names[j] for j in np.flatnonzero(selected[i])] == sorted(
            (n for n, _ in select(probs[i], names, None, thr)), key=names.index)
    assert 'name: "selected"' in (tmp_path / "repo" / "qks_scoring" / "config.pbtxt").read_text()
    assert "per-label thresholds (qks-calibrate)" in (tmp_path / "repo" / "qks_scoring" / "config.pbtxt").read_text()


def test_triton_onnx_repository_without_thresholds_selects_at_one_half(runtime_bundle, tmp_path):
    import onnxruntime as ort
    from qks.export.triton import write_repository

    write_repository(runtime_bundle, tmp_path / "repo")
    sess = ort.InferenceSession(str(tmp_path / "repo" / "qks_scoring" / "1" / "model.onnx"))
    qf = np.random.default_rng(0).normal(size=(3, *sess.get_inputs()[0].shape[1:])).astype(np.float32)
    probs, selected = sess.run(["probabilities", "selected"], {"query_features": qf})
    assert np.array_equal(selected, probs >= np.float32(0.5))


def test_triton_python_model_selects_with_the_stored_thresholds(calibrated, photo_dir, tmp_path):
    from qks.export.triton import write_python_repository
    from qks.serving.triton_model import QksServingModel, serve_batch

    bundle, names, thr, scores = calibrated
    write_python_repository(bundle, tmp_path / "repo")
    model = QksServingModel(tmp_path / "repo" / "qks", threads=1)
    try:
        assert np.array_equal(model.thresholds, thr)
        images = sorted(scores)
        blobs = np.array([[(photo_dir / i).read_bytes()] for i in images], dtype=object)
        ((probs, _lg),) = serve_batch(model, [(None, blobs)])
        for i in range(len(images)):  # the `selected` output execute() returns: probs >= model.thresholds
            assert [names[j] for j in np.flatnonzero(probs[i] >= model.thresholds)] == sorted(
                (n for n, _ in select(probs[i], names, None, thr)), key=names.index)
    finally:
        model.close()


def _rewrite_thresholds(bundle: Path, edit) -> None:
    """Edit the stored thresholds document and re-hash it (so only the content check can refuse it)."""
    from qks.runtime.manifest import file_record
    from runtime_fixtures import rewrite_manifest

    rel = "labels/default.thresholds.json"
    doc = json.loads((bundle / rel).read_text())
    edit(doc)
    (bundle / rel).write_text(json.dumps(doc) + "\n")
    rewrite_manifest(bundle, lambda m: m["files"].__setitem__(rel, file_record(bundle, rel)))


@cpp_only
@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(bank_key="0" * 64), "fitted for another version of the bank"),
    (lambda d: d["thresholds"].pop(), "needs 5 thresholds (one per label), has 4"),
    (lambda d: d["thresholds"].__setitem__(1, 1.5), "every threshold must be a number in [0, 1]"),
    (lambda d: d.update(format="other"), "not a qks-thresholds version 1 file"),
], ids=["stale-key", "count", "range", "format"])
def test_bad_thresholds_are_refused_in_the_same_words(calibrated, photo_dir, tmp_path, edit, message):
    import shutil

    from qks.runtime.manifest import BundleError

    bundle = tmp_path / "bundle"
    shutil.copytree(calibrated[0], bundle)
    _rewrite_thresholds(bundle, edit)
    with pytest.raises(BundleError) as e:
        Bundle.load(bundle)
    assert message in str(e.value)
    res = run_tool(BUILD, "qks-tag", [photo_dir, "--bundle", bundle, "--threads", "1"])
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == f"qks-tag: error: {e.value}"


def test_qks_serve_records_use_the_stored_thresholds(calibrated, photo_dir):
    """qks-serve's Service (RecordBuilder.records, the bundle's banks): the same selections."""
    import asyncio

    pytest.importorskip("fastapi")
    from qks.serving.service import ServeConfig, Service, TagOptions

    bundle, names, thr, scores = calibrated
    service = Service(ServeConfig(bundle, backend="ort-cpu", threads=1, decode_workers=1))
    images = sorted(scores)
    try:
        for top_k, threshold in ((None, None), (2, None), (None, 0.3)):
            out = asyncio.run(service.tag([(i, (photo_dir / i).read_bytes()) for i in images],
                                          TagOptions(top_k=top_k, threshold=threshold)))
            got = {r["image"]: list(r["labels"]) for r in out["results"]}
            assert got == expected(scores, names, top_k, threshold, thr)
    finally:
        service.close()
