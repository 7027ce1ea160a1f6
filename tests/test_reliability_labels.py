"""Label files as users write them, through the real CLIs (torch blocked), and 100,000 labels through
the label encoder with bounded memory.

Covered elsewhere (and counted): BOM, CRLF, blank lines and a duplicate in one file, parsed to the
clean list with a LabelWarning (test_runtime_labels.py::test_label_file_rules); qks-labels prints
the duplicate warning as one line (test_runtime_labels.py::test_qks_labels_adds_a_bank).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from runtime_fixtures import *  # noqa: F403


def _infer(bundle, images, labels, out, *extra):
    return run_blocked("infer", [str(images), "--bundle", str(bundle), "--labels", str(labels), "--threads", "1",  # noqa: F405
                                 "--no-progress", "--all-scores", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("one") / "images"
    d.mkdir()
    photo("coffee").resize((64, 48)).save(d / "coffee.jpg")  # noqa: F405
    return d


@pytest.mark.parametrize("content,message", [
    (b"", "no labels (the file is empty or blank)"),
    (b"\n   \n\r\n\t\n", "no labels (the file is empty or blank)"),
    (b"\xef\xbb\xbf\r\n", "no labels (the file is empty or blank)"),  # a BOM and nothing else
    (b"cat\ncaf\xe9\n", "not UTF-8 (byte 0xe9 on line 2); save it as UTF-8"),  # Latin-1
    (b"\xff\xfec\x00a\x00t\x00\n\x00", "not UTF-8 (byte 0xff on line 1); save it as UTF-8"),  # UTF-16
])
def test_unusable_label_files_stop_the_run(runtime_bundle, one_image, tmp_path, content, message):
    labels = tmp_path / "labels.txt"
    labels.write_bytes(content)
    out = tmp_path / "out.jsonl"
    res = _infer(runtime_bundle, one_image, labels, out)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"qks-infer: error: {labels}: {message}"
    assert "Traceback" not in res.stderr and not out.exists()


def test_label_file_that_is_a_folder(runtime_bundle, one_image, tmp_path):
    res = _infer(runtime_bundle, one_image, tmp_path, tmp_path / "out.jsonl")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (f"qks-infer: error: Invalid value for '--labels': File '{tmp_path}' "
                                                   "is a directory. (see qks-infer --help)")
    assert "Traceback" not in res.stderr


def test_bom_crlf_blank_lines_and_duplicates_end_to_end(runtime_bundle, one_image, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_bytes("\ufeffcat\r\n\r\n  dog \r\ncat\r\ncaf\u00e9 au lait\r\ndog\r\n".encode())
    out = tmp_path / "out.jsonl"
    res = _infer(runtime_bundle, one_image, labels, out)
    assert res.returncode == 0, res.stderr
    assert f"qks-infer: warning: {labels}: 2 duplicate label(s) kept once: 'cat', 'dog'" in res.stderr
    (rec,) = read_jsonl(out)  # noqa: F405
    assert list(rec["scores"]) == ["cat", "dog", "caf\u00e9 au lait"]  # no BOM, no \r, no blanks


LONG = "a " + "very " * 120 + "long label"


def test_label_longer_than_the_context_is_truncated_with_a_warning(bundle_copy, tmp_path):
    from qks.runtime.bundle import Bundle
    from qks.runtime.labels import LabelBank, LabelWarning

    b = Bundle.load(bundle_copy)
    with pytest.warns(LabelWarning, match=r"1 label\(s\) make prompts longer than the text context of 77 tokens "
                                          r"and were truncated \(as in training\), e\.g\. 'a very very"):
        bank = LabelBank.for_labels(b, ["cat", LONG], cache=False)
    assert bank.embeddings.shape == (2, 32) and np.isfinite(bank.embeddings).all()
    # truncation keeps the first 77 tokens: another tail gives the same embedding
    with pytest.warns(LabelWarning, match="1 label"):
        bank2 = LabelBank.for_labels(b, ["cat", LONG.replace("long label", "short one")], cache=False)
    np.testing.assert_array_equal(bank.embeddings, bank2.embeddings)

    labels = tmp_path / "long.txt"
    labels.write_text(f"cat\n{LONG}\n", encoding="utf-8")
    res = run_blocked("labels", ["--bundle", str(bundle_copy), "--labels", str(labels), "--name", "long"])  # noqa: F405
    assert res.returncode == 0, res.stderr
    assert "qks-labels: warning: 1 label(s) make prompts longer than the text context of 77 tokens" in res.stderr
    assert "bank 'long': 2 labels x 32" in res.stderr


def _cheap_label_encoder(path, vocab=49408, width=32, context=77):
    """A label encoder with the bundle's I/O contract (token_ids int64 [batch, 77] -> text_features
    float32 [batch, 32]) that costs almost nothing to run: an embedding lookup and a mean."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).standard_normal((vocab, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "token_ids"], ["emb"], axis=0),
         helper.make_node("ReduceMean", ["emb"], ["text_features"], axes=[1], keepdims=0)],
        "cheap_label_encoder",
        [helper.make_tensor_value_info("token_ids", TensorProto.INT64, ["batch", context])],
        [helper.make_tensor_value_info("text_features", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(table, "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


# Peak RSS of this process: VmHWM, which starts afresh at exec. (resource.getrusage's ru_maxrss is
# carried across fork + exec on Linux, so a child of the 1 GB pytest process would report pytest's peak.)
PEAK = """
import sys
from qks.runtime.bundle import Bundle
from qks.runtime.labels import LabelBank
n = int(sys.argv[2])
bank = LabelBank.for_labels(Bundle.load(sys.argv[1]), [f"label number {i}" for i in range(n)], cache=False,
                            threads=1, batch_size=256)
assert bank.embeddings.shape == (n, 32) and bank.embeddings.dtype.name == "float32"
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
print(int(hwm.split()[1]) // 1024)
"""


def test_100k_labels_stream_with_bounded_memory(bundle_copy):
    """Peak RSS of a 100,000-label bank vs a 1,000-label bank, each in a fresh process. Encoding all
    prompts at once would hold ids + masks (2 x 100,000 x 77 int64 = 123 MB) plus a tokenizers
    Encoding per prompt; streaming holds one batch and the [L, D] result (12.8 MB)."""
    import json

    from qks.runtime.manifest import file_record, write_manifest

    _cheap_label_encoder(bundle_copy / "label_encoder.onnx")
    (bundle_copy / "prompts.txt").write_text("a photo of a {}.\n", encoding="utf-8")
    m = json.loads((bundle_copy / "manifest.json").read_text())
    for rel in ("label_encoder.onnx", "prompts.txt"):
        m["files"][rel] = file_record(bundle_copy, rel)
    m["prompts"]["count"] = 1
    write_manifest(bundle_copy, m)
    peaks = {}
    for n in (1_000, 100_000):
        res = subprocess.run([sys.executable, "-c", PEAK, str(bundle_copy), str(n)], capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr
        peaks[n] = int(res.stdout.split()[-1])
    print(f"peak RSS: 1,000 labels {peaks[1_000]} MiB, 100,000 labels {peaks[100_000]} MiB")
    assert peaks[100_000] - peaks[1_000] < 64


def test_training_label_lists_and_manifest_with_bom_and_crlf(tmp_path):
    """A BOM (what Windows editors write) is not part of the first label or manifest line."""
    from PIL import Image

    from qks.data import read_label_lists, read_manifest

    (tmp_path / "seen.txt").write_bytes(b"\xef\xbb\xbfred\r\nblue\r\n\r\n")
    (tmp_path / "unseen.txt").write_bytes(b"\xef\xbb\xbfgreen\r\n")
    seen, unseen = read_label_lists(tmp_path / "seen.txt", tmp_path / "unseen.txt")
    assert (seen, unseen) == (["red", "blue"], ["green"])
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    (tmp_path / "m.jsonl").write_bytes(b'\xef\xbb\xbf{"image": "0.png", "labels": ["red"]}\r\n')
    (s,) = read_manifest(tmp_path / "m.jsonl", seen + unseen).samples
    assert s.positives == ("red",)


def test_export_label_file_with_bom_and_crlf(tmp_path):
    from qks.export.bundle import read_labels_file

    f = tmp_path / "animals.txt"
    f.write_bytes(b"\xef\xbb\xbfzebra\r\ngiraffe\r\n")
    assert read_labels_file(f) == ("animals", ["zebra", "giraffe"])
