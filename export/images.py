"""Real images for verification: a folder's images, decoded and preprocessed as in training."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ExportError, one_line

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
    """The training code's evaluation transform (what the model saw at validation time)."""
    from qks.transforms import eval_transform

    try:
        return eval_transform(preprocess)
    except ValueError as e:
        raise ExportError(f"the backbone's preprocessing is not supported: {e}") from None


def load_images(folder: str | Path, preprocess, limit: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Up to `limit` images (sorted by path) -> pixels [N, 3, S, S] float32, and their file names.
    Decoded as training and the runtime decode (`qks.images.open_rgb`: EXIF orientation, RGB).
    Unreadable files are an error: a calibration folder is meant to be clean."""
    from qks.images import open_rgb

    tf = transform(preprocess)
    pixels, names = [], []
    for path in image_files(folder, limit):
        try:
            pixels.append(tf(open_rgb(path)))
        except Exception as e:
            raise ExportError(f"calibration images: cannot read {path}: {one_line(e)}") from e
        names.append(path.name)
    return torch.stack(pixels), names
