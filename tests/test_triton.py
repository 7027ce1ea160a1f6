"""qks-triton: a Triton model repository from a bundle. No Triton server here (it does not install
from PyPI): every config.pbtxt is parsed with tritonclient's ModelConfig protobuf, the scoring graph
is run under ONNX Runtime against the runtime's scoring, and the ensemble is run end to end the way
Triton would, step by step from its parsed input_map/output_map, against qks-infer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from runtime_fixtures import read_jsonl, rewrite_manifest, run_blocked
from triton_helpers import NEW_LABELS, hashes, parse_config, pb, triton_cli, write_labels

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

_pb, _parse, _cli, _hashes, _write_labels = pb, parse_config, triton_cli, hashes, write_labels


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def repo(runtime_bundle, tmp_path_factory) -> Path:
    """The repository for the shared bundle with its defaults (read-only: copy it to break it)."""
    from qks.export.triton import write_repository

    out = tmp_path_factory.mktemp("triton") / "repo"
    report = write_repository(runtime_bundle, out)
    assert report.path == out and report.models == {"image": "qks_image", "scoring": "qks_scoring", "ensemble": "qks"}
    return out


# -- (1) every config parses with tritonclient's ModelConfig; a misspelled field fails ----------------


def test_configs_parse_with_tritonclient(repo, runtime_bundle):
    pb = _pb()
    from qks.export.triton import validate_repository

    m = json.loads((runtime_bundle / "manifest.json").read_text())
    assert sorted(p.name for p in repo.iterdir()) == ["qks", "qks-triton.json", "qks_image", "qks_scoring"]
    img, sc, ens = (_parse(repo / n / "config.pbtxt") for n in ("qks_image", "qks_scoring", "qks"))
    # image model: the bundle's fp32 graph, its own names and dims without the batch, dynamic batching
    g = m["graphs"]["image_encoder"]
    assert (img.name, img.platform, img.max_batch_size) == ("qks_image", "onnxruntime_onnx", 32)
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in img.input] == \
        [(g["inputs"][0]["name"], "TYPE_FP32", g["inputs"][0]["shape"][1:])]
    nq, d = g["outputs"][0]["shape"][1:]  # Nq from the graph's recorded output shape
    (e,) = g["outputs"][1]["shape"][1:]  # the image embedding (issue 22) is served too
    assert [(t.name, list(t.dims)) for t in img.output] == [("query_features", [nq, d]), ("embedding", [e])]
    assert img.HasField("dynamic_batching") and img.dynamic_batching.max_queue_delay_microseconds > 0
    assert not img.instance_group  # onnxruntime: Triton picks GPU if it has one
    assert (repo / "qks_image" / "1" / "model.onnx").read_bytes() == (runtime_bundle / g["file"]).read_bytes()
    # scoring model: the bank's label count, label file for the classification extension
    names = (runtime_bundle / "labels" / "default.txt").read_text(encoding="utf-8").splitlines()
    assert (sc.platform, sc.max_batch_size) == ("onnxruntime_onnx", 32)
    assert [(t.name, list(t.dims)) for t in sc.input] == [("query_features", [nq, d])]
    probs = {t.name: t for t in sc.output}["probabilities"]
    assert list(probs.dims) == [len(names)] and probs.label_filename == "labels.txt"
    assert (repo / "qks_scoring" / "labels.txt").read_text(encoding="utf-8").splitlines() == names
    # ensemble: pixels -> probabilities, label count left to the scoring model
    assert (ens.platform, ens.max_batch_size) == ("ensemble", 32)
    assert [t.name for t in ens.input] == ["pixels"] and list(ens.output[0].dims) == [-1]
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["qks_image", "qks_scoring"]
    assert (repo / "qks" / "1").is_dir()
    assert validate_repository(repo) == []
    code, out, err = _cli(["--check", repo])
    assert code == 0 and "valid Triton repository (3 models" in out, err


@pytest.mark.parametrize("model", ["qks_image", "qks_scoring", "qks"])
def test_misspelled_field_fails_validation(repo, tmp_path, model):
    _pb()
    from qks.export.triton import validate_repository

    bad = tmp_path / "repo"
    shutil.copytree(repo, bad)
    cfg = bad / model / "config.pbtxt"
    text = cfg.read_text()
    assert "max_batch_size:" in text
    cfg.write_text(text.replace("max_batch_size:", "max_bach_size:"))
    problems = validate_repository(bad)
    assert len(problems) == 1, problems  # the parse error, no cascade
    assert problems[0].startswith(f"{model}/config.pbtxt:") and "max_bach_size" in problems[0]
    code, out, err = _cli(["--check", bad])
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("qks-triton: error: ") and "max_bach_size" in err


def _edit(repo: Path, tmp_path: Path, model: str, old: str, new: str) -> Path:
    bad = tmp_path / "edited"
    shutil.copytree(repo, bad)
    cfg = bad / model / "config.pbtxt"
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new, 1))
    return bad


@pytest.mark.parametrize("model, old, new, expect", [
    # a step reads a tensor nobody produces
    ("qks", 'input_map [\n        {\n          key: "query_features"\n          value: "query_features"',
     'input_map [\n        {\n          key: "query_features"\n          value: "qf"', "reads 'qf'"),
    # an input_map key that is not an input of the model
    ("qks", 'key: "pixels"', 'key: "image"', "not an input of qks_image"),
    # the scoring model's input disagrees with the image model's output (and its own ONNX graph)
    ("qks_scoring", "dims: [ 4, 32 ]", "dims: [ 4, 31 ]", "inconsistent|shape"),
    ("qks_scoring", "data_type: TYPE_FP32", "data_type: TYPE_FP16", "TYPE_FP16"),
    # the ensemble allows a larger batch than a model
    ("qks", "max_batch_size: 32", "max_batch_size: 64", "larger than qks_image's 32"),
    # a name that is not the folder's
    ("qks_image", 'name: "qks_image"', 'name: "qks_img"', "not the folder's name"),
    # an output name the ONNX graph does not have
    ("qks_image", 'name: "query_features"', 'name: "features"', "not in model.onnx|not an output"),
])
def test_validation_catches_broken_wiring(repo, tmp_path, model, old, new, expect):
    _pb()
    import re

    from qks.export.triton import validate_repository

    problems = validate_repository(_edit(repo, tmp_path, model, old, new))
    assert problems and any(re.search(expect, p) for p in problems), problems


def test_validation_catches_missing_files(repo, tmp_path):
    _pb()
    from qks.export.triton import validate_repository

    bad = tmp_path / "repo"
    shutil.copytree(repo, bad)
    (bad / "qks_scoring" / "labels.txt").write_text("one\ntwo\n")
    (bad / "qks_image" / "1" / "model.onnx").unlink()
    shutil.rmtree(bad / "qks" / "1")
    problems = validate_repository(bad)
    assert any("labels.txt has 2 labels" in p for p in problems), problems
    assert any("qks_image/1: model file model.onnx is missing" in p for p in problems), problems
    assert any("qks: no version folder" in p for p in problems), problems


# -- (2) the scoring graph computes the runtime's probabilities --------------------------------------


def _query_features(bundle: Path, pixels: np.ndarray) -> np.ndarray:
    return _session(bundle / "image_encoder.onnx").run(None, {"pixels": pixels})[0]


def _photos_pixels(bundle: Path, photo_dir: Path) -> np.ndarray:
    from qks.runtime.bundle import Bundle

    pp = Bundle.load(bundle).preprocess
    files = ["astronaut.jpg", "sub/coffee.png", "sub/deeper/chelsea.JPG", "rocket.webp"]
    return np.stack([pp.load(photo_dir / f) for f in files])


@pytest.mark.parametrize("labels", ["bank", "new"])
def test_scoring_graph_gives_the_runtime_probabilities(bundle_copy, photo_dir, tmp_path, labels):
    from qks.export.triton import write_repository
    from qks.runtime.bundle import Bundle
    from qks.runtime.labels import LabelBank
    from qks.runtime.scoring import logits, sigmoid

    bundle = Bundle.load(bundle_copy)
    if labels == "new":
        report = write_repository(bundle_copy, tmp_path / "repo", labels=_write_labels(tmp_path / "l.txt", NEW_LABELS))
        bank = LabelBank.for_labels(bundle, NEW_LABELS)
        assert report.bank_source in ("computed", f"cache:{bundle_copy}") or report.bank_source.startswith("cache:")
    else:
        write_repository(bundle_copy, tmp_path / "repo")
        bank = LabelBank.from_bundle(bundle)
    repo = tmp_path / "repo"
    assert (repo / "qks_scoring" / "labels.txt").read_text(encoding="utf-8").splitlines() == bank.names
    rng = np.random.default_rng(0)
    pixels = np.concatenate([_photos_pixels(bundle_copy, photo_dir),
                             rng.standard_normal((3, 3, 32, 32), dtype=np.float32)])
    qf = _query_features(bundle_copy, pixels)
    probs, lg = _session(repo / "qks_scoring" / "1" / "model.onnx").run(["probabilities", "logits"],
                                                                       {"query_features": qf})
    mode, k = bundle.scoring
    want = logits(qf, bank.embeddings, mode, k)
    assert probs.shape == (len(pixels), len(bank.names)) and probs.dtype == np.float32
    np.testing.assert_allclose(lg, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(probs, sigmoid(want), rtol=0, atol=1e-6)
    # the scores are not trivially equal (a broken graph could give all 0.5)
    assert np.ptp(probs) > 1e-3


@pytest.mark.parametrize("queries", [4, None])
@pytest.mark.parametrize("mode, k", [("max", 1), ("topk", 2), ("topk", 9)])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_scoring_graph_modes(mode, k, queries, dtype):
    """max and top-k-sum (k clamped to Nq, statically or in the graph), fp32 or fp16 query features:
    the same numbers as qks.runtime.scoring on the float32 features."""
    from qks.export.triton import scoring_model
    from qks.runtime.scoring import logits, sigmoid

    rng = np.random.default_rng(1)
    emb = rng.standard_normal((7, 16)).astype(np.float32)
    qf = rng.standard_normal((5, 4, 16)).astype(dtype)
    model = scoring_model(emb, queries=queries, in_dtype=dtype, mode=mode, k=k, opset=18)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probs, lg = sess.run(["probabilities", "logits"], {"query_features": qf})
    want = logits(qf.astype(np.float32), emb, mode, k)
    np.testing.assert_allclose(lg, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(probs, sigmoid(want), atol=1e-6)
    if mode == "topk" and k > 1:  # not the max: the sum of the top k
        assert not np.allclose(lg, logits(qf.astype(np.float32), emb, "max"))


def test_scoring_opset17_uses_attribute_axes():
    from qks.export.triton import scoring_model
    from qks.runtime.scoring import logits

    rng = np.random.default_rng(3)
    emb, qf = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((2, 5, 8)).astype(np.float32)
    model = scoring_model(emb, queries=5, opset=17)
    assert model.opset_import[0].version == 17
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"query_features": qf})[0]
    np.testing.assert_allclose(out, logits(qf, emb), rtol=1e-6, atol=1e-6)


def test_topk_bundle_scoring_mode(bundle_copy, tmp_path):
    """The bundle's scoring mode goes into the graph (a topk bundle gets TopK + ReduceSum)."""
    from qks.export.triton import write_repository

    rewrite_manifest(bundle_copy, lambda m: m.__setitem__("scoring", {"mode": "topk", "k": 2}))
    write_repository(bundle_copy, tmp_path / "repo")
    model = onnx.load(str(tmp_path / "repo" / "qks_scoring" / "1" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "TopK" in ops and "ReduceSum" in ops and "ReduceMax" not in ops


# -- (3) the ensemble, run as Triton would, gives qks-infer's probabilities ---------------------------


def _run_ensemble(repo: Path, name: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Execute REPO/NAME's ensemble_scheduling with onnxruntime: each step's input_map takes ensemble
    tensors to the model's inputs, its output_map puts the model's outputs back."""
    ens = _parse(repo / name / "config.pbtxt")
    assert [t.name for t in ens.input] == ["pixels"]
    tensors = {"pixels": pixels}
    for step in ens.ensemble_scheduling.step:
        cfg = _parse(repo / step.model_name / "config.pbtxt")
        assert cfg.platform == "onnxruntime_onnx"
        feeds = {key: tensors[value] for key, value in step.input_map.items()}
        assert set(feeds) == {t.name for t in cfg.input}
        for t in cfg.input:  # Triton's own check: dims without the batch, data type
            assert list(feeds[t.name].shape[1:]) == list(t.dims)
            assert feeds[t.name].dtype == np.float32 and _pb().DataType.Name(t.data_type) == "TYPE_FP32"
        keys = list(step.output_map.keys())
        outs = _session(repo / step.model_name / "1" / "model.onnx").run(keys, feeds)
        for key, arr in zip(keys, outs, strict=True):
            tensors[step.output_map[key]] = arr
    return {t.name: tensors[t.name] for t in ens.output}


def test_ensemble_end_to_end_matches_qks_infer(repo, runtime_bundle, photo_dir, tmp_path):
    out = tmp_path / "scores.jsonl"
    r = run_blocked("infer", [str(photo_dir), "--bundle", str(runtime_bundle), "--all-scores", "--backend", "ort-cpu",
                              "--precision", "fp32", "--no-progress", "--out", str(out)])
    assert r.returncode in (0, 1), r.stderr  # 1: the broken.jpg fixture is an error record
    records = {rec["image"]: rec["scores"] for rec in read_jsonl(out) if "scores" in rec}
    files = sorted(records)
    assert len(files) >= 4
    from qks.runtime.bundle import Bundle

    pp = Bundle.load(runtime_bundle).preprocess
    pixels = np.stack([pp.load(photo_dir / f) for f in files])
    result = _run_ensemble(repo, "qks", pixels)
    labels = (repo / "qks_scoring" / "labels.txt").read_text(encoding="utf-8").splitlines()
    want = np.array([[records[f][n] for n in labels] for f in files])
    assert result["probabilities"].shape == want.shape
    np.testing.assert_allclose(result["probabilities"], want, rtol=0, atol=1e-6)
    assert result["logits"].shape == want.shape


# -- (4) --labels-only rewrites the scoring model and nothing else ------------------------------------


def test_labels_only_changes_only_the_scoring_model(bundle_copy, photo_dir, tmp_path):
    from qks.runtime.bundle import Bundle
    from qks.runtime.labels import LabelBank
    from qks.runtime.scoring import logits, sigmoid

    repo = tmp_path / "repo"
    code, out, err = _cli([bundle_copy, repo, "-q"])
    assert code == 0 and out.startswith(f"wrote {repo}"), err
    before = {m: _hashes(repo / m) for m in ("qks_image", "qks_scoring", "qks")}
    labels = _write_labels(tmp_path / "new.txt", NEW_LABELS)
    code, out, err = _cli([bundle_copy, repo, "--labels-only", "--labels", labels])
    assert code == 0, err
    assert "validated" in err and out.strip() == f"wrote {repo} (qks_scoring)"
    after = {m: _hashes(repo / m) for m in ("qks_image", "qks_scoring", "qks")}
    assert after["qks_image"] == before["qks_image"] and after["qks"] == before["qks"]
    assert after["qks_scoring"]["labels.txt"] != before["qks_scoring"]["labels.txt"]
    assert after["qks_scoring"]["1/model.onnx"] != before["qks_scoring"]["1/model.onnx"]
    assert [p for p in [*repo.parent.iterdir(), *repo.iterdir()] if p.name.startswith(".")] == []  # no temp left
    marker = json.loads((repo / "qks-triton.json").read_text())
    assert marker["scoring"]["labels"] == len(NEW_LABELS)
    cfg = _parse(repo / "qks_scoring" / "config.pbtxt")
    assert list(cfg.output[0].dims) == [len(NEW_LABELS)]
    # and the ensemble now scores the new labels like the runtime does
    pixels = _photos_pixels(bundle_copy, photo_dir)
    bundle = Bundle.load(bundle_copy)
    bank = LabelBank.for_labels(bundle, NEW_LABELS)
    want = sigmoid(logits(_query_features(bundle_copy, pixels), bank.embeddings))
    np.testing.assert_allclose(_run_ensemble(repo, "qks", pixels)["probabilities"], want, atol=1e-6)


def test_labels_only_refuses_another_model(bundle_copy, tmp_path):
    repo = tmp_path / "repo"
    assert _cli([bundle_copy, repo, "-q"])[0] == 0
    marker_path = repo / "qks-triton.json"
    good = marker_path.read_text()
    before = _hashes(repo)
    # the image model came from another bundle: its labels would be meaningless
    marker = json.loads(good)
    marker["image_model"]["sha256"] = "0" * 64
    marker_path.write_text(json.dumps(marker))
    code, out, err = _cli([bundle_copy, repo, "--labels-only"])
    assert code == 1 and "is not from this bundle" in err and len(err.strip().splitlines()) == 1
    # the bank's D does not match the image model's query features
    marker = json.loads(good)
    marker["image_model"]["outputs"][0]["shape"][-1] = 31
    marker_path.write_text(json.dumps(marker))
    code, out, err = _cli([bundle_copy, repo, "--labels-only"])
    assert code == 1 and "the image model's query features have 31" in err
    marker_path.write_text(good)
    assert _hashes(repo) == before  # nothing was changed by the refused runs
    # not a qks repository at all
    other = tmp_path / "other"
    other.mkdir()
    code, out, err = _cli([bundle_copy, other, "--labels-only"])
    assert code == 1 and "is not a qks Triton repository" in err


# -- (5) a TensorRT plan --------------------------------------------------------------------------------


def _fake_plan(bundle: Path, *, flavor="tensorrt", sm="90", lo=1, hi=4, graph="image_encoder",
               out_dtype="float32") -> bytes:
    """A plan entry as qks-export --tensorrt writes it (the plan itself is fake bytes: nothing here
    deserializes it)."""
    from qks.runtime.manifest import file_record, sha256_file

    m = json.loads((bundle / "manifest.json").read_text())
    g = m["graphs"][graph]
    stem = f"{graph}-{g['sha256'][:12]}-{'trt' if flavor == 'tensorrt' else 'trtrtx'}10.8.0-sm{sm}"
    (bundle / "engines").mkdir(exist_ok=True)
    plan = f"fake plan for sm{sm}".encode()
    (bundle / "engines" / f"{stem}.plan").write_bytes(plan)
    shape = lambda b: [b, *g["inputs"][0]["shape"][1:]]  # noqa: E731
    side = {"graph": graph, "graph_sha256": sha256_file(bundle / g["file"]),
            "trt_module": "tensorrt" if flavor == "tensorrt" else "tensorrt_rtx", "trt_flavor": flavor,
            "trt_version": "10.8.0", "sm": sm, "gpu_name": "NVIDIA H100 80GB HBM3", "precision": "fp32",
            "profile": {"pixels": {"min": shape(lo), "opt": shape(hi), "max": shape(hi)}},
            "inputs": [dict(g["inputs"][0], shape=[-1, *g["inputs"][0]["shape"][1:]])],
            "outputs": [dict(g["outputs"][0], dtype=out_dtype, shape=[-1, *g["outputs"][0]["shape"][1:]])],
            "io_source": "parsed network", "strongly_typed": True, "timing_cache": None,
            "built": "2026-11-26T00:00:00Z"}
    (bundle / "engines" / f"{stem}.json").write_text(json.dumps(side))
    for rel in (f"engines/{stem}.plan", f"engines/{stem}.json"):
        m["files"][rel] = file_record(bundle, rel)
    m["engines"] = [*m.get("engines", []), {"file": f"engines/{stem}.plan", "sidecar": f"engines/{stem}.json",
                                             **side}]
    from qks.runtime.manifest import write_manifest

    write_manifest(bundle, m)
    return plan


def test_plan_config(bundle_copy, tmp_path):
    pb = _pb()
    from qks.export.triton import validate_repository, write_repository

    plan = _fake_plan(bundle_copy, hi=4)
    repo = tmp_path / "repo"
    report = write_repository(bundle_copy, repo, image_model="plan")
    assert report.image.kind == "plan" and report.validated
    cfg = _parse(repo / "qks_image" / "config.pbtxt")
    assert (cfg.platform, cfg.max_batch_size) == ("tensorrt_plan", 4)  # the profile's max batch
    assert [pb.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group] == ["KIND_GPU"]
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("pixels", [3, 32, 32])]
    assert (repo / "qks_image" / "1" / "model.plan").read_bytes() == plan
    assert not (repo / "qks_image" / "1" / "model.onnx").exists()
    assert "TensorRT 10.8.0" in (repo / "qks_image" / "config.pbtxt").read_text()
    for name in ("qks_scoring", "qks"):
        assert _parse(repo / name / "config.pbtxt").max_batch_size == 4
    assert validate_repository(repo) == []
    # auto: the plan only when --gpu-sm names its GPU; otherwise ONNX, with the plan's max batch
    r = write_repository(bundle_copy, tmp_path / "auto")
    assert r.image.kind == "onnx" and "--gpu-sm" in r.image.reason and r.image.max_batch == 4
    assert write_repository(bundle_copy, tmp_path / "sm90", gpu_sm="9.0").image.kind == "plan"
    assert write_repository(bundle_copy, tmp_path / "small", image_model="plan", max_batch=2).image.max_batch == 2


@pytest.mark.parametrize("case, args, expect", [
    ("other gpu", ["--image-model", "plan", "--gpu-sm", "86"], "no plan for GPU sm_86; its plans are for sm_90"),
    ("min batch", ["--image-model", "plan"], "min batch is 2; Triton needs min batch 1"),
    ("rtx", ["--image-model", "plan"], "TensorRT for RTX"),
    ("too big", ["--image-model", "plan", "--max-batch", "8"], "larger than the plan's profile max batch 4"),
    ("no plan", ["--image-model", "plan"], "no TensorRT plan"),
])
def test_plan_refusals(bundle_copy, tmp_path, case, args, expect):
    if case == "min batch":
        _fake_plan(bundle_copy, lo=2)
    elif case == "rtx":
        _fake_plan(bundle_copy, flavor="tensorrt_rtx", sm="86")
    elif case != "no plan":
        _fake_plan(bundle_copy)
    code, out, err = _cli([bundle_copy, tmp_path / "repo", *args])
    assert code == 1 and out == "" and err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "repo").exists()


# -- (6) CLI errors: one line, non-zero, nothing half-written ------------------------------------------


def test_cli_errors_are_one_line(runtime_bundle, bundle_copy, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "resnet").mkdir()
    bad_labels = tmp_path / "latin1.txt"
    bad_labels.write_bytes("caf\xe9\n".encode("latin-1"))
    cases = [
        ([tmp_path / "nope", tmp_path / "r1"], 1, "bundle folder not found"),
        ([runtime_bundle, foreign], 1, "is not a qks Triton repository"),
        ([bundle_copy, tmp_path / "r2", "--labels", bad_labels], 1, "not UTF-8"),
        ([bundle_copy, tmp_path / "r3", "--labels", tmp_path / "missing.txt"], 1, "label file not found"),
        ([bundle_copy, tmp_path / "r4", "--bank", "nope"], 1, "no label bank 'nope'"),
        ([bundle_copy, tmp_path / "r5", "--labels", bad_labels, "--bank", "default"], 1, "not both"),
        ([bundle_copy, tmp_path / "r6", "--image-model", "int8"], 1, "no int8 image graph"),
        ([bundle_copy, tmp_path / "r7", "--name", "bad name"], 1, "model name 'bad name'"),
        ([bundle_copy, tmp_path / "r8", "--gpu-sm", "ninety"], 1, "compute capability"),
        ([bundle_copy], 2, "give BUNDLE and REPO"),
        ([bundle_copy, tmp_path / "r9", "--image-model", "tflite"], 2, "Invalid value for '--image-model'"),
        (["--check", tmp_path / "nope"], 1, "Triton repository not found"),
        (["--check", foreign, bundle_copy], 2, "--check REPO takes no other arguments"),
        ([bundle_copy, tmp_path / "r10", "--labels-only"], 1, "Triton repository not found"),
    ]
    for args, want_code, expect in cases:
        code, out, err = _cli(args)
        assert code == want_code, (args, code, err)
        assert out == "" and err.startswith("qks-triton: error: ") and err.count("\n") == 1, (args, err)
        assert expect in err, (args, err)
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "foreign", "latin1.txt"]  # nothing half-written
    assert [p.name for p in foreign.iterdir()] == ["resnet"]


def test_rewrite_replaces_only_a_qks_repository(bundle_copy, tmp_path):
    repo = tmp_path / "repo"
    assert _cli([bundle_copy, repo, "-q"])[0] == 0
    assert _cli([bundle_copy, repo, "--max-batch", "8", "-q"])[0] == 0  # its own repository: replaced
    assert _parse(repo / "qks_image" / "config.pbtxt").max_batch_size == 8
    (repo / "resnet").mkdir()  # someone else's model: refused, and nothing changes
    before = _hashes(repo)
    code, out, err = _cli([bundle_copy, repo, "-q"])
    assert code == 1 and "also holds resnet" in err
    assert _hashes(repo) == before and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_qks_triton_runs_without_torch(runtime_bundle, tmp_path):
    """qks-triton works from a bundle on a machine without torch (the runtime's rule)."""
    import subprocess
    import sys

    from runtime_fixtures import BLOCK_TORCH

    code = BLOCK_TORCH + (
        "from qks.export.triton import main\n"
        f"try:\n    main([{str(runtime_bundle)!r}, {str(tmp_path / 'repo')!r}, '-q'])\n"
        "finally:\n"
        "    bad = [m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules]\n"
        "    assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "repo" / "qks_scoring" / "1" / "model.onnx").is_file()


def test_qks_export_triton_flag(tiny_checkpoint, tmp_path):
    _pb()
    from click.testing import CliRunner
    from qks.export.cli import main

    r = CliRunner().invoke(main, ["--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "bundle"),
                                  "--triton", str(tmp_path / "repo"), "-q"])
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'repo'} (qks_image, qks_scoring, qks; validated)" in r.output
    from qks.export.triton import validate_repository

    assert validate_repository(tmp_path / "repo") == []


def test_qks_export_triton_refuses_a_foreign_repo_before_exporting(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner
    from qks.export.cli import main

    foreign = tmp_path / "models"
    (foreign / "resnet").mkdir(parents=True)
    r = CliRunner().invoke(main, ["--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "bundle"),
                                  "--triton", str(foreign), "-q"])
    assert r.exit_code == 1 and "is not a qks Triton repository" in r.output
    assert not (tmp_path / "bundle").exists()  # refused up front: no export was spent on it


def test_fp16_image_model(runtime_bundle, tmp_path):
    from qks.export.triton import write_repository

    report = write_repository(runtime_bundle, tmp_path / "repo", image_model="fp16", max_batch=8)
    assert report.image.graph == "image_encoder_fp16" and report.image.max_batch == 8
    assert (tmp_path / "repo" / "qks_image" / "1" / "model.onnx").read_bytes() == \
        (runtime_bundle / "image_encoder.fp16.onnx").read_bytes()
    if report.validated is False:
        pytest.skip("tritonclient is not installed")
    cfg = _parse(tmp_path / "repo" / "qks_image" / "config.pbtxt")
    assert cfg.max_batch_size == 8 and not cfg.instance_group


def test_external_data_is_copied(bundle_copy, tmp_path):
    """An image graph whose tensors live in an external data file: the file goes next to model.onnx,
    and the repository's graph runs from there."""
    from qks.export.triton import write_repository
    from qks.runtime.manifest import file_record

    model = onnx.load(str(bundle_copy / "image_encoder.onnx"))
    onnx.save_model(model, str(bundle_copy / "image_encoder.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="image_encoder.onnx.data")

    def edit(m):
        for rel in ("image_encoder.onnx", "image_encoder.onnx.data"):
            m["files"][rel] = file_record(bundle_copy, rel)
    rewrite_manifest(bundle_copy, edit)
    report = write_repository(bundle_copy, tmp_path / "repo")
    assert report.image.extra_files == ["image_encoder.onnx.data"]
    version = tmp_path / "repo" / "qks_image" / "1"
    assert (version / "image_encoder.onnx.data").read_bytes() == (bundle_copy / "image_encoder.onnx.data").read_bytes()
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(_session(version / "model.onnx").run(None, {"pixels": x})[0],
                               _session(bundle_copy / "image_encoder.onnx").run(None, {"pixels": x})[0], atol=1e-6)
    if report.validated:
        from qks.export.triton import validate_repository

        (version / "image_encoder.onnx.data").unlink()
        assert any("external data file image_encoder.onnx.data is missing" in p
                   for p in validate_repository(tmp_path / "repo"))


def test_without_tritonclient_writing_works_and_says_validation_was_skipped(bundle_copy, tmp_path, monkeypatch):
    import qks.export.triton.common as tri

    monkeypatch.setattr(tri, "tritonclient_missing", lambda: "tritonclient is not installed (pip install 'qks[triton]')")
    code, out, err = _cli([bundle_copy, tmp_path / "repo"])
    assert code == 0 and "validation skipped: tritonclient is not installed (pip install 'qks[triton]')" in err
    assert (tmp_path / "repo" / "qks_scoring" / "1" / "model.onnx").is_file()
    code, out, err = _cli(["--check", tmp_path / "repo"])
    assert code == 1 and "needs tritonclient" in err and err.count("\n") == 1


def test_plan_with_fp16_output_gets_an_fp16_scoring_input(bundle_copy, tmp_path):
    """A plan whose query features are FP16: the scoring model takes FP16 and casts, the ensemble's
    tensor has one data type end to end."""
    pb = _pb()
    from qks.export.triton import validate_repository, write_repository

    _fake_plan(bundle_copy, out_dtype="float16")
    write_repository(bundle_copy, tmp_path / "repo", image_model="plan")
    img = _parse(tmp_path / "repo" / "qks_image" / "config.pbtxt")
    sc = _parse(tmp_path / "repo" / "qks_scoring" / "config.pbtxt")
    assert pb.DataType.Name(img.output[0].data_type) == pb.DataType.Name(sc.input[0].data_type) == "TYPE_FP16"
    model = onnx.load(str(tmp_path / "repo" / "qks_scoring" / "1" / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert model.graph.node[0].op_type == "Cast"
    assert validate_repository(tmp_path / "repo") == []


def test_the_triton_package_has_no_import_cycle():
    """export/triton/: its modules import each other one way (checked on the source, every import
    anywhere in a module, lazy ones included), and the public names stay importable from the package."""
    import ast

    import qks.export.triton as package

    folder = Path(package.__file__).parent
    mods = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    graph = {}
    for m in mods:
        tree = ast.parse((folder / f"{m}.py").read_text(encoding="utf-8"))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
        graph[m] = deps & mods
    order, state = [], {}

    def visit(m, path):
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        if state.get(m) == "done":
            return
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"
        order.append(m)

    for m in sorted(mods):
        visit(m, [])
    assert order.index("common") < order.index("validate") < order.index("python_repo") < order.index("cli")
    for name in ("check_target", "tritonclient_missing", "write_repository", "validate_repository", "main",
                 "write_python_repository", "scoring_model"):
        assert callable(getattr(package, name))
