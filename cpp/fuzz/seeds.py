"""Seed corpora for the fuzz targets, from the odd and broken files the C++ tests already use
(tests/cpp_fixtures.py), plus small hand-made inputs for the non-image parsers.

    python cpp/fuzz/seeds.py OUT      # OUT/<target>/<name> for every target in TARGETS

Run by cpp/scripts/fuzz.sh with the project's venv (numpy, Pillow); nothing here is committed.
"""

from __future__ import annotations

import io
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from cpp_fixtures import exif_orientation, make_broken_images, make_odd_images  # noqa: E402

TARGETS = ("fuzz_jpeg", "fuzz_png", "fuzz_gif", "fuzz_image_any", "fuzz_exif", "fuzz_npy", "fuzz_bundle",
           "fuzz_labels", "fuzz_records")
IMAGE_TARGETS = {"fuzz_jpeg": (b"\xff\xd8\xff",), "fuzz_png": (b"\x89PNG\r\n\x1a\n",), "fuzz_gif": (b"GIF87a", b"GIF89a")}
MAX_SEED = 200_000  # bytes: larger files slow every mutation down (big.jpg and the strips stay in)


def image_files() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for kind, make in (("odd", make_odd_images), ("broken", make_broken_images)):
            root = Path(tmp) / kind
            for name in make(root):
                p = root / name
                if p.is_file() and not p.is_symlink() and p.stat().st_size <= MAX_SEED:
                    out[f"{kind}_{name}"] = p.read_bytes()
        return out


