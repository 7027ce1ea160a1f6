"""Helpers for the C++ tests (tests/test_cpp*.py): where the C++ build is, and folders of odd and
broken image files that exercise every decoding path the Python runtime has.

The build comes from `make cpp` (cpp/build, and cpp/build-asan for the sanitizer build); without it
the C++ tests skip with the reason `make cpp` gave (cpp/.deps/UNAVAILABLE) or say to run it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from runtime_fixtures import rewrite_manifest

ROOT = Path(__file__).resolve().parent.parent
CPP = ROOT / "cpp"
BUILD = Path(os.environ.get("QKS_CPP_BUILD", CPP / "build"))
ASAN_BUILD = Path(os.environ.get("QKS_CPP_ASAN_BUILD", CPP / "build-asan"))


def skip_reason(build: Path = BUILD) -> str | None:
    """None when the C++ build is there, else why not (for pytest.skip)."""
    if (build / "qks-tag").is_file():
        return None
    note = CPP / ".deps" / "UNAVAILABLE"
    if note.is_file():
        return f"C++ build unavailable here: {note.read_text().strip()}"
    return f"no C++ build in {build}: run `make cpp` first"


def ort_library() -> str:
    """The libonnxruntime.so of the onnxruntime wheel the Python runtime uses."""
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    libs = sorted(capi.glob("libonnxruntime.so.1.*"))
    assert libs, f"no libonnxruntime.so.1.* in {capi}"
    return str(libs[-1])


def cpp_env(**extra) -> dict:
    env = dict(os.environ, QKS_ORT_LIBRARY=ort_library(), OMP_NUM_THREADS="1", **extra)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:exitcode=99")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1:exitcode=98")
    return env


def run_tool(build: Path, tool: str, args: list, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(build / tool), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=cpp_env(**env))


def run_qks_infer(args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    code = "import sys\nfrom qks.runtime.cli import infer_main\nsys.argv = ['qks-infer'] + sys.argv[1:]\ninfer_main()\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


# -- images ------------------------------------------------------------------------------------------

def _rng_image(seed: int, w: int, h: int, mode: str = "RGB"):
    """A smooth-plus-noise test picture (JPEG-friendly, and every value range used)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 127 // max(w + h - 2, 1))], -1)
    arr = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img if mode == "RGB" else img.convert(mode)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(w: int, h: int, depth: int, color: int, rows: list[bytes], extra: list[tuple[bytes, bytes]] = (),
            interlace: int = 0, after: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A PNG written by hand: IHDR, `extra` chunks, IDAT of the filtered `rows` (each with its filter
    byte), `after` chunks, IEND."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, interlace)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    for kind, data in extra:
        out += _chunk(kind, data)
    out += _chunk(b"IDAT", zlib.compress(b"".join(rows)))
    for kind, data in after:
        out += _chunk(kind, data)
    return out + _chunk(b"IEND", b"")


def exif_orientation(value: int, big_endian: bool = False) -> bytes:
    """A TIFF block with IFD0 holding only the orientation tag (SHORT)."""
    if big_endian:
        return b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, value, 0) + b"\0\0\0\0"
    return b"II\x2a\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, value, 0) + b"\0\0\0\0"


