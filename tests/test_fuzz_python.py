"""Property-based fuzzing (hypothesis) of the Python runtime's parsers of untrusted input: the bundle
manifest and checker (runtime/manifest.py, runtime/bundle.py), label files and bank names files
(runtime/labels.py), .npy label banks, and the record writer (runtime/infer.py). No input may raise
anything but the documented one-line errors (BundleError, LabelError); records must be valid UTF-8
JSON that reads back as written. The C++ side of the same parsers is fuzzed by cpp/fuzz (FUZZING.md).

Each property runs a few hundred generated inputs (seconds); failures found while writing these are
kept as explicit examples (@example), so they are replayed on every run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from qks.runtime.bundle import Bundle, load_npy, read_names
from qks.runtime.infer import jsonl_line, public_record
from qks.runtime.labels import LabelError, LabelWarning, _read_cached, read_label_file
from qks.runtime.manifest import BundleError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


FILES = {"image_encoder.onnx": b"onnx", "label_encoder.onnx": b"text", "prompts.txt": b"a photo of {}.\n",
         "tokenizer.json": b"{}", "labels/default.npy": _npy(np.ones((3, 4), np.float32)),
         "labels/default.txt": b"cat\ndog\nbird\n"}
MANIFEST = {
    "format": "qks-bundle", "schema_version": 1, "model": {"embed_dim": 4},
    "preprocess": {"size": 32, "resize_mode": "shortest", "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
                   "std": [0.25, 0.25, 0.25]},
    "graphs": {"image_encoder": {"file": "image_encoder.onnx"}, "label_encoder": {"file": "label_encoder.onnx"}},
    "tokenizer": {"file": "tokenizer.json"}, "prompts": {"file": "prompts.txt"},
    "label_banks": {"default": {"file": "labels/default.npy", "names_file": "labels/default.txt", "shape": [3, 4]}},
    "default_bank": "default", "scoring": {"mode": "max", "k": 1}, "engines": [],
    "files": {rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for rel, data in FILES.items()},
}


def _paths(value, prefix=()):
    """Every key path into a JSON value (dicts and lists)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@st.composite
def manifests(draw):
    """The valid manifest with a few of its values replaced by arbitrary JSON, or deleted."""
    m = copy.deepcopy(MANIFEST)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(m) if p]
        path = draw(st.sampled_from(paths))
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON)
    return m


def _load(manifest_text: str | bytes):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rel, data in FILES.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        data = manifest_text.encode("utf-8", "surrogatepass") if isinstance(manifest_text, str) else manifest_text
        (root / "manifest.json").write_bytes(data)
        try:
            b = Bundle.load(root, verify=True)
            b.scoring  # noqa: B018 - the accessors the CLI calls next
            b.default_bank()
        except BundleError as e:
            assert "\n" not in str(e), str(e)


@SETTINGS
@given(manifests())
@example({**MANIFEST, "preprocess": {**MANIFEST["preprocess"], "size": float("inf")}})
@example({**MANIFEST, "model": {"embed_dim": "four"}})
@example({**MANIFEST, "label_banks": []})
@example({**MANIFEST, "label_banks": {"default": {**MANIFEST["label_banks"]["default"], "shape": 3}}})
@example({**MANIFEST, "engines": 1})
@example({**MANIFEST, "files": 1})
@example({**MANIFEST, "scoring": {"k": "x"}})
@example({**MANIFEST, "default_bank": ["default"]})
@example({**MANIFEST, "graphs": {"image_encoder": {"file": "image\0encoder.onnx"}}})
def test_any_manifest_loads_or_raises_bundle_error(m):
    _load(json.dumps(m))


@SETTINGS
@given(st.binary(max_size=300))
@example(b"[" * 100_000)
@example(b'{"format": "qks-bundle", "schema_version": 1, "files": {"a\\u0000b": {"sha256": "0"}}}')
@example(b'\xef\xbb\xbf{"format": "qks-bundle"}')
def test_any_manifest_bytes_load_or_raise_bundle_error(data):
    _load(data)


@contextlib.contextmanager
def _scratch(name: str, data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        yield path


@SETTINGS
@given(st.binary(max_size=200))
@example(b"\xff\xfe")
@example(b"\xef\xbb\xbf\n \x0b\x1c\xc2\x85")
def test_any_label_file_reads_or_raises_label_error(data):
    with _scratch("labels.txt", data) as path, warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelWarning)
        try:
            names = read_label_file(path)
            assert names and all(n and n == n.strip() and len(n.splitlines()) == 1 for n in names)
            assert len(set(names)) == len(names)
        except LabelError as e:
            assert "\n" not in str(e)
        try:
            assert all("\n" not in n for n in read_names(path))
        except BundleError as e:
            assert "\n" not in str(e)


def _npy_mutants():
    base = _npy(np.ones((3, 4), np.float32))
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, len(base) - 1), st.binary(min_size=1, max_size=8)).map(
            lambda t: base[:t[0]] + t[1] + base[t[0] + len(t[1]):]),
        st.integers(0, len(base)).map(lambda n: base[:n]),
        st.text(max_size=60).map(lambda h: b"\x93NUMPY\x01\x00" + len(h.encode()).to_bytes(2, "little") + h.encode()),
    )


@SETTINGS
@given(_npy_mutants())
@example(b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'}")
@example(b"\x93NUMPY\x01\x00\x40\x00{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999, 2), }")
def test_any_npy_loads_or_raises_bundle_error(data):
    with _scratch("bank.npy", data) as path:
        try:
            load_npy(path, "label bank 'default'")
        except BundleError as e:
            assert "\n" not in str(e)


@SETTINGS
@given(_npy_mutants(), st.binary(max_size=40))
@example(b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'}", b"a\nb\nc\n")
def test_a_damaged_cached_bank_is_ignored(npy, names):
    """labels/cache/<key>.npy|.txt are found by name; a damaged pair is recomputed, never an error."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.npy").write_bytes(npy)
        (Path(tmp) / "k.txt").write_bytes(names)
        bank = _read_cached(Path(tmp), "k", ["a", "b", "c"])
        assert bank is None or (bank.names == ["a", "b", "c"] and bank.embeddings.shape[0] == 3)


# file names as os.fsdecode gives them: any bytes but NUL and "/", undecodable ones as surrogates
NAMES = st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\0", b"").replace(b"/", b"") or b"x").map(
    lambda b: b.decode("utf-8", "surrogateescape"))


@SETTINGS
@given(NAMES, st.one_of(st.none(), st.text(max_size=40)), st.dictionaries(st.text(min_size=1, max_size=10),
                                                                            st.floats(0, 1), max_size=4))
@example("caf\udce9.jpg", None, {"cat": 0.5})
@example("a\u2028b\x7f\"\\.png", "cannot decode image: \udcff", {})
def test_records_are_utf8_json_that_reads_back(name, error, labels):
    record = {"image": name, **({"error": error} if error is not None else {"labels": labels})}
    line = jsonl_line(public_record(record))
    line.encode("utf-8")  # valid UTF-8: no lone surrogate left
    assert "\n" not in line
    back = json.loads(line)
    want = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    assert back["image"] == want
    if error is not None:
        assert back["error"] == error.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    else:
        assert back["labels"] == labels
