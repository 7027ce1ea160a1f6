"""Real images for verification: a folder's images through the backbone's own preprocessing."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ExportError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(folder: str | Path, limit: int) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"calibration images: {folder} is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"calibration images: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files[:limit]


def transform(preprocess):
    """torchvision transform equal to the backbone's `Preprocess` (what training uses)."""
    from torchvision import transforms as T

    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    if preprocess.interpolation not in interp:
        raise ExportError(f"unsupported interpolation {preprocess.interpolation!r} in the backbone's preprocessing")
    size = preprocess.size
    if preprocess.resize_mode == "squash":
        resize = [T.Resize((size, size), interpolation=interp[preprocess.interpolation])]
    elif preprocess.resize_mode == "shortest":
        resize = [T.Resize(size, interpolation=interp[preprocess.interpolation]), T.CenterCrop(size)]
    else:
        raise ExportError(f"unsupported resize mode {preprocess.resize_mode!r} in the backbone's preprocessing")
    return T.Compose([*resize, T.ToTensor(), T.Normalize(preprocess.mean, preprocess.std)])


def load_images(folder: str | Path, preprocess, limit: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Up to `limit` images (sorted by path) -> pixels [N, 3, S, S] float32, and their file names.
    Unreadable files are an error: a calibration folder is meant to be clean."""
    from PIL import Image

    tf = transform(preprocess)
    pixels, names = [], []
    for path in image_files(folder, limit):
        try:
            with Image.open(path) as im:
                pixels.append(tf(im.convert("RGB")))
        except Exception as e:
            raise ExportError(f"calibration images: cannot read {path}: {e}") from e
        names.append(path.name)
    return torch.stack(pixels), names
