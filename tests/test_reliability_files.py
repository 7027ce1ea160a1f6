"""Files from others: tampered bundles through a real qks-infer (torch blocked), checkpoints and
.npy files that would run code when unpickled, a graph that overflows, and training manifests.

Covered elsewhere (and counted): at the Bundle.load level, a modified file
(test_runtime_bundle.py::test_modified_file_fails_its_sha256), truncated and missing files
(::test_truncated_and_missing_files), `../`, absolute, backslash, `./` and `~` paths
(::test_paths_must_stay_inside), a symlink out of the bundle (::test_symlink_out_of_the_bundle_is_refused),
an unknown schema version (::test_unknown_schema_version), a bank needing pickle
(::test_bank_needing_pickle_is_refused), banks of the wrong dtype, dimension or name count
(::test_bank_wrong_dtype_shape_names); a TensorRT plan sidecar for another TensorRT version, GPU
SM or TensorRT flavour (test_engines.py::test_sidecar_compatibility, ::test_sidecar_files, and on a
GPU ::test_trt_engine_refuses_a_plan_for_another_gpu); NaN/inf from the engine as error records
(test_runtime_infer.py::test_non_finite_outputs_become_error_records); the training manifest's
errors (test_data.py::test_bad_lines_have_clear_messages, incl. `../outside.png`;
test_train_eval.py::test_bad_manifest_is_one_clear_line_per_problem).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from qks.runtime.manifest import file_record
from runtime_fixtures import *  # noqa: F403
from runtime_fixtures import rewrite_manifest


def _infer(bundle, images, out, *extra):
    return run_blocked("infer", [str(images), "--bundle", str(bundle), "--threads", "1", "--no-progress",  # noqa: F405
                                 "--all-scores", "--out", str(out), *extra])


def _modify(b):
    p = b / "prompts.txt"
    p.write_bytes(p.read_bytes().replace(b"photo", b"PHOTO"))


def _missing(b):
    (b / "tokenizer.json").unlink()


def _bank_float64(b):
    np.save(b / "labels" / "default.npy", np.zeros((5, 32), np.float64))
    rewrite_manifest(b, lambda m: m["files"].update({"labels/default.npy": file_record(b, "labels/default.npy")}))


def _bank_shape(b):
    np.save(b / "labels" / "default.npy", np.zeros((5, 7), np.float32))
    rewrite_manifest(b, lambda m: (m["files"].update({"labels/default.npy": file_record(b, "labels/default.npy")}),
                           m["label_banks"]["default"].update(shape=[5, 7])))


def _bank_pickle(b):
    np.save(b / "labels" / "default.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    rewrite_manifest(b, lambda m: m["files"].update({"labels/default.npy": file_record(b, "labels/default.npy")}))


TAMPERED = {
    "modified": (_modify, "bundle file prompts.txt does not match its sha256 in the manifest (corrupt or modified)"),
    "missing": (_missing, "bundle file missing: tokenizer.json"),
    "dotdot": (lambda b: rewrite_manifest(b, lambda m: m["graphs"]["image_encoder"].update(file="../image_encoder.onnx")),
               "manifest path '../image_encoder.onnx' must be a plain relative path inside the bundle"),
    "absolute": (lambda b: rewrite_manifest(b, lambda m: m["files"].update({"/etc/passwd": {"sha256": "0" * 64}})),
                 "manifest path '/etc/passwd' must be a plain relative path inside the bundle"),
    "schema": (lambda b: rewrite_manifest(b, lambda m: m.update(schema_version=99)),
               "bundle schema version 99 is not supported (this qks reads version 1); re-export it with this qks"),
    "bank-dtype": (_bank_float64, "label bank 'default' must be float32 [L, D], is float64 [5, 32]"),
    "bank-shape": (_bank_shape, "label bank 'default' has dimension 7, the model's is 32"),
    "bank-pickle": (_bank_pickle, "label bank 'default': default.npy needs pickle to load; refused (save a plain "
                                  "float32 array)"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_bundle_is_refused_by_qks_infer(bundle_copy, photo_dir, tmp_path, case):
    tamper, message = TAMPERED[case]
    tamper(bundle_copy)
    out = tmp_path / "out.jsonl"
    res = _infer(bundle_copy, photo_dir, out)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("qks-infer: error: ") and message in last, res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


class _Marker:
    """Unpickling this calls open(marker, "w"): harmless, but it proves code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_checkpoint(tiny_checkpoint, path, marker):
    import torch

    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    ckpt["payload"] = _Marker(marker)
    torch.save(ckpt, path)
    return path


