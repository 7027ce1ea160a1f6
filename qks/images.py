"""Image decoding to RGB, shared by the training loader and the runtime (torch-free: the runtime
imports it, so it must never import torch).

EXIF orientation is applied first (`ImageOps.exif_transpose`), then the image becomes RGB:
- RGB, L, 1, P, CMYK, YCbCr, LAB, HSV: Pillow's `convert("RGB")`.
- Alpha (RGBA, LA, PA, P with transparency): dropped like `convert("RGB")` by default;
  `background=(r, g, b)` composites over that colour instead.
- High bit depth, where Pillow's convert clips to 255 and turns most images white: I;16* is scaled
  by 255/65535; I is taken as 8-bit when all values are in 0..255, else as 16-bit (clipped to
  0..65535, scaled); F is scaled by 255 when all values are in [0, 1], else clipped to 0..255
  (NaN -> 0).

`resize_crop` is the geometry both use: torchvision's Resize + CenterCrop on a PIL image, without
ever building a huge intermediate.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = a.astype(np.float64) * (255.0 / 65535.0)
    elif img.mode == "I":
        a = a.astype(np.float64)
        out = a if (a.size == 0 or (a.min() >= 0 and a.max() <= 255)) else np.clip(a, 0, 65535) * (255.0 / 65535.0)
    else:  # "F"
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        out = a * 255.0 if (a.size == 0 or (a.min() >= 0 and a.max() <= 1.0)) else a
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Any Pillow mode -> RGB, by the rules in the module docstring."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _high_depth_to_l(img).convert("RGB")
    has_alpha = img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)
    if background is not None and has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


class ImageTooLarge(ValueError):
    """More pixels than `PIL.Image.MAX_IMAGE_PIXELS`: refused from the header, before decoding."""


def check_pixels(img: Image.Image) -> None:
    """Refuse an opened (not yet decoded) image above Pillow's decompression-bomb limit. Pillow
    itself raises only above twice the limit and merely warns in between."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit and w * h > limit:
        raise ImageTooLarge(f"image too large: {w} x {h} pixels (limit {limit}: PIL.Image.MAX_IMAGE_PIXELS)")


def open_rgb(path) -> Image.Image:
    """Decode a file to an RGB image with EXIF orientation applied (errors propagate; ImageTooLarge
    above the pixel limit)."""
    with Image.open(path) as img:
        check_pixels(img)
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# Above this many pixels, the intermediate of "resize the shortest side, then crop" is not built:
# only the crop's region of the source is resampled (Pillow's `box`). A 1 x 100,000 strip would
# otherwise become a 224 x 22,400,000 image (15 GB) on the way to 224 x 224. Ordinary photos never
# get near it, so they keep exact parity with torchvision; past it, results differ from the
# full-size path by a few uint8 levels.
MAX_INTERMEDIATE_PIXELS = 1 << 24


def resize_crop(img: Image.Image, size: int, resize_mode: str = "shortest",
                interpolation: str = "bicubic") -> Image.Image:
    """torchvision's Resize(size) + CenterCrop(size) ("shortest") or Resize((size, size)) ("squash")
    on a PIL image, pixel for pixel, except past MAX_INTERMEDIATE_PIXELS (see above)."""
    resample = RESAMPLE[interpolation]
    w, h = img.size
    if resize_mode == "squash":
        return img if (w, h) == (size, size) else img.resize((size, size), resample)
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    if new_w * new_h > MAX_INTERMEDIATE_PIXELS:
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return img.resize((size, size), resample, box=box)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    return img.crop((left, top, left + size, top + size))