def ftyp_seeds() -> dict[str, bytes]:
    # convert.cpp's heif_format: ISO-BMFF `ftyp` brands name HEIC or AVIF; others (MP4) are unidentified
    def ftyp(major: bytes, *compatible: bytes, size: int | None = None) -> bytes:
        body = major + b"\0\0\0\0" + b"".join(compatible)
        return (size or 8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\0\0\0\x08mdat"

    return {"ftyp_heic": ftyp(b"heic", b"mif1", b"heic"), "ftyp_avif": ftyp(b"avif", b"avif", b"mif1", b"miaf"),
            "ftyp_mif1_avif": ftyp(b"mif1", b"miaf", b"avif"), "ftyp_mp4": ftyp(b"isom", b"iso2", b"mp41"),
            "ftyp_box_too_long": ftyp(b"mif1", b"heic", size=0xFFFFFFF0), "ftyp_box_too_short": ftyp(b"avif", size=9),
            "ftyp_head_only": b"\0\0\0\x18ftyphei"}


def exif_seeds() -> dict[str, bytes]:
    out = {f"exif_{o}_{'be' if be else 'le'}": b"Exif\0\0" + exif_orientation(o, be) for o in range(1, 10) for be in (0, 1)}
    from PIL import Image

    for value in (3, 6, 8):
        e = Image.Exif()
        e[0x0112] = value
        e[0x010F] = "maker"
        out[f"pillow_exif_{value}"] = e.tobytes()
    out["rational"] = b"II*\0\x08\0\0\0\x01\0\x12\x01\x05\0\x01\0\0\0\x1a\0\0\0\0\0\0\0\x0c\0\0\0\x02\0\0\0"
    out["bigtiff"] = b"II+\0\x08\0\0\0\x10\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x12\x01\x03\0\x01\0\0\0\0\0\0\0\x06\0"
    out["xmp_attr"] = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    out["xmp_elem"] = b"<tiff:Orientation>3</tiff:Orientation>"
    return out


def npy_seeds() -> dict[str, bytes]:
    out = {}
    arrays = {"f32_2d": np.arange(12, dtype=np.float32).reshape(3, 4), "f32_fortran": np.asfortranarray(
        np.arange(6, dtype=np.float32).reshape(2, 3)), "f64": np.zeros((2, 2)), "f32_1d": np.ones(5, np.float32),
        "f32_3d": np.zeros((2, 1, 2), np.float32), "empty": np.zeros((0, 4), np.float32), "u8": np.arange(4, dtype=np.uint8)}
    for name, a in arrays.items():
        buf = io.BytesIO()
        np.save(buf, a)
        out[name] = buf.getvalue()
    for version in ((2, 0), (3, 0)):
        buf = io.BytesIO()
        np.lib.format.write_array(buf, arrays["f32_2d"], version=version)
        out[f"v{version[0]}"] = buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out["pickle"] = buf.getvalue()
    return out


def bundle_seed(files: dict[str, bytes]) -> bytes:
    """fuzz_bundle's input format (fuzz_bundle.cpp): the manifest, then each file as
    "\\n--file NAME\\n" and its bytes."""
    body = files.pop("manifest.json")
    for name, data in files.items():
        body += b"\n--file " + name.encode() + b"\n" + data
    return body


def bundle_seeds() -> dict[str, bytes]:
    import hashlib
    import json

    def rec(data):
        return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    bank = io.BytesIO()
    np.save(bank, np.ones((3, 4), np.float32))
    files = {"image_encoder.onnx": b"onnx", "label_encoder.onnx": b"text", "prompts.txt": b"a photo of {}.\n",
             "tokenizer.json": b"{}", "labels/default.npy": bank.getvalue(), "labels/default.txt": b"cat\ndog\nbird\n"}
    manifest = {
        "format": "qks-bundle", "schema_version": 1, "model": {"embed_dim": 4},
        "preprocess": {"size": 32, "resize_mode": "shortest", "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
                       "std": [0.25, 0.25, 0.25], "channels": "RGB", "layout": "NCHW", "crop": "center",
                       "value_range": [0.0, 1.0]},
        "graphs": {"image_encoder": {"file": "image_encoder.onnx", "precision": "fp32"},
                   "label_encoder": {"file": "label_encoder.onnx"}},
        "tokenizer": {"file": "tokenizer.json"}, "prompts": {"file": "prompts.txt"},
        "label_banks": {"default": {"file": "labels/default.npy", "names_file": "labels/default.txt", "shape": [3, 4],
                                    "key": "k"}},
        "default_bank": "default", "scoring": {"mode": "topk", "k": 2},
        "engines": [{"file": "image_encoder.onnx", "sidecar": "prompts.txt"}],
        "files": {name: rec(data) for name, data in files.items()},
    }
    full = dict(files, **{"manifest.json": json.dumps(manifest, indent=1).encode()})
    minimal = {k: v for k, v in manifest.items() if k not in ("label_banks", "default_bank", "engines", "scoring")}
    return {"full": bundle_seed(dict(full)),
            "minimal": bundle_seed(dict(files, **{"manifest.json": json.dumps(minimal).encode()})),
            "no_files": b'{"format": "qks-bundle", "schema_version": 1}'}


def label_seeds() -> dict[str, bytes]:
    return {"plain": b"cat\ndog\nbird\n", "crlf": b"cat\r\ndog\r\n", "bom": b"\xef\xbb\xbfcat\ndog\n",
            "dups": b"cat\n  cat  \n\n\tdog\x0bfish\x1cowl\xe2\x80\xa8bee\n", "latin1": b"caf\xe9\n",
            "unicode": "chat noir\nsch\u00e4ferhund\n\u72ac\n\U0001f408\n".encode(), "blank": b" \n\t\n"}


def record_seeds() -> dict[str, bytes]:
    # fuzz_records.cpp: 4 bytes of float, then NUL-separated fields: image name, error, labels...
    def seed(p, *fields):
        return struct.pack("<f", p) + b"\0".join(fields)

    return {"plain": seed(0.9, b"a/cat.jpg", b"", b"cat", b"dog"), "bad_utf8": seed(1e-5, b"caf\xe9/\xff.png", b"", b"x"),
            "error": seed(0.5, b"x.jpg", b"cannot decode image: \xc3(", b"cat"),
            "controls": seed(float("nan"), b"\x01\x1f\"\\\x7f\xe2\x80\xa8.gif", b"", "\u00e9t\u00e9".encode()),
            "dup_labels": seed(0.75, b"d.jpg", b"", b"a", b"a", b"b")}


def main(out: Path) -> None:
    images = image_files()
    corpora = {t: {} for t in TARGETS}
    for name, data in images.items():
        corpora["fuzz_image_any"][name] = data
        for target, magics in IMAGE_TARGETS.items():
            if data.startswith(magics):
                corpora[target][name] = data
    corpora["fuzz_image_any"].update(ftyp_seeds())
    corpora["fuzz_exif"] = exif_seeds()
    corpora["fuzz_npy"] = npy_seeds()
    corpora["fuzz_bundle"] = bundle_seeds()
    corpora["fuzz_labels"] = label_seeds()
    corpora["fuzz_records"] = record_seeds()
    for target, files in corpora.items():
        d = out / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
        print(f"{target}: {len(files)} seeds", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
