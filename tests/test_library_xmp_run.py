"""qks-infer --xmp over a folder: every tagged image gets a sidecar that exiftool (the independent reader)
reads back with the record's labels; a sidecar that cannot be written is that image's error (its labels
stay in the record, the run goes on); --update rewrites only the sidecars of changed images."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from PIL import Image
from runtime_fixtures import *  # noqa: F403

if shutil.which("exiftool") is None:
    pytest.skip("exiftool is not installed (make exiftool)", allow_module_level=True)
pytest.importorskip("pyexiv2", reason="pyexiv2 is not installed (pip install 'qks[library]')")


def _exiftool(path) -> dict:
    r = subprocess.run(["exiftool", "-j", "-G1", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


def _as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def _qks_infer(library, bundle, *args):
    return qks_infer(library, bundle, "--top-k", "2", *args)  # noqa: F405


@pytest.fixture
def library(photo_library):
    (photo_library / "sub" / "broken.jpg").unlink()
    return photo_library


def test_xmp_sidecars_hold_the_records_labels(runtime_bundle, library, tmp_path):
    out = tmp_path / "tags.jsonl"
    originals = {p: p.read_bytes() for p in library.rglob("*") if p.is_file()}
    res = _qks_infer(library, runtime_bundle, "--out", out, "--xmp", "--xmp-root", "auto|qks")
    assert res.returncode == 0, res.stderr
    records = read_jsonl(out)  # noqa: F405
    meta = json.loads((tmp_path / "tags.jsonl.meta.json").read_text())
    assert len(records) == 5
    for r in records:
        x = _exiftool(library / (r["image"] + ".xmp"))
        assert _as_list(x["XMP-dc:Subject"]) == list(r["labels"])
        assert _as_list(x["XMP-lr:HierarchicalSubject"]) == [f"auto|qks|{label}" for label in r["labels"]]
        assert x["XMP-qks:BundleSha256"] == meta["bundle_sha256"]
    assert {p: p.read_bytes() for p in originals} == originals  # no image was touched


def test_a_sidecar_that_cannot_be_written_is_that_images_error(runtime_bundle, library, tmp_path):
    out = tmp_path / "tags.jsonl"
    (library / "astronaut.jpg.xmp").mkdir()  # in the sidecar's way (a read-only folder for root)
    res = _qks_infer(library, runtime_bundle, "--out", out, "--xmp")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    records = {r["image"]: r for r in read_jsonl(out)}  # noqa: F405
    bad = records["astronaut.jpg"]
    assert bad["error"].startswith("XMP sidecar not written:") and len(bad["labels"]) == 2
    assert all("error" not in r for name, r in records.items() if name != "astronaut.jpg")
    assert (library / "sub" / "coffee.png.xmp").is_file()


def test_update_rewrites_only_the_changed_images_sidecars(runtime_bundle, library, tmp_path):
    out = tmp_path / "tags.jsonl"
    assert _qks_infer(library, runtime_bundle, "--out", out, "--xmp", "--xmp-naming", "base").returncode == 0
    sidecars = {p: p.stat().st_mtime_ns for p in library.rglob("*.xmp")}
    assert sorted(p.name for p in sidecars) == ["astronaut.xmp", "camera_gray.xmp", "chelsea.xmp", "coffee.xmp",
                                                "rocket.xmp"]
    Image.new("RGB", (48, 40), (250, 250, 0)).save(library / "yellow.png")
    res = _qks_infer(library, runtime_bundle, "--out", out, "--xmp", "--xmp-naming", "base", "--update")
    assert res.returncode == 0 and "1 images tagged (0 errors, 5 unchanged, 0 removed)" in res.stderr, res.stderr
    assert {p: p.stat().st_mtime_ns for p in sidecars} == sidecars
    assert _as_list(_exiftool(library / "yellow.xmp")["XMP-dc:Subject"])
    res = _qks_infer(library, runtime_bundle, "--out", out, "--update")  # without --xmp: another setting
    assert res.returncode == 2 and "was written with xmp='base', this run has None" in res.stderr, res.stderr


def test_a_file_name_that_is_not_utf8_gets_its_sidecar(runtime_bundle, library, tmp_path):
    import os

    raw = os.path.join(os.fsencode(library), b"caf\xe9.jpg")
    with open(raw, "wb") as f:
        f.write((library / "astronaut.jpg").read_bytes())
    res = _qks_infer(library, runtime_bundle, "--out", tmp_path / "tags.jsonl", "--xmp")
    assert res.returncode == 0, res.stderr
    assert os.path.isfile(raw + b".xmp")
    assert any(r["image"] == "caf\\xe9.jpg" for r in read_jsonl(tmp_path / "tags.jsonl"))  # noqa: F405


def test_without_pyexiv2_xmp_stops_before_the_first_image(runtime_bundle, library, tmp_path):
    import sys

    code = ("import sys\n"
            "class B:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'pyexiv2': raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, B())\n"
            "from qks.runtime.cli import infer_main\n"
            f"infer_main([{str(library)!r}, '--bundle', {str(runtime_bundle)!r}, '--backend', 'ort-cpu', "
            f"'--no-progress', '--out', {str(tmp_path / 'tags.jsonl')!r}, '--xmp'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().endswith(
        "qks-infer: error: XMP sidecars need pyexiv2: pip install 'qks[library]'"), r.stderr
    assert not (tmp_path / "tags.jsonl").exists() or not (tmp_path / "tags.jsonl").read_text()
    assert not list(library.rglob("*.xmp"))
