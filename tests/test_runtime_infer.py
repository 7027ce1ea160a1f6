"""The folder runner and qks-infer: outputs, error records, exit codes, resume, torch-free runs, and
probabilities equal to the PyTorch model's."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from qks.runtime.backend import select_backend
from qks.runtime.bundle import Bundle
from qks.runtime.infer import InferError, InferOptions, find_images, run_folder
from qks.runtime.labels import LabelBank
from runtime_fixtures import *  # noqa: F403

EXPECTED_IMAGES = ["astronaut.jpg", "rocket.webp", "sub/broken.jpg", "sub/camera_gray.png", "sub/coffee.png",
                   "sub/deeper/chelsea.JPG"]


def _run(bundle_dir, images, out, labels=None, **opts):
    bundle = Bundle.load(bundle_dir)
    bank = LabelBank.for_labels(bundle, labels) if labels else LabelBank.from_bundle(bundle)
    engine, reason = select_backend(bundle, "ort-cpu", threads=1)
    with engine:
        return run_folder(images, engine, bank, bundle.preprocess, out,
                          InferOptions(progress=False, workers=2, **opts), bundle.scoring, {"backend_reason": reason})


def test_find_images_is_recursive_sorted_and_survives_link_cycles(photo_dir, tmp_path):
    assert find_images(photo_dir) == EXPECTED_IMAGES
    root = tmp_path / "linked"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"")
    os.symlink(root, root / "a" / "loop")  # a cycle
    os.symlink(tmp_path / "gone.jpg", root / "dangling.jpg")  # a broken link is listed (and fails later)
    os.mkfifo(root / "a" / "pipe.jpg")  # would block a decoder forever
    assert find_images(root) == ["a/x.png", "dangling.jpg"]
    with pytest.raises(InferError, match="image folder not found"):
        find_images(tmp_path / "nope")


def test_jsonl_records_errors_and_metadata(runtime_bundle, photo_dir, tmp_path):
    out = tmp_path / "pred.jsonl"
    summary = _run(runtime_bundle, photo_dir, out, top_k=2)
    recs = read_jsonl(out)  # noqa: F405
    assert [r["image"] for r in recs] == EXPECTED_IMAGES
    errors = [r for r in recs if "error" in r]
    assert [r["image"] for r in errors] == ["sub/broken.jpg"] and set(errors[0]) == {"image", "error"}
    for r in recs:
        if "labels" in r:
            probs = list(r["labels"].values())
            assert len(probs) == 2 and probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
            assert set(r["labels"]) <= {"cat", "dog", "car", "bird", "traffic light"}
    assert summary.errors == 1 and summary.written == 6
    meta = json.loads((tmp_path / "pred.jsonl.meta.json").read_text())
    assert meta["status"] == "complete" and meta["errors"] == 1 and meta["top_k"] == 2
    assert meta["backend_reason"].startswith("ort-cpu: requested")


def test_all_scores_and_csv(runtime_bundle, photo_dir, tmp_path):
    _run(runtime_bundle, photo_dir, tmp_path / "all.jsonl", all_scores=True)
    recs = [r for r in read_jsonl(tmp_path / "all.jsonl") if "scores" in r]  # noqa: F405
    assert len(recs) == 5 and all(set(r) == {"image", "scores"} for r in recs)
    assert all(list(r["scores"]) == ["cat", "dog", "car", "bird", "traffic light"] for r in recs)

    _run(runtime_bundle, photo_dir, tmp_path / "all.csv", all_scores=True, fmt="csv")
    rows = list(csv.DictReader((tmp_path / "all.csv").open(encoding="utf-8")))
    assert [r["image"] for r in rows] == EXPECTED_IMAGES
    by_image = {r["image"]: r for r in recs}
    for row in rows:
        if row["error"]:
            assert row["image"] == "sub/broken.jpg" and row["cat"] == ""
        else:
            assert float(row["dog"]) == pytest.approx(by_image[row["image"]]["scores"]["dog"], abs=1e-7)

    _run(runtime_bundle, photo_dir, tmp_path / "sel.csv", fmt="csv", threshold=0.0, top_k=3)
    rows = list(csv.reader((tmp_path / "sel.csv").open(encoding="utf-8")))
    assert rows[0] == ["image", "label", "probability", "error"]
    assert len(rows) == 1 + 5 * 3 + 1  # three labels for each readable image, one error row


def test_non_finite_outputs_become_error_records(runtime_bundle, photo_dir, tmp_path):
    bundle = Bundle.load(runtime_bundle)
    bank = LabelBank.from_bundle(bundle)
    engine, _ = select_backend(bundle, "ort-cpu", threads=1)

    class NaNOnCoffee:
        inputs, outputs, max_batch = engine.inputs, engine.outputs, None

        def run(self, feeds):
            out = engine.run(feeds)["query_features"].copy()
            out[1] = np.nan  # the second image of the (only) batch
            out[2, 0, 0] = np.inf  # third decoded image (camera): a probability of 1.0 after the sigmoid
            return {"query_features": out}

    summary = run_folder(photo_dir, NaNOnCoffee(), bank, bundle.preprocess, tmp_path / "o.jsonl",
                         InferOptions(progress=False, batch_size=16, all_scores=True))
    recs = read_jsonl(tmp_path / "o.jsonl")  # noqa: F405
    assert recs[1] == {"image": "rocket.webp", "error": "model output is not finite (NaN or inf)"}
    assert recs[3] == {"image": "sub/camera_gray.png", "error": "model output is not finite (NaN or inf)"}
    assert summary.errors == 3 and "NaN" not in (tmp_path / "o.jsonl").read_text().replace("(NaN or inf)", "")


def test_resume_repairs_a_partial_line_and_writes_no_duplicates(runtime_bundle, photo_dir, tmp_path):
    out = tmp_path / "pred.jsonl"
    _run(runtime_bundle, photo_dir, out, batch_size=2, all_scores=True)
    full = out.read_text(encoding="utf-8").splitlines(keepends=True)
    # an interrupted run: three whole records and half of the fourth (a kill mid-write)
    out.write_text("".join(full[:3]) + full[3][: len(full[3]) // 2], encoding="utf-8")
    summary = _run(runtime_bundle, photo_dir, out, batch_size=2, all_scores=True, resume=True)
    assert summary.skipped == 3 and summary.written == 3
    assert out.read_text(encoding="utf-8").splitlines(keepends=True) == full
    summary = _run(runtime_bundle, photo_dir, out, batch_size=2, all_scores=True, resume=True)
    assert summary.written == 0 and summary.skipped == 6
    with pytest.raises(InferError, match="pass --resume to continue it, --update to tag what changed, or --overwrite"):
        _run(runtime_bundle, photo_dir, out, all_scores=True)
    with pytest.raises(InferError, match="was written with all_scores=True"):
        _run(runtime_bundle, photo_dir, out, resume=True)
    with pytest.raises(InferError, match="was written with top_k=None, this run has 3"):
        _run(runtime_bundle, photo_dir, out, all_scores=True, top_k=3, resume=True)


def test_resume_csv(runtime_bundle, photo_dir, tmp_path):
    out = tmp_path / "pred.csv"
    _run(runtime_bundle, photo_dir, out, fmt="csv", top_k=1)
    full = out.read_text(encoding="utf-8")
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:5], encoding="utf-8")
    _run(runtime_bundle, photo_dir, out, fmt="csv", top_k=1, resume=True)
    assert out.read_text(encoding="utf-8") == full


def test_runtime_probabilities_equal_pytorch(runtime_bundle, tiny_checkpoint, photo_dir, tmp_path):
    """Seen (cat, dog, car) and unseen (bird, traffic light) labels of the checkpoint, plus labels the
    model never saw; same pixels into PyTorch's QKSModel, qks.scoring.score and a sigmoid."""
    from qks.runtime.preprocess import Preprocess

    names = ["cat", "dog", "car", "bird", "traffic light", "astronaut", "a cup of coffee"]
    _run(runtime_bundle, photo_dir, tmp_path / "p.jsonl", labels=names, all_scores=True)
    recs = [r for r in read_jsonl(tmp_path / "p.jsonl") if "scores" in r]  # noqa: F405
    pp = Preprocess.from_dict(json.loads((runtime_bundle / "manifest.json").read_text())["preprocess"])
    pixels = np.stack([pp.load(photo_dir / r["image"]) for r in recs])
    ref = torch_probs(tiny_checkpoint, pixels, names)  # noqa: F405
    ours = np.array([[r["scores"][n] for n in names] for r in recs])
    diff = float(np.abs(ours - ref).max())
    print(f"runtime vs PyTorch probabilities: max abs diff {diff:.3g} over {ours.size} scores")
    assert diff <= 1e-4


