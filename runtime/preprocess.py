"""Image preprocessing with Pillow and numpy, identical to the backbone's training/eval transform.

The geometry is torchvision's on PIL images (which is what open_clip and `qks.transforms` use):
"shortest" resizes the shortest side to `size` (the long side to `int(size * long / short)`) with
PIL's resampling filter, then centre-crops with `top = int(round((h - size) / 2.0))`; "squash"
resizes both sides to `size`. Then uint8 / 255 (float32) and (x - mean) / std, CHW float32. Same
operations in the same order and precision, so the result equals open_clip's to ~1e-7 (a test
measures it on real photos).

Colour: `qks.images.to_rgb` (torch-free, shared with the training loader): EXIF orientation
first, then RGB by the rules documented there.

HEIC/HEIF decode through pillow-heif, whose opener is registered with Pillow at the first `load`
(once per process); AVIF through Pillow itself (11.3 and later, built with libavif). libheif
applies a HEIF's rotation and mirroring at decode and pillow-heif then drops the EXIF orientation,
so `exif_transpose` never turns such an image twice. Without the plugin, such a file is an error
naming its format and the fix (`pip install 'qks[library]'`), found from its `ftyp` brands.
"""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from qks.images import RESAMPLE, ImageTooLarge, check_pixels, resize_crop, to_rgb


class PreprocessError(ValueError):
    """An image that cannot be preprocessed; the message is short enough for an error record."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the image encoder's input (mirrors qks.backbones.base.Preprocess)."""

    size: int
    resize_mode: str = "shortest"  # "shortest" | "squash"
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    background: tuple[int, int, int] | None = None  # None: drop alpha (training parity); else composite

    def __post_init__(self):
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"unsupported resize mode {self.resize_mode!r} (shortest or squash)")
        if self.interpolation not in RESAMPLE:
            raise ValueError(f"unsupported interpolation {self.interpolation!r} (bicubic or bilinear)")
        if int(self.size) <= 0:
            raise ValueError(f"image size must be positive, got {self.size}")

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(size=int(d["size"]), resize_mode=d.get("resize_mode", "shortest"),
                   interpolation=d.get("interpolation", "bicubic"),
                   mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]))

    # -- steps -------------------------------------------------------------------------------------

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """torchvision's Resize(size) + CenterCrop(size) (or Resize((size, size))) on a PIL image."""
        return resize_crop(img, self.size, self.resize_mode, self.interpolation)

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 HWC -> float32 CHW, / 255 then (x - mean) / std, in float32 like torchvision."""
        x = rgb.astype(np.float32).transpose(2, 0, 1) / np.float32(255)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    def __call__(self, img: Image.Image) -> np.ndarray:
        """A PIL image (any mode, EXIF orientation honoured) -> float32 [3, size, size]."""
        img = to_rgb(ImageOps.exif_transpose(img), self.background)
        return self.normalize(np.asarray(self.resize_crop(img), dtype=np.uint8))

    def load(self, path) -> np.ndarray:
        """Decode a file and preprocess it; PreprocessError with a short reason if it cannot.

        Images of more than `PIL.Image.MAX_IMAGE_PIXELS` pixels are refused from their header,
        before any pixel is decoded (Pillow itself only warns up to twice that limit)."""
        register_plugins()
        try:
            with Image.open(path) as img:
                check_pixels(img)
                img.load()
                return self(img)
        except PreprocessError:
            raise
        except ImageTooLarge as e:
            raise PreprocessError(str(e)) from None
        except Image.DecompressionBombError:
            raise PreprocessError("image too large (decompression bomb limit)") from None
        except FileNotFoundError:
            raise PreprocessError("file not found (broken link?)") from None
        except IsADirectoryError:
            raise PreprocessError("is a directory") from None
        except PermissionError:
            raise PreprocessError("permission denied") from None
        except Image.UnidentifiedImageError:
            if _size(path) == 0:
                raise PreprocessError("empty file (0 bytes)") from None
            heif = _heif_reason(path)
            if heif:
                raise PreprocessError(heif) from None
            raise PreprocessError("not a readable image (unidentified format)") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise PreprocessError("symbolic link loop") from None
            if e.errno is not None and e.strerror:  # an OS error: its text, not the path it names
                raise PreprocessError(f"cannot read file: {e.strerror}") from None
            raise PreprocessError(f"cannot decode image: {_first_line(e)}") from None
        except (ValueError, SyntaxError, EOFError, RuntimeError) as e:  # truncated/corrupt data (libheif and
            if "Security limit exceeded" in str(e):  # libavif raise RuntimeError), or libheif's size limit
                raise PreprocessError("image too large (decoder security limit)") from None
            raise PreprocessError(f"cannot decode image: {_first_line(e)}") from None


# -- HEIC/HEIF and AVIF ------------------------------------------------------------------------------

HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1",
                         b"mif2", b"msf1"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})


@functools.cache
def register_plugins() -> None:
    """Register pillow-heif's HEIF opener with Pillow, once per process (a no-op without pillow-heif;
    registering twice, should two threads race here, is harmless)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()


def isobmff_format(head: bytes) -> str | None:
    """"AVIF", "HEIC" or None, from the `ftyp` box at the start of a file (major + compatible brands)."""
    if len(head) < 16 or head[4:8] != b"ftyp":
        return None
    end = min(len(head), int.from_bytes(head[:4], "big"))
    brands = {head[i:i + 4] for i in (8, *range(16, end - 3, 4)) if i + 4 <= end}  # 12..16: minor version
    if brands & AVIF_BRANDS:
        return "AVIF"
    return "HEIC" if brands & HEIF_BRANDS else None


def _heif_reason(source) -> str | None:
    """Why Pillow could not identify a HEIC/AVIF file (a missing plugin, or damage), None for others."""
    fmt = isobmff_format(_head(source))
    if fmt == "HEIC" and "HEIF" not in Image.OPEN:
        return "HEIC image: HEIC/HEIF decoding needs pillow-heif (pip install 'qks[library]')"
    if fmt == "AVIF":
        from PIL import features

        if not features.check("avif"):
            return "AVIF image: AVIF decoding needs Pillow >= 11.3 built with AVIF (pip install 'qks[library]')"
    return f"cannot decode image: a damaged or unsupported {fmt} file" if fmt else None


def _head(source, n: int = 64) -> bytes:
    try:
        if hasattr(source, "read"):
            source.seek(0)
            return source.read(n)
        with open(source, "rb") as f:
            return f.read(n)
    except (OSError, ValueError, TypeError):
        return b""


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


def _size(path) -> int | None:
    try:
        return os.stat(path).st_size
    except (OSError, TypeError, ValueError):
        return None
