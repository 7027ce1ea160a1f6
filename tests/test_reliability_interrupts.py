"""Interrupted work, with real processes: qks-export killed midway never leaves a bundle that looks
complete, qks-infer stopped by SIGKILL or Ctrl-C leaves valid output and metadata that --resume
finishes without duplicates, qks-train resumes from what a kill can leave behind.

Covered elsewhere (and counted): qks-infer SIGKILLed mid-run then --resume gives byte-identical
output to an unbroken run (test_runtime_infer.py::test_killed_run_resumes_to_the_same_output); a
partial last JSONL/CSV line is cut before resuming (::test_resume_repairs_a_partial_line_and_writes_no_duplicates,
::test_resume_csv); qks-train SIGKILLed after its first last.pt resumes to the same weights as an
unbroken run, losing at most the running epoch (test_train_eval.py::test_killed_mid_run_resumes_to_the_same_weights);
a failed export leaves the old bundle untouched and no temp folder
(test_export.py::test_failed_export_leaves_the_old_bundle_and_no_temp).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runtime_fixtures import *  # noqa: F403

EXPORT = [sys.executable, "-c", "from qks.export.cli import main; main()"]


def _wait_for(cond, proc, what, timeout=240):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"the process exited (code {proc.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def _kill_export_midway(ckpt, out: Path) -> list[Path]:
    """Start a real qks-export, SIGKILL it once its temp folder holds the first graph, return the
    temp folders left next to `out`."""
    proc = subprocess.Popen(EXPORT + ["--ckpt", str(ckpt), "--out", str(out), "--fp16"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        _wait_for(lambda: any((t / "image_encoder.onnx").exists() for t in out.parent.glob(f".{out.name}.tmp-*")),
                  proc, "image_encoder.onnx in the export's temp folder")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def test_export_killed_midway_leaves_the_old_bundle_untouched(runtime_bundle, tiny_checkpoint, tmp_path):
    from qks.runtime.bundle import Bundle

    out = tmp_path / "bundle"
    shutil.copytree(runtime_bundle, out, ignore=shutil.ignore_patterns("cache"))
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    left = _kill_export_midway(tiny_checkpoint, out)
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # every file of the old bundle, byte for byte
    Bundle.load(out)  # and it still passes every check
    # what the kill left: one temp folder, hidden, without a manifest, so nothing reads it as a bundle
    assert len(left) == 1 and left[0].name.startswith(".bundle.tmp-") and not (left[0] / "manifest.json").exists()


def test_export_killed_midway_leaves_no_bundle(tiny_checkpoint, tmp_path):
    from qks.runtime.bundle import Bundle
    from qks.runtime.manifest import BundleError

    out = tmp_path / "fresh"
    left = _kill_export_midway(tiny_checkpoint, out)
    assert not out.exists()
    assert all(not (t / "manifest.json").exists() for t in left)
    with pytest.raises(BundleError, match="bundle folder not found"):
        Bundle.load(out)
    # the next export is not disturbed by the leftover temp folder, and deletes it (its process is gone);
    # a live export's folder, another host's, and an unowned one stay
    from qks.export.bundle import _host

    live = out.parent / f".fresh.tmp-{_host()}-{os.getpid()}-abc123"
    other = out.parent / f".fresh.tmp-otherhost-{left[0].name.split('-')[-2]}-abc123"
    unowned = out.parent / ".fresh.tmp-abc123"
    for d in (live, other, unowned):
        d.mkdir()
    res = subprocess.run(EXPORT + ["--ckpt", str(tiny_checkpoint), "--out", str(out), "--quiet"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    Bundle.load(out)
    assert len(left) == 1 and not left[0].exists()
    assert live.is_dir() and other.is_dir() and unowned.is_dir()


# --------------------------------------------------------------------------- qks-infer


MANY = 120


@pytest.fixture
def many(photo_dir, tmp_path):
    images = tmp_path / "many"
    images.mkdir()
    for i in range(MANY):
        shutil.copy(photo_dir / "astronaut.jpg", images / f"img{i:03d}.jpg")
    (images / "img060.jpg").write_bytes(b"")  # one error record
    return images


def _start_infer(bundle, images, out):
    # A suite started in the background (`make test &`) inherits SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler: restore it, as an interactive shell gives qks-infer.
    code = BLOCK_TORCH + "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n" + (  # noqa: F405
        f"sys.argv = ['qks-infer', {str(images)!r}, '--out', {str(out)!r}, '--bundle', {str(bundle)!r}, "
        "'--threads', '1', '--workers', '1', '--batch-size', '1', '--no-progress', '--top-k', '2']\n"
        "from qks.runtime.cli import infer_main\ninfer_main()\n")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _lines(path):
    return path.read_text(encoding="utf-8").count("\n") if path.exists() else 0


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_infer_stopped_leaves_valid_output_and_meta_then_resumes(runtime_bundle, many, tmp_path, how):
    out = tmp_path / "out.jsonl"
    proc = _start_infer(runtime_bundle, many, out)
    try:
        _wait_for(lambda: _lines(out) >= 10, proc, "10 records")
        proc.send_signal(getattr(signal, how))
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    data = out.read_text(encoding="utf-8")
    whole = data[: data.rfind("\n") + 1]
    recs = [json.loads(line) for line in whole.splitlines()]  # every whole line is a record
    assert 10 <= len(recs) < MANY, "the run finished before it was stopped"
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())  # valid JSON, never half written
    if how == "SIGINT":  # Ctrl-C: a clean stop, one line, exit 130, the metadata says so
        assert proc.returncode == 130, stderr
        assert stderr.strip().splitlines()[-1] == ("qks-infer: error: interrupted (the output holds every finished "
                                                   "batch; continue with --resume)")
        assert "Traceback" not in stderr and meta["status"] == "interrupted" and data == whole
        assert meta["written"] == len(recs)
    else:
        assert proc.returncode == -signal.SIGKILL and meta["status"] == "running"
    res = run_blocked("infer", [str(many), "--out", str(out), "--resume", "--bundle", str(runtime_bundle),  # noqa: F405
                                "--threads", "1", "--no-progress", "--top-k", "2"])
    assert res.returncode == 1, res.stderr  # img060 is empty
    assert f"{MANY - len(recs)} images tagged (1 errors, {len(recs)} already done)" in res.stderr
    final = read_jsonl(out)  # noqa: F405
    assert sorted(r["image"] for r in final) == [f"img{i:03d}.jpg" for i in range(MANY)]  # each once
    assert [r for r in final if "error" in r] == [{"image": "img060.jpg", "error": "empty file (0 bytes)"}]
    assert json.loads((tmp_path / "out.jsonl.meta.json").read_text())["status"] == "complete"


# --------------------------------------------------------------------------- qks-train


def test_train_resumes_from_what_a_kill_mid_write_leaves(tmp_path):
    """A kill can land while metrics.jsonl gets its line or while last.pt is being written: resume
    drops the half line and ignores the half-written last.pt.tmp (last.pt is replaced atomically)."""
    import numpy as np
    import torch
    from click.testing import CliRunner
    from conftest import TINY_SPEC
    from PIL import Image

    from qks.cli import train_main

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "labels": ["red"] if i % 2 else ["blue"]}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "seen.txt").write_text("red\nblue\n")
    (tmp_path / "pool.txt").write_text("a photo of a {}.\n")
    run = tmp_path / "run"
    args = ["--data", str(tmp_path / "train.jsonl"), "--seen", str(tmp_path / "seen.txt"), "--backbone", TINY_SPEC,
            "--out", str(run), "--layers", "1", "--queries", "2", "--heads", "4", "--ffn", "32", "--batch-size", "4",
            "--val-fraction", "0.25", "--prompts", str(tmp_path / "pool.txt"), "--workers", "0", "--quiet",
            "--cached-tokens"]
    res = CliRunner().invoke(train_main, args + ["--epochs", "1"])
    assert res.exit_code == 0, res.output
    # the state a kill during epoch 2's bookkeeping leaves: half a metrics line, half a last.pt.tmp
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "train_loss": 0.5, "lr"')
    (run / "last.pt.tmp").write_bytes((run / "last.pt").read_bytes()[:100])
    res = CliRunner().invoke(train_main, ["--resume", str(run), "--epochs", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["train_state"]["epoch"] == 2
    assert not (run / "last.pt.tmp").exists()


@pytest.mark.parametrize("atomic", [True, False])
def test_export_swaps_the_new_bundle_in(tmp_path, monkeypatch, atomic):
    """The last step of an export: on Linux the old and the new bundle trade places in one
    renameat2(RENAME_EXCHANGE), so no instant exists without a whole bundle at `out`; elsewhere the
    old one is moved aside first. Either way the old one is deleted manifest first, nothing is left."""
    from qks.export import bundle as B

    out, tmp = tmp_path / "bundle", tmp_path / ".bundle.tmp-x"
    for d, tag in ((out, "old"), (tmp, "new")):
        (d / "labels").mkdir(parents=True)
        (d / "manifest.json").write_text(tag)
        (d / "labels" / "default.npy").write_text(tag)
    if atomic:
        probe = [tmp_path / "probe-a", tmp_path / "probe-b"]
        for d in probe:
            d.mkdir()
        ok = B._exchange(*probe)
        for d in probe:
            d.rmdir()
        if not ok:
            pytest.skip("no renameat2(RENAME_EXCHANGE) on this OS or filesystem")
    results = []
    real = B._exchange
    monkeypatch.setattr(B, "_exchange", lambda a, b: results.append(real(a, b) if atomic else False) or results[-1])
    B._replace(tmp, out)
    assert results == [atomic]  # the swap was (or, made unavailable, was not) what replaced it
    assert (out / "manifest.json").read_text() == "new" and (out / "labels" / "default.npy").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
