"""qks-calibrate (runtime/calibrate.py, runtime/thresholds.py): the fitting rule on synthetic scores, the
stored thresholds (hashed, tamper-checked, tied to the bank key), the selection rule, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from qks.runtime.bundle import Bundle
from qks.runtime.labels import LabelBank, save_bank
from qks.runtime.manifest import BundleError, file_record
from qks.runtime.scoring import select, thresholds_for
from qks.runtime.thresholds import CalibrationError, Target, fit
from runtime_fixtures import BLOCK_TORCH, manifest_json, photo, rewrite_manifest

NAMES = ["cat", "dog", "car", "bird", "traffic light"]  # the tiny checkpoint's labels (bank "default")


# -- the rule ------------------------------------------------------------------------------------

def _f1(scores, positive, t):
    kept = scores >= np.float32(t)
    tp = int((kept & positive).sum())
    return 2 * tp / (2 * tp + int((kept & ~positive).sum()) + int((~kept & positive).sum()))


def test_f1_rule_is_the_best_threshold_and_keeps_the_samples_selection():
    rng = np.random.default_rng(0)
    targets = np.where(rng.random((200, 6)) < 0.2, 1, -1).astype(np.int8)
    probs = np.clip(rng.normal(0.35 + 0.3 * (targets > 0), 0.15), 0, 1).astype(np.float32)
    probs[:20, 0] = 0.5  # ties: a block of equal scores is kept or dropped whole
    f = fit(probs, targets, list("abcdef"), Target("f1"), min_positives=5)
    for j in range(6):
        s, y = probs[:, j], targets[:, j] > 0
        brute = max(_f1(s, y, t) for t in np.unique(s))
        assert _f1(s, y, f.thresholds[j]) == pytest.approx(brute)
        assert not f.per_label[j]["fallback"] and f.per_label[j]["positives"] == int(y.sum())
        # halfway: strictly above the highest dropped score, at most the lowest kept one
        kept = s >= f.thresholds[j]
        assert (~kept).sum() == 0 or s[~kept].max() < f.thresholds[j] <= s[kept].min()


def test_precision_rule_is_the_lowest_threshold_reaching_it():
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4]], dtype=np.float32)
    targets = np.array([[1], [-1], [1], [1], [-1], [1]], dtype=np.int8)
    # precision of the top 1..6: 1, .5, .67, .75, .6, .67 -> the lowest cut reaching 0.75 keeps 4
    f = fit(scores, targets, ["x"], Target.parse("precision=0.75"), min_positives=1)
    assert f.thresholds[0] == np.float32(0.55)
    assert f.per_label[0]["precision"] == 0.75 and f.per_label[0]["recall"] == 0.75
    f = fit(scores, targets, ["x"], Target.parse("precision=1"), min_positives=1)
    assert f.thresholds[0] == np.float32(0.85)


def test_few_positives_and_unreachable_precision_fall_back_to_the_global_threshold():
    rng = np.random.default_rng(1)
    targets = -np.ones((100, 3), dtype=np.int8)
    targets[:30, 0] = 1
    targets[:2, 1] = 1  # 2 positives < 5
    probs = rng.random((100, 3)).astype(np.float32) * 0.5
    probs[:30, 0] += 0.5
    f = fit(probs, targets, ["many", "few", "none"], Target("f1"))
    assert f.fallback_labels == ["few", "none"]
    assert f.thresholds[1] == f.thresholds[2] == np.float32(f.global_threshold)
    assert f.per_label[1]["why"] == "fewer than 5 positives" and f.per_label[2]["positives"] == 0
    # a negative scored above every positive: precision 1 is out of reach for label 0
    probs[50, 0] = 1.0
    f = fit(probs, targets, ["many", "few", "none"], Target("precision", 1.0), min_positives=5)
    assert "many" in f.fallback_labels and f.per_label[0]["why"] == "no threshold reaches precision=1"


def test_floor_at_global_raises_low_thresholds_only():
    rng = np.random.default_rng(2)
    targets = np.where(rng.random((300, 4)) < 0.1, 1, -1).astype(np.int8)
    probs = rng.random((300, 4)).astype(np.float32)  # no signal: F1-optimal cuts keep nearly everything
    targets[:, 0] = np.where(np.arange(300) % 2, 1, -1)  # ... but one label the model separates well
    probs[:, 0] = np.where(targets[:, 0] > 0, 0.99, 0.01)  # (it sets the pooled, global threshold high)
    plain = fit(probs, targets, list("abcd"), Target("f1"))
    floored = fit(probs, targets, list("abcd"), Target("f1"), floor_at_global=True)
    g = np.float32(floored.global_threshold)
    assert np.array_equal(floored.thresholds, np.maximum(plain.thresholds, g))
    raised = [r for r in floored.per_label if "raised_from" in r]
    assert raised and all(r["raised_from"] < r["threshold"] == g for r in raised)


def test_unknown_targets_are_not_counted():
    probs = np.array([[0.9], [0.8], [0.1]], dtype=np.float32)
    targets = np.array([[1], [0], [-1]], dtype=np.int8)  # 0: not annotated
    f = fit(probs, targets, ["x"], Target("f1"), min_positives=1)
    assert f.per_label[0]["positives"] == 1 and f.per_label[0]["negatives"] == 1
    with pytest.raises(CalibrationError, match="no positive"):
        fit(probs, -np.ones_like(targets), ["x"], Target("f1"))


@pytest.mark.parametrize("text", ["f2", "precision", "precision=0", "precision=1.5", "precision=x", "recall=0.9"])
def test_bad_targets(text):
    with pytest.raises(CalibrationError, match="--target"):
        Target.parse(text)


# -- the selection rule --------------------------------------------------------------------------

def test_select_with_per_label_thresholds():
    probs = np.array([0.9, 0.5, 0.7, 0.2], dtype=np.float32)
    names = ["a", "b", "c", "d"]
    thr = np.array([0.95, 0.3, 0.6, 0.1], dtype=np.float32)
    assert select(probs, names, None, thr) == [("c", pytest.approx(0.7)), ("b", 0.5), ("d", pytest.approx(0.2))]
    # top k: at most k labels, each above its own threshold ("a" is most probable but below its own)
    assert [n for n, _ in select(probs, names, 2, thr)] == ["c", "b"]
    assert [n for n, _ in select(probs, names, 2, 0.6)] == ["a", "c"]  # one float: as before
    with pytest.raises(ValueError, match="3 thresholds for 4 labels"):
        select(probs, names, None, thr[:3])


def test_thresholds_for_is_the_rule_of_every_front_end():
    class Bank:
        thresholds = np.array([0.2, 0.8], dtype=np.float32)

    assert thresholds_for(Bank(), None, 0.4) == 0.4  # an explicit threshold overrides
    assert thresholds_for(Bank(), 3, None) is Bank.thresholds
    assert thresholds_for(object(), None, None) == 0.5  # no per-label thresholds: today's rule
    assert thresholds_for(object(), 3, None) is None


# -- the CLI and the stored file -----------------------------------------------------------------

@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A labelled sample of real photos: 8 images (4 photos, each also as a PNG), labels drawn so every
    label has positives, one line a photo."""
    root = tmp_path_factory.mktemp("labelled")
    (root / "img").mkdir()
    lines = []
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        im = photo(name).convert("RGB").resize((96, 96))
        for ext in ("jpg", "png"):
            im.save(root / "img" / f"{name}.{ext}")
            labels = [n for j, n in enumerate(NAMES) if (i + j + (ext == "png")) % 2 == 0]
            lines.append(json.dumps({"image": f"img/{name}.{ext}", "labels": labels}))
    (root / "sample.jsonl").write_text("\n".join(lines) + "\n")
    return root


