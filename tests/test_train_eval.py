"""`qks-train` and `qks-eval` end to end on a tiny generated dataset and a tiny open_clip (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_SPEC
from PIL import Image

from qks.cli import eval_main, train_main

SEEN = ["red", "green", "blue", "square", "stripes"]
UNSEEN = ["yellow", "circle"]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """24 training and 10 test images (40x36 PNG) with random labels, in the JSONL format."""
    root = tmp_path_factory.mktemp("ds")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    lines = {"train": [], "test": []}
    for i in range(34):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        split = "train" if i < 24 else "test"
        labels = [lab for lab in SEEN + (UNSEEN if split == "test" else []) if rng.random() < 0.4] or ["red"]
        line = {"image": f"img/{i}.png", "labels": labels}
        if split == "test" and i % 3 == 0:  # a partially annotated test image
            line.update(unlisted="unknown", negatives=["blue"] if "blue" not in labels else [])
        lines[split].append(json.dumps(line))
    for split, ls in lines.items():
        (root / f"{split}.jsonl").write_text("\n".join(ls) + "\n")
    (root / "seen.txt").write_text("\n".join(SEEN) + "\n")
    (root / "unseen.txt").write_text("\n".join(UNSEEN) + "\n")
    (root / "pool.txt").write_text("a photo of a {}.\nthere is a {} in the scene.\n")
    return root


def train_args(ds, out, *extra):
    return ["--data", str(ds / "train.jsonl"), "--seen", str(ds / "seen.txt"), "--unseen", str(ds / "unseen.txt"),
            "--backbone", TINY_SPEC, "--out", str(out), "--layers", "1", "--queries", "4", "--heads", "4",
            "--ffn", "64", "--batch-size", "8", "--lr", "1e-3", "--val-fraction", "0.25",
            "--prompts", str(ds / "pool.txt"), "--workers", "0", "--quiet", *extra]


def invoke(cmd, args):
    result = CliRunner().invoke(cmd, args)
    assert "Traceback" not in result.output
    return result


def ok(cmd, args):
    result = invoke(cmd, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def head_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["head"]


def assert_same_head(a, b):
    ha, hb = head_of(a), head_of(b)
    assert ha.keys() == hb.keys()
    for k in ha:
        assert torch.equal(ha[k], hb[k]), k


@pytest.fixture(scope="module")
def cached_run(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cached"
    t0 = time.time()
    ok(train_main, train_args(ds, out, "--epochs", "2", "--cached-tokens"))
    print(f"cached-token training, 2 epochs: {time.time() - t0:.1f}s")
    return out


def test_train_with_cached_tokens_writes_checkpoints_and_log(ds, cached_run):
    for name in ("best.pt", "last.pt", "metrics.jsonl", "run.json", "tokens.npy"):
        assert (cached_run / name).is_file(), name
    last = torch.load(cached_run / "last.pt", map_location="cpu", weights_only=True)
    ts = last["train_state"]
    assert ts["epoch"] == 2 and {"optimizer", "scheduler", "rng", "best_score"} <= set(ts)
    assert last["seen"] == SEEN and last["unseen"] == UNSEEN
    assert not any(k.startswith("backbone") for k in last["head"])  # the head only
    records = [json.loads(x) for x in (cached_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    val = records[0]["val"]
    for part in ("trained", "held_out"):
        assert {"map", "f1@3", "f1@5", "score"} <= set(val[part])
        assert val[part]["score"] == pytest.approx(val[part]["map"] + val[part]["f1@3"] + val[part]["f1@5"])
    assert records[0]["val_score"] == pytest.approx(val["trained"]["score"] + val["held_out"]["score"])
    # The zero-shot weight chosen on validation is the one the checkpoint carries.
    assert float(last["head"]["zero_shot_weight"]) == pytest.approx(records[1]["zero_shot_weight"])
    assert last["head"]["zero_shot_offset"].abs().sum() > 0  # measured on the training images
    run = json.loads((cached_run / "run.json").read_text())
    assert (run["train_images"], run["val_images"]) == (18, 6)
    # One of the five seen labels (10 %, at least one) is held out of training, the same for a seed.
    assert len(run["held_out_concepts"]) == 1 and run["held_out_concepts"][0] in SEEN and run["trained"] == 4
    # It is scored on every image that shows it, training images included, not only the 6 validation ones.
    lines = [json.loads(x) for x in (ds / "train.jsonl").read_text().splitlines()]
    shows = sum(run["held_out_concepts"][0] in line["labels"] for line in lines)
    assert run["held_out_images"] == val["held_out"]["images"] == shows > 6


def test_train_from_images_with_augmentation(ds, tmp_path):
    ok(train_main, train_args(ds, tmp_path / "run", "--epochs", "2"))
    assert (tmp_path / "run" / "best.pt").is_file() and not (tmp_path / "run" / "tokens.npy").exists()


def test_eval_reports_every_metric_and_writes_predictions(ds, cached_run, tmp_path):
    report, preds = tmp_path / "report.json", tmp_path / "preds.jsonl"
    result = ok(eval_main, ["--ckpt", str(cached_run / "best.pt"), "--data", str(ds / "test.jsonl"),
                            "--seen", str(ds / "seen.txt"), "--unseen", str(ds / "unseen.txt"),
                            "--topk", "3", "5", "--out", str(report), "--predictions", str(preds),
                            "--workers", "0", "--quiet"])
    assert "ZSL" in result.output and "GZSL" in result.output and "F1@5" in result.output
    rep = json.loads(report.read_text())
    assert rep["topk"] == [3, 5] and rep["images"] == 10
    for split in ("zsl", "gzsl"):
        m = rep[split]
        assert 0 <= m["map"] <= 1 and 0 <= m["map_labels_with_positives"] <= 1
        assert set(m["f1"]) == {"3", "5"}
        assert all(0 <= m["f1"][k][x] <= 1 for k in ("3", "5") for x in ("precision", "recall", "f1"))
    assert rep["zsl"]["labels"] == 2 and rep["gzsl"]["labels"] == 7

    records = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [r["image"] for r in records] == [f"img/{i}.png" for i in range(24, 34)]
    assert all(list(r["scores"]) == SEEN + UNSEEN for r in records)
    # The probabilities are the model's: sigmoid of max-over-queries dot products.
    from qks.checkpoint import model_from_checkpoint
    from qks.prompts import LabelEmbedder
    from qks.transforms import eval_transform

    ckpt = torch.load(cached_run / "best.pt", map_location="cpu", weights_only=True)
    model = model_from_checkpoint(ckpt)
    emb = LabelEmbedder(model.backbone, ckpt["prompts"])(SEEN + UNSEEN)
    pixels = eval_transform(model.backbone.preprocess)(Image.open(ds / "img" / "24.png").convert("RGB"))
    with torch.no_grad():
        expected = torch.sigmoid(model(pixels[None], emb))[0]
    got = torch.tensor([records[0]["scores"][lab] for lab in SEEN + UNSEEN])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    # The default label lists are the checkpoint's, and a run directory stands for its best.pt.
    again = ok(eval_main, ["--ckpt", str(cached_run), "--data", str(ds / "test.jsonl"), "--topk", "3",
                           "--topk", "5", "--workers", "0", "--quiet"])
    assert again.output.splitlines()[1:3] == result.output.splitlines()[1:3]

    # No image with an unseen positive: ZSL is empty, and the JSON stays valid (null, not NaN).
    ok(eval_main, ["--ckpt", str(cached_run), "--data", str(ds / "train.jsonl"), "--out", str(report),
                   "--workers", "0", "--quiet"])
    assert "NaN" not in report.read_text()
    rep = json.loads(report.read_text())
    assert rep["zsl"]["images"] == 0 and rep["zsl"]["map_labels_with_positives"] is None


def test_resume_after_epoch_one_equals_uninterrupted(ds, tmp_path):
    # From images, with augmentation in a loader worker: their seeds must follow the epoch too.
    full, split = tmp_path / "full", tmp_path / "split"
    ok(train_main, train_args(ds, full, "--epochs", "2", "--workers", "1"))
    ok(train_main, train_args(ds, split, "--epochs", "1", "--workers", "1"))
    after_one = head_of(split / "last.pt")
    result = ok(train_main, ["--resume", str(split), "--epochs", "2", "--quiet"])
    assert "resuming" in result.output
    assert not torch.equal(after_one["queries"], head_of(split / "last.pt")["queries"])  # it trained on
    assert_same_head(full / "last.pt", split / "last.pt")
    assert_same_head(full / "best.pt", split / "best.pt")
    strip = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
             for x in (full / "metrics.jsonl").read_text().splitlines()]
    again = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
             for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert strip == again


def test_killed_mid_run_resumes_to_the_same_weights(ds, tmp_path):
    """A real process killed once its first last.pt exists, then --resume, equals an unbroken run."""
    killed, full = tmp_path / "killed", tmp_path / "full"
    # Every run in its own process with the same environment: bit-exact equality needs the same
    # torch thread count, and other tests may have changed this process's.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from qks.cli import train_main; train_main()"]
    proc = subprocess.Popen(cmd + train_args(ds, killed, "--epochs", "30", "--cached-tokens"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300  # a guard against a hang, generous for a loaded 2-core machine
        while not (killed / "last.pt").exists():
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.time() < deadline, "no last.pt after 300 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)["train_state"]["epoch"]
    assert done < 30
    target = str(done + 1)
    for args in (["--resume", str(killed), "--epochs", target, "--quiet"],
                 train_args(ds, full, "--epochs", target, "--cached-tokens")):
        res = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
    assert_same_head(full / "last.pt", killed / "last.pt")
    epochs = [json.loads(x)["epoch"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, done + 2))


def write(path: Path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_manifest_is_one_clear_line_per_problem(ds, tmp_path):
    bad = write(tmp_path / "bad.jsonl", [
        json.dumps({"image": str(ds / "img" / "0.png"), "labels": ["red"]}),
        "{broken",
        json.dumps({"image": str(ds / "img" / "1.png"), "labels": ["purple"]}),
        json.dumps({"image": "missing.png"}),
    ])
    args = train_args(ds, tmp_path / "run", "--epochs", "1")
    args[args.index("--data") + 1] = str(bad)
    result = invoke(train_main, args)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == f"Error: {bad}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)"
    assert lines[1] == f"{bad}:3: label 'purple' is in neither the seen nor the unseen list"
    assert lines[2] == f"{bad}:4: image not found: {tmp_path / 'missing.png'}"
    assert "3 bad line(s)" in lines[3] and "--skip-bad" in lines[3]
    assert not (tmp_path / "run").exists()  # nothing started

    # --skip-bad drops them with a warning, and the run goes on (here: too few images to split).
    result = ok(train_main, args + ["--skip-bad", "--val-fraction", "0"])
    assert "warning: skipped 3 bad line(s)" in result.output


def test_image_that_breaks_mid_run_is_one_line(ds, tmp_path):
    """A truncated file passes the header check; decoding it in a loader worker fails cleanly."""
    data = (tmp_path / "img" / "t.png")
    data.parent.mkdir()
    data.write_bytes((ds / "img" / "0.png").read_bytes()[:200])
    manifest = write(tmp_path / "m.jsonl", [json.dumps({"image": "img/t.png", "labels": ["red"]})] * 1)
    args = train_args(ds, tmp_path / "run", "--epochs", "1", "--val-fraction", "0", "--workers", "1")
    args[args.index("--data") + 1] = str(manifest)
    result = invoke(train_main, args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(f"Error: cannot read image {data}")


def test_empty_manifest(ds, tmp_path):
    args = train_args(ds, tmp_path / "run", "--epochs", "1")
    args[args.index("--data") + 1] = str(write(tmp_path / "empty.jsonl", [""]))
    result = invoke(train_main, args)
    assert result.exit_code == 1 and "the manifest has no usable images" in result.output


def test_threads_and_a_shared_label_cache(ds, tmp_path):
    """--threads is the run's only (torch's setting comes back after it); runs share --label-cache."""
    cache = tmp_path / "labels"
    before = torch.get_num_threads()
    ok(train_main, train_args(ds, tmp_path / "a", "--epochs", "1", "--cached-tokens", "--threads", "1",
                              "--label-cache", str(cache)))
    assert torch.get_num_threads() == before
    cached = sorted(p.name for p in cache.glob("*.npy"))
    assert len(cached) == len(SEEN) and not (tmp_path / "a" / "label_cache").exists()
    ok(train_main, train_args(ds, tmp_path / "b", "--epochs", "1", "--cached-tokens", "--label-cache", str(cache),
                              "--no-zero-shot", "--val-concepts", "0"))
    assert sorted(p.name for p in cache.glob("*.npy")) == cached  # nothing embedded again
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["trained"] == len(SEEN) and run["held_out_concepts"] == []
    assert "zero_shot_weight" not in torch.load(tmp_path / "b" / "best.pt", weights_only=True)["head"]
    assert invoke(train_main, train_args(ds, tmp_path / "c", "--threads", "0")).exit_code != 0


def test_user_errors_are_one_line(ds, cached_run, tmp_path):
    cases = [
        (train_main, train_args(ds, cached_run, "--epochs", "1"), "already holds a run"),
        (train_main, ["--resume", str(cached_run), "--lr", "0.1"], "remove --lr"),
        (train_main, ["--resume", str(tmp_path / "nothing")], "checkpoint not found"),
        (train_main, ["--data", str(ds / "train.jsonl")], "missing --seen, --out"),
        (train_main, train_args(ds, tmp_path / "r", "--heads", "5"), "bad head configuration"),
        (train_main, train_args(ds, tmp_path / "r", "--val-concepts", "1.5"), "--val-concepts must be in [0, 1)"),
        (train_main, [*train_args(ds, tmp_path / "r1"), "--prompts", str(tmp_path / "no.txt")], "prompt pool"),
        (train_main, [*train_args(ds, tmp_path / "r2"), "--backbone", "openclip:NoSuchArch:none"],
         "cannot build backbone"),
        (eval_main, ["--ckpt", str(tmp_path / "none.pt"), "--data", str(ds / "test.jsonl")], "checkpoint not found"),
        (eval_main, ["--ckpt", str(cached_run), "--data", str(ds / "test.jsonl"), "--topk", "0"], ">= 1"),
        (eval_main, ["--ckpt", str(cached_run), "--data", str(ds / "test.jsonl"),
                     "--unseen", str(ds / "seen.txt")], "also seen labels"),
    ]
    for cmd, args, expected in cases:
        result = invoke(cmd, args)
        assert result.exit_code in (1, 2), (args, result.output)
        assert expected in result.output, (expected, result.output)
        assert result.output.strip().splitlines()[-1].startswith("Error:")


def test_help_explains_every_option():
    for cmd in (train_main, eval_main):
        out = CliRunner().invoke(cmd, ["--help"]).output
        for param in cmd.params:
            if param.name != "help":
                assert param.help, param.name
        assert "--cached-tokens" in out or "--predictions" in out
