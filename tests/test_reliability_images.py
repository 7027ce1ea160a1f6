"""Messy photo folders through a real `qks-infer` (torch blocked): every valid image gets its scores,
every bad one an error record with a short reason, the exit code says whether any failed, and no
traceback. Plus the decoder's limits (decompression bombs, thin strips) measured in subprocesses.

Covered elsewhere (and counted): a FIFO named like an image and a folder-symlink cycle are skipped
by `find_images` (test_runtime_infer.py::test_find_images_is_recursive_sorted_and_survives_link_cycles);
EXIF orientation is honoured pixel for pixel (test_runtime_preprocess.py::test_exif_orientation_is_honoured);
16-bit PNGs are scaled, not clipped (test_runtime_preprocess.py::test_sixteen_bit_png_photo_matches_its_eight_bit_version).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runtime_fixtures import *  # noqa: F403
from runtime_fixtures import as_nobody

LABELS = ["cat", "dog", "car", "bird", "traffic light"]


def png_header(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR claiming w x h RGB, a tiny IDAT and IEND: no pixel data to speak of."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _rgb(seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# name -> expected: "ok" (a scores record) or the exact error text
EXPECTED = {
    "empty.jpg": "empty file (0 bytes)",
    "truncated.jpg": "cannot decode image: image file is truncated",  # prefix: Pillow adds the byte count
    "truncated.png": "cannot decode image: image file is truncated",
    "text.jpg": "not a readable image (unidentified format)",
    "png_named.jpg": "ok",  # wrong extension: decoded by content
    "cmyk.jpg": "ok",
    "gray16.png": "ok",
    "palette_alpha.png": "ok",
    "animated.gif": "ok",  # the first frame
    "exif_rotated.jpg": "ok",
    "one_pixel.png": "ok",
    "thin_strip.png": "ok",  # 1 x 40000: never resized to 32 x 1,280,000
    "bomb.png": "image too large (decompression bomb limit)",  # 100,000 x 100,000 claimed
    "big.png": f"image too large: 10000 x 9000 pixels (limit {Image.MAX_IMAGE_PIXELS}: PIL.Image.MAX_IMAGE_PIXELS)",
    "dangling.jpg": "file not found (broken link?)",
    "loop_a.jpg": "symbolic link loop",
    "loop_b.jpg": "symbolic link loop",
    "caf\\xe9.jpg": "ok",  # the file name is the bytes b"caf\xe9.jpg": not UTF-8
    "new\nline,\"quoted\".jpg": "ok",  # a newline, a comma and quotes in the name: JSON/CSV escaping
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo") / "images"
    root.mkdir()
    (root / "empty.jpg").write_bytes(b"")
    _rgb(1).save(root / "full.jpg", quality=90)
    data = (root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "full.jpg").unlink()
    _rgb(2).save(root / "full.png")
    data = (root / "full.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "full.png").unlink()
    (root / "text.jpg").write_text("this is a text file with an image's name\n")
    _rgb(3).save(root / "png_named.jpg", format="PNG")
    _rgb(4).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    Image.fromarray(np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30).save(root / "gray16.png")
    pal = _rgb(5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(root / "palette_alpha.png", transparency=0)
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _rgb(6, (60, 30)).save(root / "exif_rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(root / "one_pixel.png")
    Image.fromarray(np.full((40000, 1, 3), 128, np.uint8)).save(root / "thin_strip.png")
    (root / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (root / "big.png").write_bytes(png_header(10_000, 9_000))
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    os.symlink(root / "loop_b.jpg", root / "loop_a.jpg")
    os.symlink(root / "loop_a.jpg", root / "loop_b.jpg")
    _rgb(7).save(os.path.join(os.fsencode(root), b"caf\xe9.jpg"), quality=90)
    _rgb(9).save(root / 'new\nline,"quoted".jpg', format="JPEG")
    (root / "folder.jpg").mkdir()  # a folder named like an image: not an image, not listed
    (root / "folder.jpg" / "inner.png").write_bytes((root / "one_pixel.png").read_bytes())
    os.mkfifo(root / "pipe.jpg")  # would block a decoder: skipped
    (root / "notes.txt").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def zoo_run(zoo, runtime_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo-out") / "out.jsonl"
    res = run_blocked("infer", [str(zoo), "--bundle", str(runtime_bundle), "--threads", "1", "--workers", "2",  # noqa: F405
                                "--no-progress", "--all-scores", "--batch-size", "4", "--out", str(out)])
    return res, out


def test_zoo_exit_code_summary_and_no_traceback(zoo_run):
    res, out = zoo_run
    assert res.returncode == 1, res.stderr  # some images failed
    assert "Traceback" not in res.stderr
    n_err = sum(1 for v in EXPECTED.values() if v != "ok")
    assert f"{len(EXPECTED) + 1} images tagged ({n_err} errors, 0 already done)" in res.stderr, res.stderr
    out.read_bytes().decode("utf-8")  # strict UTF-8, even with a non-UTF-8 file name inside


def test_zoo_records_in_order(zoo_run):
    _, out = zoo_run
    recs = read_jsonl(out)  # noqa: F405
    # folder.jpg is a folder (its PNG inside is listed), pipe.jpg a FIFO, notes.txt not an image
    expected = [*EXPECTED, "folder.jpg/inner.png"]
    assert [r["image"] for r in recs] == sorted(expected)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_zoo_case(zoo_run, name):
    _, out = zoo_run
    (rec,) = [r for r in read_jsonl(out) if r["image"] == name]  # noqa: F405
    want = EXPECTED[name]
    if want == "ok":
        assert set(rec) == {"image", "scores"} and list(rec["scores"]) == LABELS
        assert all(0.0 <= p <= 1.0 for p in rec["scores"].values())
    else:
        assert set(rec) == {"image", "error"}
        assert rec["error"].startswith(want), rec["error"]


def test_non_utf8_name_is_backslash_escaped_and_resumes(zoo_run, zoo, runtime_bundle):
    _, out = zoo_run
    raw = out.read_bytes()
    assert b'"image": "caf\\\\xe9.jpg"' in raw  # JSON text caf\\xe9.jpg = the string caf\xe9.jpg
    # --resume recognises the escaped name: nothing is done twice
    res = run_blocked("infer", [str(zoo), "--bundle", str(runtime_bundle), "--threads", "1", "--no-progress",  # noqa: F405
                                "--all-scores", "--out", str(out), "--resume"])
    assert res.returncode == 0, res.stderr
    assert f"0 images tagged (0 errors, {len(EXPECTED) + 1} already done)" in res.stderr
    assert out.read_bytes() == raw


def test_odd_names_in_csv_and_resume(zoo, runtime_bundle, tmp_path):
    import csv

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(os.path.join(os.fsencode(zoo), b"caf\xe9.jpg"), os.path.join(os.fsencode(one), b"\xff\xfe.png"))
    shutil.copy(zoo / 'new\nline,"quoted".jpg', one / 'new\nline,"quoted".jpg')
    out = tmp_path / "o.csv"
    args = [str(one), "--bundle", str(runtime_bundle), "--threads", "1", "--no-progress", "--top-k", "1",
            "--out", str(out)]
    res = run_blocked("infer", args)  # noqa: F405
    assert res.returncode == 0, res.stderr
    raw = out.read_bytes()
    rows = list(csv.reader(raw.decode("utf-8").splitlines(keepends=True)))
    assert rows[0] == ["image", "label", "probability", "error"]
    assert [r[0] for r in rows[1:]] == ['new\nline,"quoted".jpg', "\\xff\\xfe.png"]  # undecodable bytes sort last
    res = run_blocked("infer", args + ["--resume"])  # noqa: F405
    assert res.returncode == 0 and "0 images tagged (0 errors, 2 already done)" in res.stderr, res.stderr
    assert out.read_bytes() == raw


def test_animated_gif_is_its_first_frame(zoo, runtime_bundle):
    from qks.runtime.bundle import Bundle

    pp = Bundle.load(runtime_bundle).preprocess
    first = pp(Image.new("RGB", (40, 40), (255, 0, 0)))
    np.testing.assert_array_equal(pp.load(zoo / "animated.gif"), first)


def test_cmyk_and_palette_decode_like_pillow_convert(zoo, runtime_bundle):
    from qks.runtime.bundle import Bundle

    pp = Bundle.load(runtime_bundle).preprocess
    for name in ("cmyk.jpg", "palette_alpha.png"):
        with Image.open(zoo / name) as im:
            ref = pp(im.convert("RGB"))
        np.testing.assert_array_equal(pp.load(zoo / name), ref)


def test_thin_strip_resamples_only_the_crop(zoo, runtime_bundle):
    """1 x 40000 mid-grey: the result is the grey, and the 32 x 1,280,000 intermediate is never made."""
    from qks.runtime.bundle import Bundle

    pp = Bundle.load(runtime_bundle).preprocess
    ref = pp(Image.new("RGB", (32, 32), (128, 128, 128)))
    np.testing.assert_allclose(pp.load(zoo / "thin_strip.png"), ref, atol=1e-6)


MEASURE = """
import resource, sys
from qks.runtime.preprocess import Preprocess, PreprocessError
pp = Preprocess(size=int(sys.argv[2]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    pp.load(sys.argv[1]); msg = "ok"
except PreprocessError as e:
    msg = str(e)
print(msg); print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("name,size,expected", [
    ("bomb.png", 224, "image too large (decompression bomb limit)"),
    ("big.png", 224, "image too large: 10000 x 9000"),
    ("thin_strip.png", 224, "ok"),  # a 224 x 8,960,000 intermediate would be 6 GB
])
def test_decoder_limits_use_little_memory(zoo, name, size, expected):
    res = subprocess.run([sys.executable, "-c", MEASURE, str(zoo / name), str(size)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    msg, grew_mib = res.stdout.splitlines()
    print(f"{name}: {msg!r}, peak RSS grew {grew_mib} MiB")
    assert msg.startswith(expected) and int(grew_mib) < 64


def test_unreadable_file_permission_denied(tmp_path):
    """Tests run as root, who reads any file (so as root a mode-000 image is simply tagged). The
    check forks and, in the child, drops to the unprivileged user `nobody` before loading (the
    venv's interpreter lives under /root, so a fresh `nobody` process could not even start)."""
    from qks.runtime.preprocess import Preprocess, PreprocessError

    d = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(d, 0o755)
        _rgb(8).save(d / "secret.jpg")
        os.chmod(d / "secret.jpg", 0)
        pp = Preprocess(size=32)

        def load():
            try:
                pp.load(d / "secret.jpg")
                return "ok"
            except PreprocessError as e:
                return str(e)

        assert as_nobody(load) == "permission denied"
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("content", ["empty", "no-images"])
def test_empty_folder_and_folder_without_images(runtime_bundle, tmp_path, content):
    folder = tmp_path / "in"
    folder.mkdir()
    if content == "no-images":
        (folder / "readme.txt").write_text("hello\n")
        (folder / "data.csv").write_text("a,b\n")
    out = tmp_path / "out.jsonl"
    res = run_blocked("infer", [str(folder), "--bundle", str(runtime_bundle), "--threads", "1", "--no-progress",  # noqa: F405
                                "--out", str(out)])
    assert res.returncode == 0, res.stderr
    assert f"qks-infer: warning: no images under {folder} (extensions:" in res.stderr
    assert "0 images tagged (0 errors, 0 already done)" in res.stderr and "Traceback" not in res.stderr
    assert out.read_bytes() == b""
    assert json.loads((tmp_path / "out.jsonl.meta.json").read_text())["status"] == "complete"