def make_odd_images(root: Path) -> list[str]:
    """Valid files of every kind the decoders handle; returns their names (relative to root)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    names = []

    def save(name, img, **kw):
        img.save(root / name, **kw)
        names.append(name)

    def write(name, data: bytes):
        (root / name).write_bytes(data)
        names.append(name)

    photo = _rng_image(1, 97, 61)
    # JPEG: chroma subsampling, progressive, optimised tables, restart markers, grey, CMYK, sizes
    for sub, tag in ((2, "420"), (1, "422"), (0, "444")):
        save(f"sub{tag}.jpg", photo, quality=90, subsampling=sub)
    save("progressive.jpg", photo, quality=85, progressive=True)
    save("progressive_444.jpg", _rng_image(2, 130, 90), quality=92, progressive=True, subsampling=0)
    save("optimized.jpg", photo, quality=75, optimize=True)
    save("restart.jpg", _rng_image(3, 80, 80), quality=80, restart_marker_blocks=2)
    save("gray.jpg", photo.convert("L"), quality=90)
    save("cmyk.jpg", photo.convert("CMYK"), quality=92)
    save("q100.jpg", photo, quality=100)
    save("big.jpg", _rng_image(4, 1200, 900), quality=88)  # more than one 64 KiB read
    save("tiny_1x1.jpg", _rng_image(5, 1, 1), quality=90)
    save("tiny_3x2.jpg", _rng_image(6, 3, 2), quality=90)
    save("thin_1x300.jpg", _rng_image(7, 1, 300), quality=90)
    save("thin_300x1.jpg", _rng_image(8, 300, 1), quality=90)
    save("dpi.jpg", photo, quality=90, dpi=(300, 300))
    save("odd_size.jpg", _rng_image(9, 33, 257), quality=90)
    for o in range(1, 9):  # every EXIF orientation, little- and big-endian TIFF
        save(f"exif_{o}.jpg", _rng_image(10 + o, 50, 30), quality=90, exif=b"Exif\0\0" + exif_orientation(o, o % 2 == 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_pillow_6.jpg", _rng_image(20, 40, 64), quality=90, exif=exif)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    save("xmp_8.jpg", _rng_image(21, 40, 64), quality=90, xmp=xmp)
    save("exif_9.jpg", _rng_image(22, 40, 30), quality=90, exif=b"Exif\0\0" + exif_orientation(9))  # invalid value
    save("exif_broken_nodpi.jpg", _rng_image(23, 40, 30), quality=90, exif=b"Exif\0\0not tiff at all")
    # PNG: every bit depth and colour type, interlaced, palettes short and with transparency
    save("rgb.png", photo)
    save("rgb_interlaced.png", _rng_image(30, 37, 23), interlace=1)  # Pillow cannot write Adam7: see below
    save("rgba.png", photo.convert("RGBA"))
    rgba = np.array(photo.convert("RGBA"))
    rgba[..., 3] = np.arange(rgba.shape[1], dtype=np.uint8)[None, :] * 2
    save("rgba_alpha.png", Image.fromarray(rgba, "RGBA"))
    save("la.png", photo.convert("LA"))
    save("gray.png", photo.convert("L"))
    save("bilevel.png", photo.convert("1"))
    save("palette.png", photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=200))
    pal16 = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette_4bit.png", pal16, bits=4)
    save("palette_2bit.png", photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), bits=2)
    save("palette_1bit.png", photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=2), bits=1)
    save("palette_transparent.png", pal16, transparency=3)
    save("palette_alpha_bytes.png", pal16, transparency=bytes(range(0, 256, 16)))
    g16 = (np.arange(61 * 97, dtype=np.uint32).reshape(61, 97) * 11 % 65536).astype(np.uint16)
    save("gray16.png", Image.fromarray(g16))
    save("gray_trns.png", photo.convert("L"), transparency=7)
    save("rgb_trns.png", photo, transparency=(1, 2, 3))
    exif_png = Image.Exif()
    exif_png[0x0112] = 3
    save("exif_3.png", _rng_image(31, 30, 50), exif=exif_png)
    # hand-written PNGs for what Pillow cannot save: 16-bit RGB/RGBA/LA, 2/4-bit grey, Adam7 at
    # every depth, a short palette with an index past it, filters of every type
    rng = np.random.default_rng(40)
    w, h = 13, 11

    def rows(bpp_bytes: int, filt=lambda y: y % 5):
        return [bytes([filt(y)]) + rng.integers(0, 256, w * bpp_bytes, dtype=np.uint8).tobytes() for y in range(h)]

    write("rgb16.png", raw_png(w, h, 16, 2, rows(6)))
    write("rgba16.png", raw_png(w, h, 16, 6, rows(8)))
    write("la16.png", raw_png(w, h, 16, 4, rows(4)))
    write("la8_filters.png", raw_png(w, h, 8, 4, rows(2)))
    write("gray2.png", raw_png(w, h, 2, 0, [bytes([y % 5]) + rng.integers(0, 256, (w * 2 + 7) // 8, dtype=np.uint8).tobytes()
                                            for y in range(h)]))
    write("gray4.png", raw_png(w, h, 4, 0, [bytes([y % 5]) + rng.integers(0, 256, (w * 4 + 7) // 8, dtype=np.uint8).tobytes()
                                            for y in range(h)]))
    write("gray16_filters.png", raw_png(w, h, 16, 0, rows(2)))
    short_pal = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255])  # 3 entries; pixels use 0..7
    write("palette_short.png", raw_png(w, h, 8, 3, [bytes([0]) + bytes((x + y) % 8 for x in range(w)) for y in range(h)],
                                       extra=[(b"PLTE", short_pal)]))
    write("palette_none.png", raw_png(w, h, 8, 3, [bytes([0]) + bytes((7 * x + y) % 256 for x in range(w)) for y in range(h)]))
    for depth, color, bpp in ((8, 2, 3), (16, 0, 2), (1, 0, 1), (4, 3, 1), (8, 6, 4), (16, 6, 8), (2, 0, 1)):
        write(f"adam7_{depth}bit_c{color}.png", _adam7_png(23, 19, depth, color, bpp, rng))
    write("eXIf_6_after_idat.png", raw_png(w, h, 8, 2, rows(3), after=[(b"eXIf", exif_orientation(6))]))
    write("text_after_idat.png", raw_png(w, h, 8, 2, rows(3), after=[(b"tEXt", b"Comment\0hello")]))
    raw = exif_orientation(8)
    profile = f"\nexif\n{len(raw):8}\n{raw.hex()}\n".encode()
    write("raw_profile_exif_8.png", raw_png(w, h, 8, 2, rows(3), extra=[(b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(profile))]))
    write("xmp_itxt_5.png", raw_png(w, h, 8, 2, rows(3), extra=[(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + b'<x tiff:Orientation="5"/>')]))
    write("split_idat.png", _split_idat_png(60, 50, rng))
    # GIF: Pillow's own (interlaced, palette), grey (the identity palette: mode L), transparent,
    # animated (first frame), and hand-written ones: a frame smaller than the screen on a
    # transparent canvas, a frame larger than the screen, a local palette, not interlaced
    save("pillow.gif", photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    save("gray.gif", photo.convert("L"))
    save("transparent.gif", pal16, transparency=2)
    frames = [_rng_image(60 + i, 30, 20).convert("P", palette=Image.Palette.ADAPTIVE, colors=8) for i in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    names.append("animated.gif")
    pal = rng_pal = np.random.default_rng(61).integers(0, 256, 16 * 3, dtype=np.uint8).tobytes()
    idx = np.random.default_rng(62).integers(0, 16, (9, 11), dtype=np.uint8)
    write("gif_offset_frame.gif", raw_gif(20, 15, idx, global_palette=pal, frame=(5, 3), transparency=7))
    write("gif_big_frame.gif", raw_gif(6, 4, idx, global_palette=pal, frame=(0, 0)))
    write("gif_local_palette.gif", raw_gif(11, 9, idx, local_palette=rng_pal[::-1]))
    write("gif_plain.gif", raw_gif(11, 9, idx, global_palette=pal, interlace=False, gif87=True))
    write("gif_interlaced.gif", raw_gif(11, 9, idx, global_palette=pal, interlace=True))
    write("gif_grey_ramp.gif", raw_gif(11, 9, idx, global_palette=bytes(v for i in range(16) for v in (i, i, i))))
    write("gif_no_palette.gif", raw_gif(11, 9, idx))
    write("png_named.jpg", _png_bytes(_rng_image(41, 20, 20)))  # decoded by content
    write("jpeg_named.png", _jpeg_bytes(_rng_image(42, 20, 20)))
    # geometry: exact size, needs no resize, a strip past MAX_INTERMEDIATE_PIXELS
    save("thin_strip.png", _rng_image(43, 1, 9000))
    save("strip_3x30000.png", _rng_image(44, 3, 30000))
    return names


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _adam7_png(w: int, h: int, depth: int, color: int, bpp_bytes: int, rng) -> bytes:
    """An Adam7-interlaced PNG with random filtered bytes in every pass."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    bits = depth * channels
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    data = b""
    for x0, y0, dx, dy in passes:
        pw = (w - x0 + dx - 1) // dx if w > x0 else 0
        ph = (h - y0 + dy - 1) // dy if h > y0 else 0
        if pw == 0 or ph == 0:
            continue
        row_bytes = (pw * bits + 7) // 8
        for _ in range(ph):
            data += bytes([int(rng.integers(0, 5))]) + rng.integers(0, 256, row_bytes, dtype=np.uint8).tobytes()
    extra = [(b"PLTE", rng.integers(0, 256, 48, dtype=np.uint8).tobytes())] if color == 3 else []
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 1)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    for kind, d in extra:
        out += _chunk(kind, d)
    return out + _chunk(b"IDAT", zlib.compress(data)) + _chunk(b"IEND", b"")


