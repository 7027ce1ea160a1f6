"""The Ray tagger (`QksTagger` for `map_batches`) and `qks-ray-infer`: the same records as qks-infer on
the same images, error records for broken ones, an image list, one-line errors. One local Ray
(`ray.init(num_cpus=2)`) for the whole module."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runtime_fixtures import *  # noqa: F403

ray = pytest.importorskip("ray")

from qks.runtime.cli import infer_main  # noqa: E402
from qks.runtime.infer import find_images  # noqa: E402
from qks.runtime.ray_tagger import OUTPUT_COLUMNS, QksTagger, image_dataset  # noqa: E402
from qks.runtime.ray_tagger import main as ray_main  # noqa: E402

NON_UTF8 = b"caf\xe9.jpg"
ERRORS = {  # image -> qks-infer's error text
    "empty.png": "empty file (0 bytes)",
    "gone.jpg": "file not found (broken link?)",
    "sub/broken.jpg": "cannot decode image: ",  # prefix: Pillow's message follows
    "text.jpg": "not a readable image (unidentified format)",
}


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def mess(photo_dir, tmp_path_factory) -> Path:
    """photo_dir (five photos, a truncated JPEG, a .txt) plus a text file, an empty file and a dangling
    link named like images, and a photo whose file name is not UTF-8."""
    root = tmp_path_factory.mktemp("ray") / "images"
    shutil.copytree(photo_dir, root)
    (root / "text.jpg").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    os.symlink(root / "nowhere.jpg", root / "gone.jpg")
    shutil.copy(photo_dir / "astronaut.jpg", os.path.join(os.fsencode(root), NON_UTF8))
    return root


def qks_infer(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        infer_main(args)
    return exc.value.code


def qks_ray_infer(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        ray_main(args)
    return exc.value.code


@pytest.fixture(scope="module")
def reference(mess, runtime_bundle, tmp_path_factory) -> dict[str, Path]:
    """qks-infer's outputs on `mess`: every label's scores, the top 2, the default (p >= 0.5), CSV."""
    d = tmp_path_factory.mktemp("ref")
    runs = {"all": ["--all-scores"], "top2": ["--top-k", "2"], "default": [], "csv": ["--top-k", "3"]}
    out = {}
    for name, extra in runs.items():
        out[name] = d / (f"{name}.csv" if name == "csv" else f"{name}.jsonl")
        code = qks_infer([str(mess), "--bundle", str(runtime_bundle), "--threads", "1", "--workers", "2",
                          "--no-progress", "--out", str(out[name]), *extra])
        assert code == 1  # some images are broken
    return out


def test_reference_has_the_expected_records(reference):
    recs = read_jsonl(reference["all"])  # noqa: F405
    assert len(recs) == 10
    errors = {r["image"]: r["error"] for r in recs if "error" in r}
    assert set(errors) == set(ERRORS)
    assert all(errors[k].startswith(v) for k, v in ERRORS.items())
    assert "caf\\xe9.jpg" in {r["image"] for r in recs}


def _tagger_kwargs(bundle, **kw):
    return dict(bundle=str(bundle), threads=1, decode_threads=2, **kw)


def test_tagger_called_directly_on_a_batch(runtime_bundle, mess, reference):
    """No Ray: one batch dict in, one row per path out, input columns kept; the `record` column is
    qks-infer's line for each image (one batch of all ten images, as qks-infer's batch of 16 is)."""
    names = find_images(mess)
    tagger = QksTagger(**_tagger_kwargs(runtime_bundle, all_scores=True, root=str(mess)))
    try:
        ids = np.arange(len(names)) * 10
        out = tagger({"path": np.array(names, dtype=object), "id": ids})
    finally:
        tagger.close()
    assert set(out) == {"path", "id", *OUTPUT_COLUMNS}
    np.testing.assert_array_equal(out["id"], ids)
    assert [ln + "\n" for ln in out["record"]] == reference["all"].read_text(encoding="utf-8").splitlines(keepends=True)
    for image, labels, probs, error, record in zip(*(out[c] for c in OUTPUT_COLUMNS), strict=True):
        rec = json.loads(record)
        assert rec["image"] == image
        if error is None:
            assert dict(zip(labels, probs, strict=True)) == rec["scores"]
            assert labels == ["cat", "dog", "car", "bird", "traffic light"]
        else:
            assert rec == {"image": image, "error": error} and labels == [] and probs == []


def test_tagger_labels_from_a_list_or_a_file(runtime_bundle, photo_dir, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("astronaut\ncat\nrocket\n", encoding="utf-8")
    batch = {"path": np.array([str(photo_dir / "astronaut.jpg"), str(photo_dir / "sub" / "broken.jpg")], dtype=object)}
    from_file = QksTagger(**_tagger_kwargs(runtime_bundle, labels=str(labels), top_k=2))(batch)
    from_list = QksTagger(**_tagger_kwargs(runtime_bundle, labels=["astronaut", "cat", "rocket"], top_k=2))(batch)
    assert list(from_file["record"]) == list(from_list["record"])
    assert set(from_file["labels"][0]) <= {"astronaut", "cat", "rocket"} and len(from_file["labels"][0]) == 2
    assert from_file["image"][0] == str(photo_dir / "astronaut.jpg")  # no root: the path as given
    assert from_file["error"][1].startswith("cannot decode image")
    from qks.runtime.labels import LabelError

    with pytest.raises(LabelError, match="not both"):
        QksTagger(**_tagger_kwargs(runtime_bundle, labels=["cat"], bank="default"))


def test_map_batches_equals_qks_infer(ray_local, runtime_bundle, mess, reference):
    """The issue's own usage: from_items, map_batches(QksTagger, concurrency=2, batch_size=2). Rows
    come back in any order; every image's record equals qks-infer's line, errors included. Ray's batches
    of 2 are not qks-infer's batch of 16: equal records also show fp32 scores do not depend on the
    batch here."""
    names = find_images(mess)
    items = [{"path": os.fsencode(n)} for n in names]  # bytes: one name is not UTF-8
    ds = ray.data.from_items(items).map_batches(
        QksTagger, fn_constructor_kwargs=_tagger_kwargs(runtime_bundle, top_k=2, root=str(mess)),
        concurrency=2, batch_size=2)
    rows = ds.take_all()
    assert len(rows) == len(names)
    got = {r["image"]: r["record"] for r in rows}
    want = {json.loads(line)["image"]: line for line in reference["top2"].read_text(encoding="utf-8").splitlines()}
    assert got == want
    errors = {r["image"]: r["error"] for r in rows if r["error"] is not None}
    assert set(errors) == set(ERRORS)


class _BatchProbe:
    """Which rows each Ray batch held: per row, the batch's first index and its size."""

    def __call__(self, batch):
        idx = batch["qks_index"]
        return {"qks_index": idx, "first": np.full(len(idx), idx[0]), "size": np.full(len(idx), len(idx))}