def test_checkpoint_that_runs_code_is_refused_and_not_run(tiny_checkpoint, tmp_path):
    import torch

    from qks.checkpoint import CheckpointError, load_checkpoint

    marker = tmp_path / "PWNED"
    evil = _evil_checkpoint(tiny_checkpoint, tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(evil)
    assert str(e.value).startswith(f"{evil}: not a loadable qks checkpoint (Weights only load failed")
    assert "\n" not in str(e.value) and not marker.exists()
    torch.load(evil, weights_only=False)  # the control: a plain pickle load does run it
    assert marker.exists()


def test_qks_export_refuses_a_checkpoint_that_runs_code(tiny_checkpoint, tmp_path):
    marker = tmp_path / "PWNED"
    evil = _evil_checkpoint(tiny_checkpoint, tmp_path / "evil.pt", marker)
    res = subprocess.run([sys.executable, "-c", "from qks.export.cli import main; main()", "--ckpt", str(evil),
                          "--out", str(tmp_path / "bundle")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(
        f"qks-export: error: {evil}: not a loadable qks checkpoint (Weights only load failed")
    assert "Traceback" not in res.stderr and not marker.exists() and not (tmp_path / "bundle").exists()


def test_qks_eval_and_train_resume_refuse_a_checkpoint_that_runs_code(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from qks.cli import eval_main, train_main

    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    run.mkdir()
    evil = _evil_checkpoint(tiny_checkpoint, run / "last.pt", marker)
    (tmp_path / "m.jsonl").write_text('{"image": "x.png"}\n')
    for cmd, args in ((eval_main, ["--ckpt", str(evil), "--data", str(tmp_path / "m.jsonl")]),
                      (train_main, ["--resume", str(run)])):
        res = CliRunner().invoke(cmd, args)
        assert res.exit_code != 0 and "Traceback" not in res.output
        assert "not a loadable qks checkpoint (Weights only load failed" in res.output, res.output
        assert not marker.exists()


def test_cached_bank_that_needs_pickle_is_recomputed_not_unpickled(bundle_copy, tmp_path):
    from qks.runtime.bundle import Bundle
    from qks.runtime.labels import LabelBank, bank_key_for

    b = Bundle.load(bundle_copy)
    key = bank_key_for(b, ["zebra"])
    cache = bundle_copy / "labels" / "cache"
    cache.mkdir()
    marker = tmp_path / "PWNED"
    np.save(cache / f"{key}.npy", np.array([_Marker(marker)], dtype=object), allow_pickle=True)
    (cache / f"{key}.txt").write_text("zebra\n")
    bank = LabelBank.for_labels(b, ["zebra"])
    assert bank.source == "computed" and bank.embeddings.shape == (1, 32) and not marker.exists()
    again = LabelBank.for_labels(Bundle.load(bundle_copy), ["zebra"])  # the entry was rewritten, plain
    assert again.source.startswith("cache:")


def _overflowing_image_graph(path):
    """Graph surgery on a copy: query_features *= 1 / relu(max(pixels) per image). An all-black image
    (normalised max < 0) gets inf/NaN features (as an FP16 overflow would); a photo stays finite."""
    import onnx
    from onnx import helper

    m = onnx.load(path)
    g = m.graph
    old = g.output[0].name
    for node in g.node:
        node.output[:] = [f"{old}_raw" if o == old else o for o in node.output]
    g.initializer.extend([onnx.numpy_helper.from_array(np.array([1, 2, 3], np.int64), "qks_axes")])
    g.node.extend([
        helper.make_node("ReduceMax", ["pixels", "qks_axes"], ["qks_max"], keepdims=1),  # [B, 1, 1, 1]
        helper.make_node("Relu", ["qks_max"], ["qks_relu"]),
        helper.make_node("Reciprocal", ["qks_relu"], ["qks_scale4"]),
        helper.make_node("Squeeze", ["qks_scale4", "qks_sq_axes"], ["qks_scale"]),  # [B]
        helper.make_node("Unsqueeze", ["qks_scale", "qks_un_axes"], ["qks_scale3"]),  # [B, 1, 1]
        helper.make_node("Mul", [f"{old}_raw", "qks_scale3"], [old]),
    ])
    g.initializer.extend([onnx.numpy_helper.from_array(np.array([1, 2, 3], np.int64), "qks_sq_axes"),
                          onnx.numpy_helper.from_array(np.array([1, 2], np.int64), "qks_un_axes")])
    onnx.checker.check_model(m)
    onnx.save(m, path)


def test_graph_that_overflows_gives_error_records_not_scores(bundle_copy, tmp_path):
    from PIL import Image

    _overflowing_image_graph(bundle_copy / "image_encoder.onnx")
    rewrite_manifest(bundle_copy, lambda m: m["files"].update({"image_encoder.onnx": file_record(bundle_copy, "image_encoder.onnx")}))
    images = tmp_path / "images"
    images.mkdir()
    photo("astronaut").resize((64, 64)).save(images / "a_photo.png")  # noqa: F405
    Image.new("RGB", (40, 40), (0, 0, 0)).save(images / "b_black.png")
    photo("coffee").resize((64, 48)).save(images / "c_photo.png")  # noqa: F405
    out = tmp_path / "out.jsonl"
    res = _infer(bundle_copy, images, out, "--backend", "ort-cpu", "--precision", "fp32", "--batch-size", "3")
    assert res.returncode == 1, res.stderr
    assert "3 images tagged (1 errors" in res.stderr and "Traceback" not in res.stderr
    recs = read_jsonl(out)  # noqa: F405
    assert recs[1] == {"image": "b_black.png", "error": "model output is not finite (NaN or inf)"}
    for r in (recs[0], recs[2]):
        assert set(r) == {"image", "scores"} and all(0 <= p <= 1 for p in r["scores"].values())
    text = out.read_text()
    assert "NaN" not in text.replace("(NaN or inf)", "") and "Infinity" not in text


# --------------------------------------------------------------------------- training manifests


LABELS = ["cat", "dog"]


@pytest.fixture
def root(tmp_path):
    from PIL import Image

    (tmp_path / "data" / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "data" / "img" / "0.png")
    Image.new("RGB", (8, 8), (3, 2, 1)).save(tmp_path / "outside.png")
    return tmp_path / "data"


@pytest.mark.parametrize("image", ["../outside.png", "img/../../outside.png", "./img/../../data/../outside.png"])
def test_manifest_line_pointing_outside_its_root(root, image):
    from qks.data import ManifestError, read_manifest

    m = root / "m.jsonl"
    m.write_text(json.dumps({"image": "img/0.png", "labels": ["cat"]}) + "\n" + json.dumps({"image": image}) + "\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(m, LABELS)
    assert str(e.value).splitlines()[0] == f"{m}:2: image {image!r} points outside the manifest's folder {root}"


def test_manifest_path_that_climbs_back_inside_is_fine(root):
    from qks.data import read_manifest

    m = root / "m.jsonl"
    m.write_text(json.dumps({"image": "img/../img/0.png", "labels": ["cat"]}) + "\n")
    (s,) = read_manifest(m, LABELS).samples
    assert s.path == str(root / "img" / "0.png")


def test_manifest_that_is_not_utf8(root):
    from qks.data import ManifestError, read_manifest

    m = root / "m.jsonl"
    m.write_bytes(b'{"image": "img/0.png", "labels": ["caf\xe9"]}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl: cannot read manifest \('utf-8' codec can't decode byte 0xe9"):
        read_manifest(m, LABELS)


def test_manifest_image_that_is_a_bomb_or_a_folder(root):
    from test_reliability_images import png_header

    from qks.data import ManifestError, read_manifest

    (root / "img" / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (root / "img" / "big.png").write_bytes(png_header(10_000, 9_000))
    (root / "img" / "dir.png").mkdir()
    os.symlink(root / "img" / "gone.png", root / "img" / "dangling.png")
    m = root / "m.jsonl"
    m.write_text("".join(json.dumps({"image": f"img/{n}"}) + "\n" for n in ("0.png", "bomb.png", "big.png",
                                                                              "dir.png", "dangling.png")))
    with pytest.raises(ManifestError) as e:
        read_manifest(m, LABELS)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{m}:2: image too large (over twice PIL.Image.MAX_IMAGE_PIXELS): {root / 'img' / 'bomb.png'}"
    assert lines[1] == (f"{m}:3: image too large: 10000 x 9000 pixels (limit {Image.MAX_IMAGE_PIXELS}: "
                        f"PIL.Image.MAX_IMAGE_PIXELS): {root / 'img' / 'big.png'}")
    assert lines[2] == f"{m}:4: image not found: {root / 'img' / 'dir.png'}"
    assert lines[3] == f"{m}:5: image not found: {root / 'img' / 'dangling.png'}"
    assert "4 bad line(s)" in lines[4]


def test_training_loader_refuses_a_large_image_before_decoding(root):
    from test_reliability_images import png_header

    from qks.data import load_rgb

    (root / "img" / "big.png").write_bytes(png_header(10_000, 9_000))
    with pytest.raises(OSError, match=r"cannot read image .*big\.png: image too large: 10000 x 9000 pixels"):
        load_rgb(str(root / "img" / "big.png"))


@pytest.mark.parametrize("change,message", [
    ({"trt_version": "10.0.1"}, "x.plan was built with TensorRT 10.0.1, this machine has TensorRT 10.8.0.43: "
                                "re-export with qks-export --tensorrt on this machine"),
    ({"sm": "86", "gpu_name": "NVIDIA A10"}, "x.plan was built for GPU sm_86 (NVIDIA A10), this GPU is sm_90: "
                                             "re-export with qks-export --tensorrt on this machine"),
    ({"trt_module": "tensorrt_rtx"}, "x.plan was built by tensorrt_rtx, this machine has tensorrt"),
    ({"trt_version": None}, "x.plan: its sidecar does not say which trt_version it was built for"),
    ({"sm": None, "trt_version": ""}, "x.plan: its sidecar does not say which trt_version or sm it was built for"),
])
def test_plan_sidecar_for_another_tensorrt_or_gpu_says_which(tmp_path, change, message):
    """Read from the sidecar file as TrtEngine does, then checked against this machine (TensorRT
    10.8.0.43 on sm_90 here): no GPU or TensorRT needed to refuse."""
    from qks.engines.base import EngineError
    from qks.engines.plan import check_compatible, read_sidecar

    plan = tmp_path / "x.plan"
    plan.write_bytes(b"plan")
    meta = {"graph": "image_encoder_fp16", "trt_module": "tensorrt", "trt_version": "10.8.0.43", "sm": "90",
            "gpu_name": "NVIDIA H100 80GB HBM3"}
    (tmp_path / "x.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(EngineError) as e:
        check_compatible(read_sidecar(plan), "10.8.0.43", (9, 0), trt_module="tensorrt", plan_name=plan.name)
    assert str(e.value).startswith(message)
