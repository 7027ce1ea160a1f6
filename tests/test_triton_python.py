"""qks-triton --backend python without a server: the repository it writes (parsed with tritonclient's
ModelConfig), the model it serves run directly (`QksServingModel` against qks-infer), the label
swap, the refusals, and the one-line messages for a missing serving stack. The live server tests
are in test_triton_live.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runtime_fixtures import BLOCK_TORCH, read_jsonl, run_blocked
from triton_helpers import NEW_LABELS, hashes, parse_config, pb, run_cli, triton_cli, write_labels

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def pyrepo(runtime_bundle, tmp_path_factory) -> Path:
    """The Python-backend repository of the shared bundle (read-only: copy it to change it)."""
    from qks.export.triton import write_python_repository

    out = tmp_path_factory.mktemp("pytriton") / "repo"
    report = write_python_repository(runtime_bundle, out)
    assert report.models == {"model": "qks"} and report.labels == 5
    return out


def qks_infer_scores(bundle: Path, images: Path, out: Path, labels: Path | None = None) -> dict[str, dict]:
    """qks-infer --all-scores (torch blocked): image -> {label: probability}."""
    args = [str(images), "--bundle", str(bundle), "--all-scores", "--backend", "ort-cpu", "--no-progress",
            "--out", str(out)] + (["--labels", str(labels)] if labels else [])
    r = run_blocked("infer", args)
    assert r.returncode in (0, 1), r.stderr  # 1: error records (files that are not images)
    return {rec["image"]: rec["scores"] for rec in read_jsonl(out) if "scores" in rec}


def test_repository_files_and_config(pyrepo, runtime_bundle):
    pbm = pb()
    from qks.export.triton import validate_repository
    from qks.runtime.bundle import Bundle
    from qks.runtime.labels import LabelBank

    assert sorted(p.name for p in pyrepo.iterdir()) == ["qks", "qks-triton.json"]
    assert sorted(p.relative_to(pyrepo).as_posix() for p in pyrepo.rglob("*") if p.is_file()) == [
        "qks-triton.json", "qks/1/image_encoder.onnx", "qks/1/labels.npy", "qks/1/model.py", "qks/1/qks-model.json",
        "qks/config.pbtxt", "qks/labels.txt"]
    cfg = parse_config(pyrepo / "qks" / "config.pbtxt")
    assert (cfg.name, cfg.backend, cfg.platform, cfg.max_batch_size) == ("qks", "python", "", 32)
    assert [(t.name, pbm.DataType.Name(t.data_type), list(t.dims), t.optional) for t in cfg.input] == [
        ("pixels", "TYPE_FP32", [3, 32, 32], True), ("image", "TYPE_STRING", [1], True)]
    assert [(t.name, list(t.dims), t.label_filename) for t in cfg.output] == [
        ("probabilities", [5], "labels.txt"), ("logits", [5], ""), ("selected", [5], "")]
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds > 0
    assert [pbm.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group] == ["KIND_CPU"]
    bundle = Bundle.load(runtime_bundle)
    bank = LabelBank.from_bundle(bundle)
    assert (pyrepo / "qks" / "labels.txt").read_text(encoding="utf-8").splitlines() == bank.names
    np.testing.assert_array_equal(np.load(pyrepo / "qks" / "1" / "labels.npy"), bank.embeddings)
    assert (pyrepo / "qks" / "1" / "image_encoder.onnx").read_bytes() == bundle.graphs["image_encoder"].path.read_bytes()
    spec = json.loads((pyrepo / "qks" / "1" / "qks-model.json").read_text())
    assert spec["graph"]["sha256"] == bundle.graphs["image_encoder"].sha256 and spec["preprocess"]["size"] == 32
    assert "from qks.serving.triton_model import TritonPythonModel" in (pyrepo / "qks" / "1" / "model.py").read_text()
    marker = json.loads((pyrepo / "qks-triton.json").read_text())
    assert (marker["backend"], marker["models"], marker["scoring"]["labels"]) == ("python", {"model": "qks"}, 5)
    assert validate_repository(pyrepo) == []
    code, out, err = triton_cli(["--check", pyrepo])
    assert code == 0 and "valid Triton repository (1 model;" in out, err


def test_serving_model_matches_qks_infer(pyrepo, runtime_bundle, photo_dir, tmp_path):
    """The model Triton runs, called directly: pixels and encoded files give qks-infer's probabilities."""
    from qks.runtime.bundle import Bundle
    from qks.serving.triton_model import QksServingModel, RequestError, serve_batch

    want = qks_infer_scores(runtime_bundle, photo_dir, tmp_path / "scores.jsonl")
    files = sorted(want)
    assert len(files) == 5
    model = QksServingModel(pyrepo / "qks", threads=1)
    expected = np.array([[want[f][n] for n in model.names] for f in files])
    pixels = np.stack([Bundle.load(runtime_bundle).preprocess.load(photo_dir / f) for f in files])
    blobs = np.array([[(photo_dir / f).read_bytes()] for f in files], dtype=object)
    (p_pix, l_pix), (p_img, l_img) = serve_batch(model, [(pixels, None), (None, blobs)])
    np.testing.assert_allclose(p_pix, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(p_img, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(1 / (1 + np.exp(-l_img.astype(np.float64))), expected, rtol=0, atol=1e-6)
    # each request its own answer, in one engine batch: bad ones get a one-line reason
    broken = np.array([[blobs[0, 0]], [b"\xff\xd8\xff\xe0 truncated jpeg"]], dtype=object)
    results = serve_batch(model, [(None, broken), (pixels[:1], blobs[:1]), (None, None), (pixels[:2], None),
                                  (None, np.array([[b""]], dtype=object)), (pixels[:1, :, :16], None)])
    messages = [str(r) if isinstance(r, RequestError) else None for r in results]
    assert messages[0].startswith("image 2 of 2: ") and ("decode" in messages[0] or "readable" in messages[0])
    assert "give exactly one input" in messages[1] and "not both" in messages[1]
    assert "give exactly one input" in messages[2] and "not both" not in messages[2]
    assert messages[3] is None
    np.testing.assert_allclose(results[3][0], expected[:2], atol=1e-6)
    assert messages[4] == "image: empty image (0 bytes)"
    assert messages[5] == "pixels must be [B, 3, 32, 32], got [1, 3, 16, 32]"
    assert all("\n" not in m for m in messages if m)
    nan = pixels[:1].copy()
    nan[0, 0, 0, 0] = np.nan
    assert "not finite" in str(serve_batch(model, [(nan, None)])[0])
    model.close()


@pytest.mark.parametrize("damage, expect", [
    ("bank", "labels.npy does not match its sha256"),
    ("graph", "image_encoder.onnx is missing"),
    ("labels", "labels.txt has 6 labels, labels.npy is [5, 32]"),
    ("spec-version", "written by another qks (model version 99"),
    ("spec", "qks-model.json is missing"),
])
def test_damaged_model_folder_is_refused_in_one_line(pyrepo, tmp_path, damage, expect):
    from qks.serving.triton_model import QksServingModel, ServingError

    folder = tmp_path / "qks"
    shutil.copytree(pyrepo / "qks", folder)
    version = folder / "1"
    if damage == "bank":
        np.save(version / "labels.npy", np.zeros((5, 32), np.float32))
    elif damage == "graph":
        (version / "image_encoder.onnx").unlink()
    elif damage == "labels":
        with open(folder / "labels.txt", "a", encoding="utf-8") as f:
            f.write("one more\n")
    elif damage == "spec-version":
        spec = json.loads((version / "qks-model.json").read_text())
        (version / "qks-model.json").write_text(json.dumps({**spec, "version": 99}))
    else:
        (version / "qks-model.json").unlink()
    with pytest.raises(ServingError) as e:
        QksServingModel(folder)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_validation_catches_python_model_problems(pyrepo, tmp_path):
    pb()
    from qks.export.triton import validate_repository

    bad = tmp_path / "repo"
    shutil.copytree(pyrepo, bad)
    with open(bad / "qks" / "labels.txt", "a", encoding="utf-8") as f:
        f.write("one more\n")
    (bad / "qks" / "1" / "image_encoder.onnx").unlink()
    problems = validate_repository(bad)
    assert "qks: labels.txt has 6 labels, 1/labels.npy has 5 rows" in problems
    assert "qks/labels.txt has 6 labels, output 'probabilities' has 5" in problems
    assert any("names graph file 'image_encoder.onnx', which is missing" in p for p in problems)
    (bad / "qks" / "1" / "model.py").unlink()
    assert "qks/1: model file model.py is missing" in validate_repository(bad)


def test_labels_only_rewrites_the_model_with_new_labels(bundle_copy, photo_dir, tmp_path):
    from qks.serving.triton_model import QksServingModel

    repo = tmp_path / "repo"
    assert triton_cli([bundle_copy, repo, "--backend", "python", "-q"])[0] == 0
    before = hashes(repo)
    labels = write_labels(tmp_path / "new.txt", NEW_LABELS)
    code, out, err = triton_cli([bundle_copy, repo, "--labels-only", "--labels", labels])
    assert code == 0 and out.strip() == f"wrote {repo} (qks)" and "validated" in err, err
    after = hashes(repo)
    assert after["qks/1/image_encoder.onnx"] == before["qks/1/image_encoder.onnx"]
    assert after["qks/1/labels.npy"] != before["qks/1/labels.npy"]
    assert (repo / "qks" / "labels.txt").read_text(encoding="utf-8").splitlines() == NEW_LABELS
    assert list(parse_config(repo / "qks" / "config.pbtxt").output[0].dims) == [len(NEW_LABELS)]
    assert json.loads((repo / "qks-triton.json").read_text())["scoring"]["labels"] == len(NEW_LABELS)
    assert [p for p in [*repo.parent.iterdir(), *repo.iterdir()] if p.name.startswith(".")] == []  # no temp left
    want = qks_infer_scores(bundle_copy, photo_dir, tmp_path / "scores.jsonl", labels)
    files = sorted(want)
    model = QksServingModel(repo / "qks", threads=1)
    probs = np.concatenate([model.score(model.decode((photo_dir / f).read_bytes())[None])[0] for f in files])
    np.testing.assert_allclose(probs, [[want[f][n] for n in NEW_LABELS] for f in files], rtol=0, atol=1e-6)
    # the repository's kind is kept; a wrong --backend and another bundle's labels are refused
    code, out, err = triton_cli([bundle_copy, repo, "--labels-only", "--backend", "onnx"])
    assert code == 2 and "is a --backend python repository" in err
    marker = json.loads((repo / "qks-triton.json").read_text())
    marker["image_model"]["sha256"] = "0" * 64
    (repo / "qks-triton.json").write_text(json.dumps(marker))
    code, out, err = triton_cli([bundle_copy, repo, "--labels-only"])
    assert code == 1 and "is not from this bundle" in err and err.count("\n") == 1


def test_python_backend_refusals(bundle_copy, tmp_path):
    cases = [
        (["--image-model", "plan"], 1, "a TensorRT plan needs Triton's tensorrt backend (--backend onnx)"),
        (["--image-model", "int8"], 1, "no int8 image graph"),
        (["--gpu-sm", "90"], 2, "--backend python runs ONNX graphs on the CPU"),
        (["--name", "bad name"], 1, "model name 'bad name'"),
    ]
    for args, want_code, expect in cases:
        code, out, err = triton_cli([bundle_copy, tmp_path / "repo", "--backend", "python", *args])
        assert code == want_code and expect in err and err.count("\n") == 1 and out == "", (args, err)
    assert not (tmp_path / "repo").exists()
    # an onnx repository can be replaced by a python one (both are qks-triton's)
    assert triton_cli([bundle_copy, tmp_path / "repo", "-q"])[0] == 0
    assert triton_cli([bundle_copy, tmp_path / "repo", "--backend", "python", "-q"])[0] == 0
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["qks", "qks-triton.json"]


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_python_backend_writes_without_torch(runtime_bundle, tmp_path):
    r = _python(BLOCK_TORCH + (
        "from qks.export.triton import main\n"
        f"try:\n    main([{str(runtime_bundle)!r}, {str(tmp_path / 'repo')!r}, '--backend', 'python', '-q'])\n"
        "finally:\n"
        "    bad = [m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules]\n"
        "    assert not bad, bad\n"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "repo" / "qks" / "1" / "labels.npy").is_file()


# tritonclient installed without its gRPC part: `import grpc` fails inside tritonclient.grpc, which
# turns it into RuntimeError("The installation does not include grpc support ...").
NO_GRPC = "import sys\nsys.modules['grpc'] = None\n"


def test_tritonclient_without_grpc_names_the_extra(tiny_checkpoint, runtime_bundle, tmp_path):
    r = _python(NO_GRPC + "import tritonclient.grpc")
    assert "does not include grpc support" in r.stderr  # the real tritonclient behaviour this guards against
    r = _python(NO_GRPC + f"from qks.export.triton import main\nmain([{str(runtime_bundle)!r}, "
                          f"{str(tmp_path / 'repo')!r}])")
    assert r.returncode == 0, r.stderr
    assert ("validation skipped: tritonclient is installed without its gRPC part (pip install 'qks[triton]', "
            "which adds tritonclient[grpc])") in r.stderr
    r = _python(NO_GRPC + f"from qks.export.triton import main\nmain(['--check', {str(tmp_path / 'repo')!r}])")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "without its gRPC part" in r.stderr, r.stderr
    r = _python(NO_GRPC + "from qks.export.cli import main\n"
                f"main(['--ckpt', {str(tiny_checkpoint)!r}, '--out', {str(tmp_path / 'bundle')!r}, "
                f"'--triton', {str(tmp_path / 'repo2')!r}, '-q'])", timeout=600)
    assert r.returncode == 0 and "unexpected" not in r.stderr + r.stdout, r.stderr
    assert "not validated: tritonclient is installed without its gRPC part (pip install 'qks[triton]'" in r.stdout


def test_qks_triton_server_without_the_serving_stack_says_what_to_install(pyrepo):
    from qks.serving.triton_server import main

    if subprocess.run([sys.executable, "-c", "import pytriton"], capture_output=True).returncode == 0:
        pytest.skip("this environment has nvidia-pytriton (the test needs one without it)")
    code, out, err = run_cli(main, [pyrepo, "--no-metrics"])
    assert code == 1 and err.count("\n") == 1 and "nvidia-pytriton is not installed" in err and "make serve-venv" in err
    code, out, err = run_cli(main, [pyrepo, "--model-control-mode", "sometimes"])
    assert code == 2 and "Invalid value for '--model-control-mode'" in err


def test_image_decoding_matches_the_runtime_for_every_format(pyrepo, runtime_bundle, tmp_path):
    """Encoded bytes decode to the pixels qks-infer's Preprocess.load gives for the same file."""
    from qks.runtime.bundle import Bundle
    from qks.serving.triton_model import QksServingModel
    from runtime_fixtures import photo

    pp = Bundle.load(runtime_bundle).preprocess
    model = QksServingModel(pyrepo / "qks", threads=1)
    img = photo("astronaut").resize((96, 64))
    for fmt, mode in (("JPEG", "RGB"), ("PNG", "RGBA"), ("WEBP", "RGB"), ("BMP", "L"), ("GIF", "P"), ("TIFF", "CMYK")):
        path = tmp_path / f"x.{fmt.lower()}"
        img.convert(mode).save(path, fmt)
        np.testing.assert_array_equal(model.decode(path.read_bytes()), pp.load(path), err_msg=fmt)
    model.close()