def _split_idat_png(w: int, h: int, rng) -> bytes:
    """RGB data over many small IDAT chunks (and an empty one), as some encoders write."""
    raw = b"".join(bytes([1]) + rng.integers(0, 256, w * 3, dtype=np.uint8).tobytes() for _ in range(h))
    comp = zlib.compress(raw)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"")
    for i in range(0, len(comp), 777):
        out += _chunk(b"IDAT", comp[i:i + 777])
    return out + _chunk(b"IEND", b"")


def _lzw_literals(idx: np.ndarray, bits: int, bad_code: bool = False) -> bytes:
    """LZW data that uses no string codes: a clear code often enough that the code size never grows."""
    clear, end, size = 1 << bits, (1 << bits) + 1, bits + 1
    codes, run = [clear], 0
    for v in idx.reshape(-1).tolist():
        if run == (1 << size) - (1 << bits) - 2:  # the next code would make the decoder widen the codes
            codes.append(clear)
            run = 0
        codes.append(v)
        run += 1
    if bad_code:
        codes[3] = (1 << size) - 1  # a string code that does not exist yet
    codes.append(end)
    acc = nbits = 0
    out = bytearray()
    for c in codes:
        acc |= c << nbits
        nbits += size
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8
    if nbits:
        out.append(acc & 0xFF)
    blocks = b"".join(bytes([len(out[i:i + 255])]) + bytes(out[i:i + 255]) for i in range(0, len(out), 255))
    return blocks + b"\0"