def calibrate(*args) -> tuple[int, str]:
    """qks-calibrate in a fresh interpreter with torch blocked: (exit code, stderr)."""
    code = BLOCK_TORCH + (
        f"sys.argv = ['qks-calibrate'] + {[str(a) for a in args]!r}\n"
        "from qks.runtime.calibrate import main\n"
        "try:\n    main()\n"
        "finally:\n"
        "    assert not [m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules]\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stderr


def run_main(*args, capsys=None) -> tuple[int, str]:
    """qks-calibrate in this process (fast, for the error paths)."""
    from qks.runtime.calibrate import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err if capsys else ""


def test_calibrate_stores_thresholds_with_the_bank(bundle_copy, labelled):
    rc, err = calibrate("--bundle", bundle_copy, "--data", labelled / "sample.jsonl", "--min-positives", "2",
                        "--no-progress", "--backend", "ort-cpu", "--threads", "1")
    assert rc == 0, err
    assert "8 images scored (0 skipped), 5 labels, target f1" in err and "thresholds stored in" in err
    m = manifest_json(bundle_copy)
    rel = m["label_banks"]["default"]["thresholds_file"]
    assert rel == "labels/default.thresholds.json" and m["files"][rel] == file_record(bundle_copy, rel)
    doc = json.loads((bundle_copy / rel).read_text())
    assert doc["bank_key"] == m["label_banks"]["default"]["key"] and doc["rule"] == "f1" and doc["target"] is None
    assert [r["name"] for r in doc["labels"]] == NAMES and doc["data"]["images"] == 8
    assert all(r["positives"] + r["negatives"] == 8 for r in doc["labels"])
    bank = LabelBank.from_bundle(Bundle.load(bundle_copy), "default")
    assert bank.thresholds.dtype == np.float32 and bank.thresholds.tolist() == pytest.approx(doc["thresholds"])
    assert np.array_equal(bank.thresholds, np.asarray(doc["thresholds"], dtype=np.float32))

    # the file is hashed: a tampered threshold (same size) is refused at load
    text = (bundle_copy / rel).read_text()
    at = text.index("0.", text.index('"thresholds": [')) + 2
    (bundle_copy / rel).write_text(text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1:])
    with pytest.raises(BundleError, match="does not match its sha256"):
        Bundle.load(bundle_copy)
    # ... even re-hashed, thresholds fitted for another bank key are refused, in one line
    doc["bank_key"] = "0" * 64
    (bundle_copy / rel).write_text(json.dumps(doc, indent=1) + "\n")
    rewrite_manifest(bundle_copy, lambda m: m["files"].__setitem__(rel, file_record(bundle_copy, rel)))
    with pytest.raises(BundleError, match="fitted for another version of the bank"):
        Bundle.load(bundle_copy)
    # ... --dry-run changes nothing, not even those: it says so and stops
    manifest_before = (bundle_copy / "manifest.json").read_bytes()
    rc, err = calibrate("--bundle", bundle_copy, "--data", labelled / "sample.jsonl", "--dry-run", "--no-progress",
                        "--backend", "ort-cpu", "--threads", "1")
    assert rc == 2 and "fitted for another version of the bank" in err and "--dry-run changes nothing" in err, err
    assert (bundle_copy / "manifest.json").read_bytes() == manifest_before and (bundle_copy / rel).is_file()
    # ... and rerunning qks-calibrate, as the error says, drops them (with a warning) and fits new ones
    rc, err = calibrate("--bundle", bundle_copy, "--data", labelled / "sample.jsonl", "--min-positives", "2",
                        "--no-progress", "--backend", "ort-cpu", "--threads", "1")
    assert rc == 0, err
    assert "warning: label bank 'default': dropped the thresholds fitted for another version of it" in err
    assert Bundle.load(bundle_copy).banks["default"].thresholds is not None


