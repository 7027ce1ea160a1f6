"""Label files, label banks from new labels (equal to the PyTorch LabelEmbedder), the bank cache,
and qks-labels."""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
import pytest
from qks.runtime import labels as labels_mod
from qks.runtime.bundle import Bundle
from qks.runtime.labels import LabelBank, LabelError, LabelWarning, read_label_file
from qks.runtime.manifest import BundleError
from runtime_fixtures import *  # noqa: F403


def test_label_file_rules(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_bytes("\ufeffcat\r\n  dog  \r\n\r\ncaf\u00e9\r\ncat\n\n".encode())
    with pytest.warns(LabelWarning, match="1 duplicate label"):
        assert read_label_file(f) == ["cat", "dog", "caf\u00e9"]
    f.write_bytes(b"cat\n\xff\xfedog\n")
    with pytest.raises(LabelError, match=r"not UTF-8 \(byte 0xff on line 2\)"):
        read_label_file(f)
    f.write_text("\n  \n")
    with pytest.raises(LabelError, match="no labels"):
        read_label_file(f)
    with pytest.raises(LabelError, match="not found"):
        read_label_file(tmp_path / "missing.txt")


def test_new_labels_equal_the_pytorch_label_embedder(runtime_bundle, tiny_checkpoint, tmp_path):
    from qks.checkpoint import load_checkpoint, model_from_checkpoint
    from qks.prompts import LabelEmbedder

    names = ["cat", "bird", "a red double-decker bus", "Zebra crossing!", "caf\u00e9 au lait"]
    bank = LabelBank.for_labels(Bundle.load(runtime_bundle), names, cache_dir=tmp_path, batch_size=3)
    ckpt = load_checkpoint(tiny_checkpoint)
    ref = LabelEmbedder(model_from_checkpoint(ckpt).backbone, list(ckpt["prompts"]))(names).numpy()
    assert bank.names == names and bank.embeddings.dtype == np.float32 and bank.embeddings.shape == ref.shape
    diff = float(np.abs(bank.embeddings - ref).max())
    print(f"label bank vs LabelEmbedder max abs diff: {diff:.3g}")
    assert diff <= 1e-5


def test_the_bundles_own_bank_is_found_by_key(runtime_bundle):
    b = Bundle.load(runtime_bundle)
    default = LabelBank.from_bundle(b)
    bank = LabelBank.for_labels(b, default.names, cache=False)
    assert bank.source == "bundle:default" and np.array_equal(bank.embeddings, default.embeddings)


def test_cache_hits_in_the_bundle(bundle_copy, monkeypatch):
    calls = []
    real = labels_mod.encode_labels
    monkeypatch.setattr(labels_mod, "encode_labels", lambda *a, **k: calls.append(1) or real(*a, **k))
    b = Bundle.load(bundle_copy)
    first = LabelBank.for_labels(b, ["zebra", "giraffe"])
    second = LabelBank.for_labels(Bundle.load(bundle_copy), ["zebra", "giraffe"])
    assert len(calls) == 1 and first.source == "computed" and second.source.startswith("cache:")
    assert str(bundle_copy / "labels" / "cache") in second.source
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    assert first.key == second.key
    LabelBank.for_labels(b, ["giraffe", "zebra"])  # another order is another bank
    assert len(calls) == 2
    Bundle.load(bundle_copy)  # cache files do not disturb the bundle's checks


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_bundle_caches_in_the_user_dir(bundle_copy, tmp_path):
    labels_dir = bundle_copy / "labels"
    labels_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        bank = LabelBank.for_labels(Bundle.load(bundle_copy), ["zebra"])
        again = LabelBank.for_labels(Bundle.load(bundle_copy), ["zebra"])
    finally:
        labels_dir.chmod(0o755)
    assert again.source.startswith("cache:" + str(tmp_path / "user-cache"))
    np.testing.assert_array_equal(bank.embeddings, again.embeddings)


def test_unwritable_bundle_cache_falls_back_to_the_user_dir(bundle_copy, tmp_path):
    (bundle_copy / "labels" / "cache").write_text("a file where the cache folder would be")
    LabelBank.for_labels(Bundle.load(bundle_copy), ["zebra"])
    again = LabelBank.for_labels(Bundle.load(bundle_copy), ["zebra"])
    assert again.source.startswith("cache:" + str(tmp_path / "user-cache"))


def test_damaged_cache_entry_is_recomputed(bundle_copy):
    b = Bundle.load(bundle_copy)
    bank = LabelBank.for_labels(b, ["zebra"])
    (bundle_copy / "labels" / "cache" / f"{bank.key}.npy").write_bytes(b"junk")
    again = LabelBank.for_labels(b, ["zebra"])
    assert again.source == "computed"
    np.testing.assert_array_equal(bank.embeddings, again.embeddings)


def test_qks_labels_adds_a_bank(bundle_copy, tmp_path):
    labels = tmp_path / "animals.txt"
    labels.write_text("zebra\ngiraffe\nzebra\n")
    res = run_blocked("labels", ["--bundle", str(bundle_copy), "--labels", str(labels), "--name", "animals"])  # noqa: F405
    assert res.returncode == 0, res.stderr
    assert "warning: " in res.stderr and "1 duplicate label" in res.stderr
    assert "bank 'animals': 2 labels x 32" in res.stderr
    b = Bundle.load(bundle_copy)  # the manifest lists the new files with their sha256
    bank = LabelBank.from_bundle(b, "animals")
    assert bank.names == ["zebra", "giraffe"] and bank.embeddings.shape == (2, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert LabelBank.for_labels(b, ["zebra", "giraffe"], cache=False).source == "bundle:animals"


def test_qks_labels_errors_are_one_line(bundle_copy, tmp_path):
    labels = tmp_path / "l.txt"
    labels.write_text("zebra\n")
    res = run_blocked("labels", ["--bundle", str(bundle_copy), "--labels", str(labels), "--name", "../evil"])  # noqa: F405
    assert res.returncode == 2 and res.stderr.startswith("qks-labels: error: bank name '../evil'")
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_blocked("labels", ["--bundle", str(tmp_path / "none"), "--labels", str(labels), "--name", "x"])  # noqa: F405
    assert res.returncode == 2 and "bundle folder not found" in res.stderr and "Traceback" not in res.stderr


def test_bank_without_label_encoder(bundle_copy):
    b = Bundle.load(bundle_copy)
    b.graphs.pop("label_encoder")
    with pytest.raises(BundleError, match="no 'label_encoder' graph"):
        LabelBank.for_labels(b, ["zebra"])