def test_qks_infer_without_torch_end_to_end(runtime_bundle, photo_dir, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nastronaut\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = [str(photo_dir), "--bundle", str(runtime_bundle), "--labels", str(labels), "--backend", "auto",
            "--threads", "1", "--workers", "2", "--batch-size", "4", "--top-k", "2", "--out", str(out)]
    res = run_blocked("infer", args)  # noqa: F405
    assert res.returncode == 1, res.stderr  # one unreadable image
    assert "Traceback" not in res.stderr
    assert "qks-infer: backend auto: picked ort-cpu" in res.stderr and "tensorrt:" in res.stderr
    assert "5 images tagged" not in res.stderr and "6 images tagged (1 errors" in res.stderr
    recs = read_jsonl(out)  # noqa: F405
    assert [r["image"] for r in recs] == EXPECTED_IMAGES
    assert all(len(r["labels"]) == 2 for r in recs if "labels" in r)
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert meta["backend"] == "ort-cpu" and meta["backend_reason"].startswith("auto: picked ort-cpu")
    assert meta["labels"] == 3 and meta["status"] == "complete"

    only_good = tmp_path / "good"
    only_good.mkdir()
    (only_good / "a.jpg").write_bytes((photo_dir / "astronaut.jpg").read_bytes())
    res = run_blocked("infer", [str(only_good), "--bundle", str(runtime_bundle), "--threads", "1"], cwd=tmp_path)  # noqa: F405
    assert res.returncode == 0, res.stderr
    (rec,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert rec["image"] == "a.jpg" and "labels" in rec


@pytest.mark.parametrize("args,message", [
    (["--bundle", "{tmp}/missing"], "bundle folder not found"),
    (["--labels", "{tmp}/nope.txt"], "label file not found"),
    (["--backend", "tensorrt"], "backend tensorrt cannot run"),
    (["--backend", "ort-cuda"], "backend ort-cuda cannot run"),
    (["--bank", "nope"], "no label bank 'nope'"),
    (["--resume"], "--resume needs --out"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--out", "{tmp}/exists.jsonl"], "exists.jsonl exists: pass --resume"),
    (["--frobnicate"], "No such option '--frobnicate'"),
])
def test_qks_infer_bad_input_is_one_line(runtime_bundle, photo_dir, tmp_path, args, message):
    argv = [str(photo_dir), "--bundle", str(runtime_bundle), "--threads", "1", "--no-progress"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    (tmp_path / "exists.jsonl").write_text('{"image": "a.jpg", "labels": {}}\n')
    res = run_blocked("infer", argv)  # noqa: F405
    assert res.returncode == 2, res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("qks-infer: error:")]
    assert len(err) == 1 and message in err[0], res.stderr
    assert "Traceback" not in res.stderr


def test_killed_run_resumes_to_the_same_output(runtime_bundle, photo_dir, tmp_path):
    """SIGKILL a real qks-infer mid-run, then --resume: every image exactly once, same records."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    images = tmp_path / "many"
    images.mkdir()
    for i in range(300):
        shutil.copy(photo_dir / "astronaut.jpg", images / f"img{i:03d}.jpg")
    (images / "img150.jpg").write_bytes(b"junk")
    common = ["--bundle", str(runtime_bundle), "--threads", "1", "--workers", "1", "--batch-size", "1",
              "--no-progress", "--all-scores"]
    killed = tmp_path / "killed.jsonl"
    code = BLOCK_TORCH + (  # noqa: F405
        f"sys.argv = ['qks-infer', {str(images)!r}, '--out', {str(killed)!r}] + {common!r}\n"
        "from qks.runtime.cli import infer_main\ninfer_main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not killed.exists() or killed.read_text().count("\n") < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = killed.read_text().count("\n")
    assert 20 <= n_before < 301, "the run finished before it could be killed"
    res = run_blocked("infer", [str(images), "--out", str(killed), "--resume", *common])  # noqa: F405
    assert res.returncode == 1, res.stderr  # img150 is junk
    full = tmp_path / "full.jsonl"
    res = run_blocked("infer", [str(images), "--out", str(full), *common])  # noqa: F405
    assert res.returncode == 1, res.stderr
    assert killed.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")
    assert len(read_jsonl(killed)) == 300  # noqa: F405