def test_precision_target_and_a_new_named_bank(bundle_copy, labelled, tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("cat\ndog\nrocket\n")
    rc, err = run_main("--bundle", bundle_copy, "--data", labelled / "sample.jsonl", "--labels",
                       tmp_path / "labels.txt", "--name", "mine", "--target", "precision=0.6", "--no-progress",
                       "--backend", "ort-cpu", capsys=capsys)
    assert rc == 0, err
    assert "3 label(s) of the data are not in the bank and were ignored: bird, car, traffic light" in err
    assert "global threshold for 3 label(s) (fewer than 5 positives): cat, dog, rocket" in err
    b = Bundle.load(bundle_copy)
    assert b.banks["mine"].thresholds is not None and b.banks["default"].thresholds is None
    doc = json.loads((bundle_copy / "labels/mine.thresholds.json").read_text())
    assert doc["rule"] == "precision" and doc["target"] == 0.6 and doc["fallback_labels"] == ["cat", "dog", "rocket"]
    assert doc["labels"][2]["positives"] == 0 and doc["min_positives"] == 5

    # re-encoding the bank with the same labels keeps its thresholds; with other labels drops them, loudly
    bank = LabelBank.from_bundle(b, "mine")
    save_bank(b, "mine", LabelBank(bank.names, bank.embeddings, bank.key))
    assert Bundle.load(bundle_copy).banks["mine"].thresholds is not None
    with pytest.warns(UserWarning, match="thresholds were fitted for the old bank and are dropped"):
        save_bank(b, "mine", LabelBank(["cat", "dog"], bank.embeddings[:2], None))
    assert Bundle.load(bundle_copy).banks["mine"].thresholds is None
    assert not (bundle_copy / "labels/mine.thresholds.json").exists()


def test_bad_lines_and_unreadable_images(bundle_copy, labelled, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    (tmp_path / "img").symlink_to(labelled / "img")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    good = (labelled / "sample.jsonl").read_text()
    data.write_text(good + '{"image": "broken.jpg", "labels": ["cat"]}\n{"image": "gone.jpg"}\n{bad json\n')
    rc, err = run_main("--bundle", bundle_copy, "--data", data, capsys=capsys)
    assert rc == 2 and err.count("\n") == 1
    assert f"qks-calibrate: error: {data}:11: invalid JSON" in err and "--skip-bad" in err
    rc, err = run_main("--bundle", bundle_copy, "--data", data, "--skip-bad", "--min-positives", "2", "--no-progress",
                       "--backend", "ort-cpu", capsys=capsys)
    assert rc == 0, err
    assert "8 images scored (3 skipped)" in err
    assert "skipped broken.jpg: " in err and "skipped gone.jpg: " in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.jsonl"], "--data missing.jsonl: file not found"),
    (["--target", "recall=1"], "--target 'recall=1': use f1 or precision=P"),
    (["--labels", "x.txt"], "--labels needs --name NAME"),
    (["--bank", "nope"], "bundle has no label bank 'nope' (it has: default)"),
    (["--bank", "default", "--labels", "x.txt"], "give --labels or --bank, not both"),
    (["--min-positives", "0"], "Invalid value for '--min-positives'"),
])
def test_cli_errors_are_one_line(bundle_copy, labelled, args, message, capsys, monkeypatch):
    monkeypatch.chdir(labelled)
    if "--data" not in args:
        args = ["--data", "sample.jsonl", *args]
    rc, err = run_main("--bundle", bundle_copy, *args, capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_no_decodable_image_is_one_line(bundle_copy, tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "d.jsonl").write_text('{"image": "a.jpg", "labels": ["cat"]}\n')
    rc, err = run_main("--bundle", bundle_copy, "--data", tmp_path / "d.jsonl", "--no-progress", capsys=capsys)
    assert rc == 2 and "none of the 1 images could be scored (first: a.jpg: " in err and "Traceback" not in err