def test_qks_ray_infer_batches_are_qks_infer_batches(ray_local):
    """The command's dataset gives the actors exactly qks-infer's batches (what an int8 graph, which
    quantizes activations per batch, needs for equal results): 11 images in batches of 4 are rows
    0-3, 4-7, 8-10 (+ one padding row), whatever Ray's concurrency."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ds = image_dataset(ray, [f"img{i}.jpg" for i in range(11)], 4)
    rows = ds.map_batches(_BatchProbe, batch_size=4, compute=ray.data.ActorPoolStrategy(size=2)).take_all()
    seen = {r["qks_index"]: (r["first"], r["size"]) for r in rows}
    assert sorted(seen) == list(range(12))
    assert all(seen[i] == (i - i % 4, 4) for i in seen), seen


def _ray_args(mess, bundle, *extra):
    return [str(mess), "--bundle", str(bundle), "--threads", "1", "--no-progress", "--concurrency", "2", *extra]


@pytest.mark.parametrize("ref,extra", [
    ("all", ["--all-scores"]),
    ("default", ["--batch-size", "3"]),
    ("csv", ["--top-k", "3", "--format", "csv", "--batch-size", "1"]),
])
def test_qks_ray_infer_file_is_byte_identical(ray_local, runtime_bundle, mess, reference, tmp_path, ref, extra, capsys):
    out = tmp_path / "ray.out"
    assert qks_ray_infer(_ray_args(mess, runtime_bundle, "--out", str(out), *extra)) == 1  # error records: exit 1
    assert out.read_bytes() == reference[ref].read_bytes()
    assert not (tmp_path / "ray.out.partial").exists()
    err = capsys.readouterr().err
    assert "qks-ray-infer: 10 images tagged (4 errors)" in err, err


def test_console_script_to_stdout_without_torch(ray_local, runtime_bundle, mess, reference, tmp_path):
    """The installed entry point in a fresh interpreter (torch blocked), joining the module's Ray:
    stdout holds the records and nothing else."""
    address = ray.get_runtime_context().gcs_address
    args = _ray_args(mess, runtime_bundle, "--address", address, "--all-scores")
    code = BLOCK_TORCH + (  # noqa: F405
        f"sys.argv = ['qks-ray-infer'] + {args!r}\n"
        "from qks.runtime.ray_tagger import main\n"
        "try:\n    main()\n"
        "finally:\n"
        "    bad = [m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules]\n"
        "    assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300, cwd=tmp_path)
    stderr = res.stderr.decode("utf-8", "replace")
    assert res.returncode == 1, stderr
    assert res.stdout == reference["all"].read_bytes()
    assert "Traceback" not in stderr and "10 images tagged (4 errors)" in stderr


def test_image_list(ray_local, runtime_bundle, mess, reference, tmp_path, monkeypatch):
    """A list file: names kept as written and in the list's order; relative ones from --root (or the
    current folder), absolute ones as they are; a listed file that is missing is an error record."""
    by_image = {json.loads(line)["image"]: json.loads(line) for line in read_lines(reference["top2"])}
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"sub/coffee.png\n\n  rocket.webp  \nsub/broken.jpg\nmissing.jpg\n" + NON_UTF8 + b"\n"
                        + os.fsencode(mess / "astronaut.jpg") + b"\r\nsub/coffee.png\n")
    out = tmp_path / "list.jsonl"
    assert qks_ray_infer(_ray_args(listing, runtime_bundle, "--root", str(mess), "--top-k", "2",
                                   "--out", str(out))) == 1
    recs = read_jsonl(out)  # noqa: F405
    assert [r["image"] for r in recs] == ["sub/coffee.png", "rocket.webp", "sub/broken.jpg", "missing.jpg",
                                          "caf\\xe9.jpg", str(mess / "astronaut.jpg"), "sub/coffee.png"]
    assert recs[3] == {"image": "missing.jpg", "error": "file not found (broken link?)"}
    for r in recs[:3] + recs[4:5] + recs[6:]:
        assert r == by_image[r["image"]]
    assert recs[5]["labels"] == by_image["astronaut.jpg"]["labels"]

    monkeypatch.chdir(mess / "sub")  # without --root: relative to the current folder
    (tmp_path / "rel.txt").write_text("coffee.png\n", encoding="utf-8")
    out2 = tmp_path / "rel.jsonl"
    assert qks_ray_infer(_ray_args(tmp_path / "rel.txt", runtime_bundle, "--top-k", "2", "--out", str(out2))) == 0
    assert read_jsonl(out2) == [dict(by_image["sub/coffee.png"], image="coffee.png")]  # noqa: F405


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("args,message", [
    (["{tmp}/nope"], "image folder or list not found"),
    (["{tmp}/empty"], "no images under"),
    (["{tmp}/blank.txt"], "no image paths in"),
    (["{mess}", "--bundle", "{tmp}/missing"], "bundle folder not found"),
    (["{mess}", "--labels", "{tmp}/nope.txt"], "label file not found"),
    (["{mess}", "--bank", "nope"], "no label bank 'nope'"),
    (["{mess}", "--labels", "{tmp}/blank.txt", "--bank", "default"], "give --labels or --bank, not both"),
    (["{mess}", "--out", "{tmp}/exists.jsonl"], "exists.jsonl exists: pass --overwrite"),
    (["{mess}", "--root", "{tmp}"], "--root is for an image list"),
    (["{mess}", "--address", "auto", "--num-cpus", "2"], "--num-cpus is for a local Ray"),
    (["{mess}", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["{mess}", "--precision", "int8"], "the bundle has no int8 image graph"),
    (["{mess}", "--backend", "ort-cuda"], "backend ort-cuda cannot run"),
    (["{mess}", "--address", "127.0.0.1:1", "--precision", "int8"], "the bundle has no int8 image graph"),
])
def test_bad_input_is_one_line_without_starting_ray(runtime_bundle, mess, tmp_path, args, message):
    """Checked before Ray starts (no Ray fixture here; the cluster address is never contacted): a fresh
    interpreter, one line, exit 2, and an existing output left alone."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "exists.jsonl").write_text('{"image": "a.jpg", "labels": {}}\n')
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{mess}", str(mess)) for a in args]
    argv[1:1] = ["--bundle", str(runtime_bundle), "--no-progress"]
    code = f"import sys\nsys.argv = ['qks-ray-infer'] + {argv!r}\nfrom qks.runtime.ray_tagger import main\nmain()\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("qks-ray-infer: error:")]
    assert len(errors) == 1 and message in errors[0], res.stderr
    assert all(ln.startswith("qks-ray-infer: ") for ln in lines), res.stderr  # at most the backend line besides
    assert (tmp_path / "exists.jsonl").read_text() == '{"image": "a.jpg", "labels": {}}\n'


