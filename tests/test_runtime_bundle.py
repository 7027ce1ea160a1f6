"""Bundle.load: the manifest contract is enforced with one-line BundleErrors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from qks.runtime.bundle import Bundle
from qks.runtime.manifest import BundleError, file_record
from runtime_fixtures import *  # noqa: F403
from runtime_fixtures import rewrite_manifest


def test_loads_and_describes(runtime_bundle):
    b = Bundle.load(runtime_bundle)
    assert set(b.graphs) == {"image_encoder", "image_encoder_fp16", "label_encoder"}
    assert b.preprocess.size == 32 and b.scoring == ("max", 1)
    assert b.default_bank() == "default" and b.banks["default"].shape == (5, 32)
    assert b.prompts() == ["a photo of a {}.", "there is a {} in the scene."]
    assert b.context_length == 77 and b.tokenizer_file.is_file()


def test_unknown_schema_version(bundle_copy):
    rewrite_manifest(bundle_copy, lambda m: m.update(schema_version=2))
    with pytest.raises(BundleError, match="schema version 2 is not supported"):
        Bundle.load(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="bundle folder not found"):
        Bundle.load(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(tmp_path)


def test_modified_file_fails_its_sha256(bundle_copy):
    path = bundle_copy / "prompts.txt"
    data = path.read_bytes()
    path.write_bytes(data.replace(b"photo", b"PHOTO"))
    with pytest.raises(BundleError, match="prompts.txt does not match its sha256"):
        Bundle.load(bundle_copy)
    Bundle.load(bundle_copy, verify=False)  # same size: only the hash notices


def test_truncated_and_missing_files(bundle_copy):
    (bundle_copy / "label_encoder.onnx").write_bytes(b"short")
    with pytest.raises(BundleError, match="label_encoder.onnx is 5 bytes"):
        Bundle.load(bundle_copy, verify=False)
    (bundle_copy / "label_encoder.onnx").unlink()
    with pytest.raises(BundleError, match="bundle file missing: label_encoder.onnx"):
        Bundle.load(bundle_copy)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "a\\b.onnx", "./x.onnx", "~/x.onnx"])
def test_paths_must_stay_inside(bundle_copy, bad):
    rewrite_manifest(bundle_copy, lambda m: m["graphs"]["image_encoder"].update(file=bad))
    with pytest.raises(BundleError, match="plain relative path"):
        Bundle.load(bundle_copy)


def test_symlink_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    os.replace(bundle_copy / "image_encoder.onnx", outside)
    os.symlink(outside, bundle_copy / "image_encoder.onnx")
    with pytest.raises(BundleError, match="points outside the bundle"):
        Bundle.load(bundle_copy)


def test_referenced_file_must_be_listed(bundle_copy):
    rewrite_manifest(bundle_copy, lambda m: m["files"].pop("tokenizer.json"))
    with pytest.raises(BundleError, match="tokenizer file tokenizer.json is not listed"):
        Bundle.load(bundle_copy)


def _replace_bank(b, arr=None, raw=None, names=None):
    npy = b / "labels" / "default.npy"
    if raw is not None:
        npy.write_bytes(raw)
    elif arr is not None:
        np.save(npy, arr, allow_pickle=True)
    if names is not None:
        (b / "labels" / "default.txt").write_text(names)

    def fix(m):
        m["files"]["labels/default.npy"] = file_record(b, "labels/default.npy")
        m["files"]["labels/default.txt"] = file_record(b, "labels/default.txt")
        if arr is not None and getattr(arr, "ndim", 0) == 2:
            m["label_banks"]["default"]["shape"] = list(arr.shape)
    rewrite_manifest(b, fix)


def test_bank_needing_pickle_is_refused(bundle_copy):
    _replace_bank(bundle_copy, arr=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(BundleError, match="needs pickle to load; refused"):
        Bundle.load(bundle_copy)


def test_bank_wrong_dtype_shape_names(bundle_copy):
    _replace_bank(bundle_copy, arr=np.zeros((5, 32), np.float64))
    with pytest.raises(BundleError, match=r"must be float32 \[L, D\], is float64"):
        Bundle.load(bundle_copy)
    _replace_bank(bundle_copy, arr=np.zeros((5, 16), np.float32))
    with pytest.raises(BundleError, match="dimension 16, the model's is 32"):
        Bundle.load(bundle_copy)
    _replace_bank(bundle_copy, arr=np.zeros((5, 32), np.float32), names="a\nb\n")
    with pytest.raises(BundleError, match="5 vectors but 2 names"):
        Bundle.load(bundle_copy)
    _replace_bank(bundle_copy, raw=b"garbage bytes")
    with pytest.raises(BundleError, match="not a valid .npy"):
        Bundle.load(bundle_copy)


def test_default_bank_choice(bundle_copy):
    rewrite_manifest(bundle_copy, lambda m: m.pop("default_bank", None))
    rewrite_manifest(bundle_copy, lambda m: m["label_banks"].update(other=dict(m["label_banks"]["default"])))
    assert Bundle.load(bundle_copy).default_bank() == "default"
    rewrite_manifest(bundle_copy, lambda m: m["label_banks"].update(third=m["label_banks"].pop("default")))
    with pytest.raises(BundleError, match="several label banks"):
        Bundle.load(bundle_copy).default_bank()
    rewrite_manifest(bundle_copy, lambda m: m.update(default_bank="third"))
    assert Bundle.load(bundle_copy).default_bank() == "third"
    rewrite_manifest(bundle_copy, lambda m: m.update(default_bank="gone"))
    with pytest.raises(BundleError, match="default_bank 'gone' is not one of its label banks"):
        Bundle.load(bundle_copy).default_bank()