def raw_gif(w: int, h: int, idx: np.ndarray, global_palette: bytes | None = None, local_palette: bytes | None = None,
            frame: tuple[int, int] = (0, 0), transparency: int | None = None, interlace: bool = False,
            gif87: bool = False, bad_code: bool = False) -> bytes:
    """A one-frame GIF written by hand: screen w x h, the frame idx [fh, fw] at `frame` (x, y)."""
    fh, fw = idx.shape
    rows = idx
    if interlace:
        order = list(range(0, fh, 8)) + list(range(4, fh, 8)) + list(range(2, fh, 4)) + list(range(1, fh, 2))
        rows = idx[order]

    def table_flags(p):
        return 0 if p is None else 0x80 | (max(1, (len(p) // 3 - 1).bit_length()) - 1)

    out = (b"GIF87a" if gif87 else b"GIF89a") + struct.pack("<HHBBB", w, h, table_flags(global_palette), 0, 0)
    if global_palette is not None:
        out += global_palette
    if transparency is not None:
        out += b"!\xf9\x04" + bytes([1]) + struct.pack("<H", 0) + bytes([transparency]) + b"\0"
    out += b"!\xfe\x05hello\0"  # a comment
    flags = table_flags(local_palette) | (0x40 if interlace else 0)
    out += b"," + struct.pack("<HHHHB", frame[0], frame[1], fw, fh, flags)
    if local_palette is not None:
        out += local_palette
    return out + bytes([4]) + _lzw_literals(rows, 4, bad_code) + b";"


def make_broken_images(root: Path) -> list[str]:
    """Files the runtime refuses, each with its own reason."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    names = []

    def write(name, data: bytes):
        (root / name).write_bytes(data)
        names.append(name)

    jpeg = _jpeg_bytes(_rng_image(50, 300, 200))
    prog = io.BytesIO()
    _rng_image(51, 300, 200).save(prog, format="JPEG", quality=90, progressive=True)
    prog = prog.getvalue()
    png = _png_bytes(_rng_image(52, 300, 200))
    big = io.BytesIO()
    _rng_image(53, 700, 600).save(big, format="PNG", compress_level=0)  # IDAT chunks of 64 KiB
    big = big.getvalue()
    write("empty.jpg", b"")
    write("text.jpg", b"this is a text file with an image's name\n")
    for frac in (0.002, 0.02, 0.3, 0.7, 0.995):
        write(f"jpeg_cut_{frac}.jpg", jpeg[: int(len(jpeg) * frac)])
        write(f"progressive_cut_{frac}.jpg", prog[: int(len(prog) * frac)])
        write(f"png_cut_{frac}.png", png[: int(len(png) * frac)])
        write(f"bigpng_cut_{frac}.png", big[: int(len(big) * frac)])
    write("jpeg_header_only.jpg", jpeg[:20])
    corrupt = bytearray(jpeg)
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 64] = bytes(range(64))
    write("jpeg_corrupt.jpg", bytes(corrupt))
    bad_sof = bytearray(jpeg)
    k = bad_sof.find(b"\xff\xc0")
    bad_sof[k + 4] = 12  # 12-bit samples: Pillow cannot handle them
    write("jpeg_12bit.jpg", bytes(bad_sof))
    write("jpeg_no_sos.jpg", jpeg[: jpeg.find(b"\xff\xda")] + b"\xff\xd9")
    write("jpeg_exif_broken_dpi.jpg", _jpeg_with(dict(dpi=(72, 72), exif=b"Exif\0\0not tiff at all")))
    bad_zlib = bytearray(png)
    k = bad_zlib.find(b"IDAT") + 20
    bad_zlib[k: k + 30] = b"\xff" * 30
    write("png_bad_zlib.png", bytes(bad_zlib))
    w, h = 8, 4
    write("png_bad_filter.png", raw_png(w, h, 8, 2, [bytes([9]) + bytes(w * 3)] * h))
    write("png_short_data.png", raw_png(w, h, 8, 2, [bytes([0]) + bytes(w * 3)] * (h - 1)))
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # IHDR's CRC
    write("png_bad_header_crc.png", bytes(bad_crc))
    write("png_no_idat.png", b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)) + _chunk(b"IEND", b""))
    write("png_short_ihdr.png", b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", b"\0\0\0\4\0\0\0\4") + _chunk(b"IEND", b""))
    write("png_bad_depth.png", raw_png(4, 4, 16, 3, [bytes(9)] * 4))
    write("png_truncated_gama.png", raw_png(4, 4, 8, 2, [bytes(13)] * 4, extra=[(b"gAMA", b"\0\1")]))
    write("png_exif_not_tiff.png", raw_png(4, 4, 8, 2, [bytes(13)] * 4, extra=[(b"eXIf", b"nope, not TIFF")]))
    write("png_raw_profile_bad_hex.png", raw_png(4, 4, 8, 2, [bytes(13)] * 4,
                                                 extra=[(b"tEXt", b"Raw profile type exif\0\nexif\n 10\nzz00\n")]))
    write("png_broken_chunk_name.png", png[:33] + b"\0\0\0\1\x01\x02\x03\x04x" + png[33:])
    write("bomb.png", b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
          + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))
    write("big_header.png", b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 9_000, 8, 2, 0, 0, 0))
          + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))
    idx = np.random.default_rng(63).integers(0, 16, (9, 11), dtype=np.uint8)
    pal = bytes(range(48))
    gif = raw_gif(11, 9, idx, global_palette=pal)
    write("gif_cut.gif", gif[: len(gif) - 12])
    write("gif_header_only.gif", gif[:13])
    write("gif_no_image.gif", gif[:13 + 48] + b";")
    write("gif_bits_13.gif", gif.replace(b",\0\0\0\0\x0b\0\x09\0\0\x04", b",\0\0\0\0\x0b\0\x09\0\0\x0d"))
    write("gif_bad_code.gif", raw_gif(11, 9, idx, global_palette=pal, bad_code=True))
    write("gif_zero_width.gif", raw_gif(11, 9, idx[:, :0].copy(), global_palette=pal))
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).convert("P").save(buf, format="BMP")
    write("a_bmp.bmp", buf.getvalue())
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    names.append("dangling.jpg")
    os.symlink(root / "loop_b.jpg", root / "loop_a.jpg")
    os.symlink(root / "loop_a.jpg", root / "loop_b.jpg")
    names += ["loop_a.jpg", "loop_b.jpg"]
    return names


def _jpeg_with(kw: dict) -> bytes:
    buf = io.BytesIO()
    _rng_image(54, 40, 30).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def npy_load(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


# -- records and bundles -----------------------------------------------------------------------------

def compare_records(cpp_text: str, py_text: str) -> None:
    cpp = [json.loads(line) for line in cpp_text.splitlines()]
    py = [json.loads(line) for line in py_text.splitlines()]
    assert [r["image"] for r in cpp] == [r["image"] for r in py]
    for c, p in zip(cpp, py, strict=True):
        assert list(c) == list(p), (c, p)
        if "error" in p:
            assert c == p
            continue
        key = "scores" if "scores" in p else "labels"
        cv, pv = c[key], p[key]
        if list(cv) != list(pv):  # only a near-tie may swap places
            assert set(cv) == set(pv) and all(abs(cv[k] - pv[k]) < 1e-6 for k in cv), (c, p)
        assert all(abs(cv[k] - pv[k]) <= 1e-5 for k in pv), (c, p)
    for line in cpp_text.splitlines():  # numbers as Python writes them: repr of 7 significant digits
        for num in re.findall(r": ([0-9][0-9.e+-]*)[,}]", line):
            assert num == repr(float(num)) and len(num.replace(".", "").lstrip("0").split("e")[0]) <= 7, num


def resign(bundle: Path, *rels: str) -> None:
    """Put the files' current size and sha256 in the manifest (a consistent but wrong bundle)."""
    from qks.runtime.manifest import file_record

    def edit(m):
        for rel in rels:
            m["files"][rel] = file_record(bundle, rel)

    rewrite_manifest(bundle, edit)


def write(b: Path, rel: str, data: bytes) -> None:
    (b / rel).write_bytes(data)


def flip_byte(b: Path) -> None:
    data = bytearray((b / "image_encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    write(b, "image_encoder.onnx", bytes(data))


def _bank(b: Path, arr, names=None, shape=None) -> None:
    np.save(b / "labels" / "default.npy", arr, allow_pickle=True)
    rels = ["labels/default.npy"]
    if names is not None:
        (b / "labels" / "default.txt").write_bytes(names)
        rels.append("labels/default.txt")
    resign(b, *rels)
    if shape is not None:
        rewrite_manifest(b, lambda m: m["label_banks"]["default"].update(shape=shape))


def _symlink_outside(b: Path) -> None:
    outside = b.parent / "outside_prompts.txt"
    shutil.copy(b / "prompts.txt", outside)
    (b / "prompts.txt").unlink()
    (b / "prompts.txt").symlink_to(outside)


def _drop_graph_files(b: Path) -> None:
    def edit(m):
        del m["files"]["image_encoder.onnx"]

    rewrite_manifest(b, edit)


TAMPERING = {
    "graph_bytes_changed": flip_byte,
    "bank_truncated": lambda b: write(b, "labels/default.npy", (b / "labels/default.npy").read_bytes()[:-8]),
    "tokenizer_missing": lambda b: (b / "tokenizer.json").unlink(),
    "path_traversal": lambda b: rewrite_manifest(b, lambda m: m["files"].update({"../outside.txt": {"sha256": "0", "bytes": 1}})),
    "absolute_path": lambda b: rewrite_manifest(b, lambda m: m["files"].update({"/etc/hostname": {"sha256": "0"}})),
    "backslash_path": lambda b: rewrite_manifest(b, lambda m: m["files"].update({"labels\\x.npy": {"sha256": "0"}})),
    "symlink_outside": _symlink_outside,
    "schema_2": lambda b: rewrite_manifest(b, lambda m: m.update(schema_version=2)),
    "schema_missing": lambda b: rewrite_manifest(b, lambda m: m.pop("schema_version")),
    "foreign_format": lambda b: rewrite_manifest(b, lambda m: m.update(format="something-else")),
    "no_manifest": lambda b: (b / "manifest.json").unlink(),
    "no_files": lambda b: rewrite_manifest(b, lambda m: m.update(files={})),
    "no_sha256": lambda b: rewrite_manifest(b, lambda m: m["files"]["prompts.txt"].pop("sha256")),
    "graph_not_listed": _drop_graph_files,
    "no_image_graph": lambda b: rewrite_manifest(b, lambda m: [m["graphs"].pop(g) for g in ("image_encoder", "image_encoder_fp16")]),
    "graph_without_file": lambda b: rewrite_manifest(b, lambda m: m["graphs"]["label_encoder"].pop("file")),
    "channels_bgr": lambda b: rewrite_manifest(b, lambda m: m["preprocess"].update(channels="BGR")),
    "preprocess_no_size": lambda b: rewrite_manifest(b, lambda m: m["preprocess"].pop("size")),
    "resize_mode_unknown": lambda b: rewrite_manifest(b, lambda m: m["preprocess"].update(resize_mode="pad")),
    "no_model_section": lambda b: rewrite_manifest(b, lambda m: m.pop("model")),
    "bank_float64": lambda b: _bank(b, np.zeros((5, 32), np.float64)),
    "bank_1d": lambda b: _bank(b, np.zeros(5, np.float32)),
    "bank_pickle": lambda b: _bank(b, np.array([{"a": 1}] * 5, dtype=object)),
    "bank_more_names": lambda b: _bank(b, np.zeros((5, 32), np.float32), names=b"a\nb\nc\nd\ne\nf\n"),
    "bank_names_not_utf8": lambda b: _bank(b, np.zeros((5, 32), np.float32), names=b"a\nb\nc\xff\nd\ne\n"),
    "bank_shape_in_manifest": lambda b: _bank(b, np.zeros((5, 32), np.float32), shape=[5, 31]),
    "bank_dim_vs_model": lambda b: rewrite_manifest(b, lambda m: m["model"].update(embed_dim=16)),
    "bank_without_names_file": lambda b: rewrite_manifest(b, lambda m: m["label_banks"]["default"].pop("names_file")),
    "default_bank_unknown": lambda b: rewrite_manifest(b, lambda m: m.update(default_bank="nope")),
}


__all__ = ["ASAN_BUILD", "BUILD", "CPP", "ROOT", "TAMPERING", "compare_records", "cpp_env", "flip_byte", "resign", "write", "exif_orientation", "make_broken_images", "make_odd_images",
           "npy_load", "ort_library", "raw_gif", "raw_png", "run_qks_infer", "run_tool", "skip_reason"]
