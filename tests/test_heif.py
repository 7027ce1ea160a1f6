"""HEIC and AVIF input: real files made here by pillow-heif and Pillow, decoded by qks-infer's
Preprocess, the Ray tagger, the Triton bytes input; named (not read) by qks-tag; a missing plugin
is an error record naming the fix."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features
from qks.runtime.preprocess import Preprocess, PreprocessError, isobmff_format
from runtime_fixtures import PHOTOS, photo, read_jsonl

pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif is not installed (pip install 'qks[library]')")
if not features.check("avif"):
    pytest.skip("this Pillow has no AVIF (Pillow >= 11.3 wheels have it)", allow_module_level=True)

LOSSLESS_HEIC = {"quality": -1, "chroma": 444, "matrix_coefficients": 0}  # RGB kept as is: bit-exact
BEST_AVIF = {"quality": 100, "subsampling": "4:4:4"}  # Pillow's AVIF is never lossless (RGB -> YUV)
# Bounds on the preprocessed tensor (units of (x/255 - mean)/std: one 8-bit step is ~0.015), measured
# on the four photos halved, at size 64: AVIF best max 0.043; HEIC q90 mean <= 0.008, AVIF q90 <= 0.016.
AVIF_BEST_MAX = 0.06
LOSSY_MEAN = {"HEIF": 0.02, "AVIF": 0.03}
ORIENT_6 = 0x0112, 6  # EXIF orientation: rotate 90 degrees clockwise to display


def save(img: Image.Image, path: Path, fmt: str, exif: bytes | None = None, **kw) -> Path:
    img.save(path, fmt, **kw, **({"exif": exif} if exif else {}))
    return path


def rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[ORIENT_6[0]] = ORIENT_6[1]
    return exif.tobytes()


@pytest.fixture(scope="module")
def pp() -> Preprocess:
    return Preprocess(size=64)


@pytest.mark.parametrize("name", PHOTOS)
def test_decoded_tensor_equals_the_same_pixels_from_png(pp, name, tmp_path):
    img = photo(name)
    img = img.resize((img.width // 2, img.height // 2))
    want = pp.load(save(img, tmp_path / "x.png", "PNG"))
    np.testing.assert_array_equal(pp.load(save(img, tmp_path / "x.heic", "HEIF", **LOSSLESS_HEIC)), want)
    best = pp.load(save(img, tmp_path / "best.avif", "AVIF", **BEST_AVIF))
    assert float(np.abs(best - want).max()) <= AVIF_BEST_MAX
    for fmt, suffix in (("HEIF", "heic"), ("AVIF", "avif")):  # what phones write: lossy, 4:2:0
        lossy = pp.load(save(img, tmp_path / f"q90.{suffix}", fmt, quality=90))
        assert float(np.abs(lossy - want).mean()) <= LOSSY_MEAN[fmt], fmt


def test_a_10_bit_heic_decodes_to_the_8_bit_pixels(pp):
    """iPhone HDR photos are 10-bit: pillow-heif gives Pillow 8-bit RGB (here exactly the source's)."""
    rgb = np.asarray(photo("coffee").resize((96, 64)))
    deep = pillow_heif.from_bytes(mode="RGB;16", size=(96, 64), data=(rgb.astype(np.uint16) * 257).tobytes())
    data = io.BytesIO()
    deep.save(data, **LOSSLESS_HEIC)
    assert isobmff_format(data.getvalue()[:64]) == "HEIC"
    np.testing.assert_array_equal(pp.load(io.BytesIO(data.getvalue())), pp(Image.fromarray(rgb)))


def test_exif_orientation_is_honoured_like_jpeg(pp, tmp_path):
    img = photo("astronaut").resize((96, 64))
    want = pp(img.transpose(Image.Transpose.ROTATE_270))  # what orientation 6 displays
    wrong = pp(img.transpose(Image.Transpose.ROTATE_90))  # the other turn: same shape, other pixels
    heic = pp.load(save(img, tmp_path / "r.heic", "HEIF", rotated_exif(), **LOSSLESS_HEIC))
    np.testing.assert_array_equal(heic, want)  # libheif turns it; the EXIF tag is not applied twice
    avif = pp.load(save(img, tmp_path / "r.avif", "AVIF", rotated_exif(), **BEST_AVIF))
    assert float(np.abs(avif - want).max()) <= AVIF_BEST_MAX
    for fmt, suffix in (("JPEG", "jpg"), ("HEIF", "heic"), ("AVIF", "avif")):  # lossy ones turn like the JPEG
        x = pp.load(save(img, tmp_path / f"q90.{suffix}", fmt, rotated_exif(), quality=90))
        assert np.abs(x - want).mean() * 5 < np.abs(x - wrong).mean(), fmt


def test_isobmff_brands():
    def ftyp(major: bytes, *compatible: bytes) -> bytes:
        body = major + b"\0\0\0\0" + b"".join(compatible)
        return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\0\0\0\x08mdat"

    assert isobmff_format(ftyp(b"heic", b"mif1", b"heic")) == "HEIC"
    assert isobmff_format(ftyp(b"mif1", b"heix")) == "HEIC"
    assert isobmff_format(ftyp(b"mif1", b"miaf", b"avif")) == "AVIF"  # an AVIF brand wins over mif1
    assert isobmff_format(ftyp(b"avis", b"msf1")) == "AVIF"
    assert isobmff_format(ftyp(b"isom", b"iso2", b"mp41")) is None  # MP4 video: not an image
    assert isobmff_format(b"\0\0\0\x10ftyphe") is None
    assert isobmff_format(b"\xff\xd8\xff\xe0" + b"\0" * 20) is None


# Without the plugins: pillow-heif unimportable, Pillow's AVIF module missing (a meta-path finder).
WITHOUT_PLUGINS = textwrap.dedent("""
    import io, json, sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "pillow_heif" or name == "PIL._avif":
                raise ImportError(f"blocked: {name}")
    sys.meta_path.insert(0, Block())
    from qks.runtime.preprocess import Preprocess, PreprocessError
    out = []
    for path in sys.argv[1:]:
        for source in (path, io.BytesIO(open(path, "rb").read())):
            try:
                Preprocess(size=32).load(source)
                out.append(None)
            except PreprocessError as e:
                out.append(str(e))
    print(json.dumps(out))
""")


def test_a_missing_plugin_is_an_error_naming_the_format_and_the_fix(tmp_path):
    img = photo("chelsea").resize((64, 48))
    files = [save(img, tmp_path / "a.heic", "HEIF", quality=80), save(img, tmp_path / "b.avif", "AVIF", quality=80)]
    (tmp_path / "c.mp4").write_bytes(b"\0\0\0\x14ftypisom\0\0\0\0mp41" + b"\0" * 32)
    r = subprocess.run([sys.executable, "-c", WITHOUT_PLUGINS, *map(str, files), str(tmp_path / "c.mp4")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    heic, heic_bytes, avif, avif_bytes, mp4, _ = json.loads(r.stdout)
    assert heic == heic_bytes == "HEIC image: HEIC/HEIF decoding needs pillow-heif (pip install 'qks[library]')"
    assert avif == avif_bytes == ("AVIF image: AVIF decoding needs Pillow >= 11.3 built with AVIF "
                                  "(pip install 'qks[library]')")
    assert mp4 == "not a readable image (unidentified format)"


def test_a_damaged_heic_is_a_one_line_error(pp, tmp_path):
    data = save(photo("coffee").resize((64, 48)), tmp_path / "a.heic", "HEIF", quality=80).read_bytes()
    (tmp_path / "cut.heic").write_bytes(data[: len(data) // 2])
    with pytest.raises(PreprocessError) as e:
        pp.load(tmp_path / "cut.heic")
    # libheif's own reason (a cut file is still identified as HEIC), never "unidentified format"
    assert "\n" not in str(e.value) and str(e.value).startswith("cannot decode image: "), str(e.value)


def test_damaged_files_raise_only_preprocess_errors(pp):
    """Mutants of real HEIC/AVIF files (bytes changed, cut, overwritten): a tensor or a one-line
    PreprocessError, never another exception (libheif and libavif raise RuntimeError; found here)."""
    img = photo("chelsea").resize((64, 48))
    seeds = []
    for fmt in ("HEIF", "AVIF"):
        data = io.BytesIO()
        img.save(data, fmt, quality=80)
        seeds.append(data.getvalue())
    rng = np.random.default_rng(1)
    outcomes = {"tensor": 0, "error": 0}
    for i in range(600):
        d = bytearray(seeds[i % 2])
        op = i % 3
        if op == 0:
            for _ in range(rng.integers(1, 8)):
                d[rng.integers(len(d))] = rng.integers(256)
        elif op == 1:
            d = d[: rng.integers(len(d))]
        else:
            at = rng.integers(len(d))
            d[at:at + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        try:
            pp.load(io.BytesIO(bytes(d)))
            outcomes["tensor"] += 1
        except PreprocessError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
    assert min(outcomes.values()) > 50, outcomes  # both kinds of outcome were exercised


# -- the tools: qks-infer, the Ray tagger, the Triton bytes input, qks-tag ----------------------------


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """An iPhone-like folder: the same photo as PNG, lossless HEIC, AVIF; a lossy HEIC; a damaged AVIF."""
    root = tmp_path_factory.mktemp("library") / "photos"
    root.mkdir()
    img = photo("rocket").resize((160, 106))
    save(img, root / "a.png", "PNG")
    save(img, root / "b.heic", "HEIF", **LOSSLESS_HEIC)
    save(img, root / "c.avif", "AVIF", **BEST_AVIF)
    save(img, root / "d.HEIC", "HEIF", rotated_exif(), quality=85)
    (root / "e.avif").write_bytes((root / "c.avif").read_bytes()[:300])
    return root


def qks_infer(args: list[str]) -> int:
    from qks.runtime.cli import infer_main

    with pytest.raises(SystemExit) as exc:
        infer_main(args)
    return exc.value.code


def test_qks_infer_ray_tagger_and_triton_read_heic_and_avif(runtime_bundle, library, tmp_path):
    from qks.runtime.bundle import Bundle
    from qks.runtime.ray_tagger import QksTagger

    out = tmp_path / "tags.jsonl"
    code = qks_infer([str(library), "--bundle", str(runtime_bundle), "--all-scores", "--threads", "1",
                      "--no-progress", "--out", str(out)])
    assert code == 1  # e.avif is damaged
    records = {r["image"]: r for r in read_jsonl(out)}
    assert sorted(records) == ["a.png", "b.heic", "c.avif", "d.HEIC", "e.avif"]
    assert records["b.heic"]["scores"] == records["a.png"]["scores"]  # lossless: the same tensor
    assert all("scores" in records[n] for n in ("c.avif", "d.HEIC"))
    assert records["e.avif"]["error"] == "cannot decode image: a damaged or unsupported AVIF file"

    # the Ray tagger's batch function (no Ray needed to call it): qks-infer's records, line for line
    tagger = QksTagger(runtime_bundle, all_scores=True, threads=1, root=library)
    try:
        rows = tagger({"path": np.array(sorted(records), dtype=object)})
    finally:
        tagger.close()
    assert [json.loads(r) for r in rows["record"]] == [records[n] for n in sorted(records)]

    # Triton's BYTES input decodes through the same Preprocess
    pytest.importorskip("onnx")
    from qks.export.triton import write_python_repository
    from qks.serving.triton_model import QksServingModel, RequestError

    write_python_repository(runtime_bundle, tmp_path / "repo")
    model = QksServingModel(tmp_path / "repo" / "qks", threads=1)
    try:
        pp = Bundle.load(runtime_bundle).preprocess
        for name in ("b.heic", "c.avif", "d.HEIC"):
            np.testing.assert_array_equal(model.decode((library / name).read_bytes()), pp.load(library / name))
        with pytest.raises(RequestError, match="^cannot decode image: a damaged or unsupported AVIF file$"):
            model.decode((library / "e.avif").read_bytes())
    finally:
        model.close()


def test_qks_ray_infer_workers_decode_heic_and_avif(runtime_bundle, library, tmp_path):
    """A real Ray run (~20 s here: Ray's start): the workers register pillow-heif themselves, and the
    file equals qks-infer's byte for byte."""
    pytest.importorskip("ray")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.heic", "c.avif"):
        (folder / name).write_bytes((library / name).read_bytes())
    args = [str(folder), "--bundle", str(runtime_bundle), "--all-scores", "--threads", "1"]
    assert qks_infer([*args, "--no-progress", "--out", str(tmp_path / "infer.jsonl")]) == 0
    r = subprocess.run([sys.executable, "-c", "from qks.runtime.ray_tagger import main; main()", *args, "--out", str(tmp_path / "ray.jsonl")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "infer.jsonl").read_bytes()


def test_qks_serve_decodes_uploads_through_the_same_preprocess(runtime_bundle, library, monkeypatch):
    from qks.runtime.bundle import Bundle
    from qks.serving.service import ServeConfig, ServeError, Service

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # Service sets it process-wide
    service = Service(ServeConfig(bundle=runtime_bundle, threads=1))
    try:
        pp = Bundle.load(runtime_bundle).preprocess
        for i, name in enumerate(("b.heic", "c.avif", "d.HEIC")):
            np.testing.assert_array_equal(service.decode(i, name, (library / name).read_bytes()), pp.load(library / name))
        with pytest.raises(ServeError) as e:
            service.decode(0, "e.avif", (library / "e.avif").read_bytes())
        assert (e.value.status, e.value.message) == (400, "image 1 (e.avif): cannot decode image: a damaged or "
                                                          "unsupported AVIF file")
    finally:
        service.close()


def test_qks_tag_names_heic_and_avif_in_its_error_records(runtime_bundle, library, tmp_path):
    from cpp_fixtures import BUILD, run_tool, skip_reason

    if skip_reason() is not None:
        pytest.skip(skip_reason())
    res = run_tool(BUILD, "qks-tag", [library, "--bundle", runtime_bundle, "--threads", "1", "--out", tmp_path / "o.jsonl"])
    assert res.returncode == 1, res.stderr
    errors = {r["image"]: r.get("error") for r in read_jsonl(tmp_path / "o.jsonl")}
    note = "file (qks-tag reads JPEG, PNG and GIF; qks-infer reads it)"
    assert errors == {"a.png": None, "b.heic": f"cannot decode image: a HEIC {note}",
                      "c.avif": f"cannot decode image: an AVIF {note}", "d.HEIC": f"cannot decode image: a HEIC {note}",
                      "e.avif": f"cannot decode image: an AVIF {note}"}