def test_worker_side_error_is_one_line(ray_local, runtime_bundle, mess, tmp_path):
    """On a cluster (--address) the backend is the workers' business: one that cannot run there fails
    in the workers' constructor, and still reaches the user as one line, with no output file left."""
    out = tmp_path / "o.jsonl"
    argv = _ray_args(mess, runtime_bundle, "--address", ray.get_runtime_context().gcs_address, "--backend", "ort-cuda",
                     "--out", str(out))
    code = f"import sys\nsys.argv = ['qks-ray-infer'] + {argv!r}\nfrom qks.runtime.ray_tagger import main\nmain()\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("qks-ray-infer:")]
    assert len(ours) == 1, res.stderr
    assert ours[0].startswith("qks-ray-infer: error: backend ort-cuda cannot run: this onnxruntime has no "
                              "CUDAExecutionProvider (pip install 'qks[gpu]')"), res.stderr
    assert "Traceback" not in res.stderr and "File \"" not in res.stderr, res.stderr
    if "Ray's messages are in " in ours[0]:  # what Ray printed is kept for whoever debugs it, not lost
        log = Path(ours[0].split("Ray's messages are in ")[1].rstrip(")"))
        # Not its content: which of Ray's messages (the worker's traceback, a raylet's RPC notice) reach
        # the driver before it stops depends on timing (a clean-clone run got only the RPC notice).
        assert log.read_text().strip()
        log.unlink()
    assert not out.exists() and not (tmp_path / "o.jsonl.partial").exists()
