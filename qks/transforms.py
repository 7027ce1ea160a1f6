"""Image transforms built from a backbone's `Preprocess`.

`eval_transform` is exactly open_clip's own inference preprocessing for the backbone (resize the
shortest side with the backbone's interpolation, centre crop, to tensor, normalise), and a test
proves it. `train_transform` adds the paper's augmentation (as in the QKS reference code): Cutout
(a box of half the image's side, random colour), horizontal flip and RandAugment, between the crop
and the tensor conversion. All randomness comes from torch's generator, so a seeded epoch is
reproducible and a resumed run sees the same augmentations. The geometry is `qks.images.resize_crop`,
shared with the runtime: an extreme strip (1 x 100,000) is not resized whole on the way to the crop.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T

from .backbones.base import Preprocess
from .images import RESAMPLE, resize_crop


class ResizeCrop:
    """torchvision's Resize + CenterCrop ("shortest") or Resize((size, size)) ("squash"), pixel for
    pixel, through `qks.images.resize_crop` (the runtime's geometry too): an extreme strip is never
    resized whole, only the crop's region is resampled."""

    def __init__(self, pp: Preprocess):
        if pp.interpolation not in RESAMPLE:
            raise ValueError(f"unsupported interpolation {pp.interpolation!r} (bicubic or bilinear)")
        if pp.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"unsupported resize mode {pp.resize_mode!r} (shortest or squash)")
        self.size, self.resize_mode, self.interpolation = int(pp.size), pp.resize_mode, pp.interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        return resize_crop(img, self.size, self.resize_mode, self.interpolation)

    def __repr__(self) -> str:
        return f"ResizeCrop(size={self.size}, mode={self.resize_mode}, interpolation={self.interpolation})"


def _geometry(pp: Preprocess) -> list:
    return [ResizeCrop(pp)]


def _to_tensor(pp: Preprocess) -> list:
    return [T.ToTensor(), T.Normalize(mean=pp.mean, std=pp.std)]


class Cutout:
    """Paint one box of `factor` x the image's side, centred anywhere in the image (clipped at the
    border), in a random colour. PIL in, PIL out; randomness from torch."""

    def __init__(self, factor: float = 0.5):
        self.factor = factor

    def __call__(self, img: Image.Image) -> Image.Image:
        img = img.copy()
        w, h = img.size
        bw, bh = int(self.factor * w + 0.5), int(self.factor * h + 0.5)
        r = torch.rand(2)
        cx, cy = int(r[0] * w), int(r[1] * h)
        x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, w)
        y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, h)
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,)))
        ImageDraw.Draw(img).rectangle([x0, y0, x1, y1], fill=colour)
        return img

    def __repr__(self) -> str:
        return f"Cutout(factor={self.factor})"


def eval_transform(pp: Preprocess) -> T.Compose:
    """RGB PIL image -> normalised [3, size, size] float tensor, as open_clip preprocesses it."""
    return T.Compose(_geometry(pp) + _to_tensor(pp))


def train_transform(pp: Preprocess) -> T.Compose:
    """The eval geometry, then Cutout(0.5), horizontal flip and RandAugment, then to tensor."""
    return T.Compose(_geometry(pp) + [Cutout(0.5), T.RandomHorizontalFlip(), T.RandAugment()] + _to_tensor(pp))
