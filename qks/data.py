"""Datasets: a JSONL manifest of images and their labels, plus `seen.txt` / `unseen.txt`.

Manifest format: one JSON object a line (blank lines are skipped):

    {"image": "images/0001.jpg", "labels": ["dog", "grass"], "negatives": ["cat"],
     "unknown": ["leash"], "unlisted": "negative"}

- `image` (required): a path. A relative path is resolved against the manifest's own folder and
  must stay inside it (`../` that climbs out is refused); an absolute path is used as written.
- `labels`: the positives (+1). `negatives`: verified absent (-1). `unknown`: not annotated (0).
  Each is an optional list of label names; a label may appear in only one of them.
- `unlisted`: what every label of the label lists that the line does not mention is:
  `"negative"` (the default: a fully annotated image, as in NUS-WIDE and most multi-label sets) or
  `"unknown"` (a partially annotated image, as in Open Images, where only verified labels count).
- Any other key is kept out of the targets and ignored (ids, sources, ...).

Label lists: one label a line, blank lines skipped; `seen.txt` are the labels trained on,
`unseen.txt` those held out for zero-shot evaluation; no label in both, none twice.

`read_manifest` validates everything before a run starts: invalid JSON, a missing `image`, labels
that are in neither list, a label both positive and negative, a path outside the manifest's folder,
a missing or unreadable image, a duplicate image, an empty manifest. Each problem is one line,
`<manifest>:<line>: <what>`; by default the first problems stop the run, and with `skip_bad` the bad
lines are dropped and counted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import ImageTooLarge, check_pixels, open_rgb
from .manifest_lines import UNLISTED, Sample  # noqa: F401 - part of this module's API
from .manifest_lines import parse_line as _parse_line

MAX_REPORTED = 10  # problems listed in one error before "... and N more"


class ManifestError(Exception):
    """A manifest or label list that cannot be used; every line of the message is one problem."""


@dataclass
class Manifest:
    path: Path
    samples: list[Sample]
    skipped: list[str] = field(default_factory=list)  # one message per bad line dropped by skip_bad

    def targets(self, labels: Sequence[str]) -> np.ndarray:
        """[images, labels] int8 targets."""
        index = {name: j for j, name in enumerate(labels)}
        if not self.samples:
            return np.zeros((0, len(labels)), dtype=np.int8)
        return np.stack([s.targets(index) for s in self.samples])


def read_label_list(path: str | Path, what: str = "label list") -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{what} not found: {path}")
    try:
        # a BOM (what Windows editors write) is not part of the first label
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read {what} ({e})") from None
    labels, first = [], {}
    for i, raw in enumerate(lines, 1):
        name = raw.strip()
        if not name:
            continue
        if name in first:
            raise ManifestError(f"{path}:{i}: label {name!r} already listed on line {first[name]}")
        first[name] = i
        labels.append(name)
    if not labels:
        raise ManifestError(f"{path}: {what} is empty")
    return labels


def read_label_lists(seen: str | Path, unseen: str | Path | None) -> tuple[list[str], list[str]]:
    seen_labels = read_label_list(seen, "seen label list")
    unseen_labels = read_label_list(unseen, "unseen label list") if unseen else []
    both = sorted(set(seen_labels) & set(unseen_labels))
    if both:
        raise ManifestError(f"{len(both)} label(s) are in both {seen} and {unseen}, e.g. {both[0]!r}")
    return seen_labels, unseen_labels


def _image_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return f"image not found: {path}"
    try:
        with Image.open(path) as im:  # reads the header only: cheap, catches non-images
            check_pixels(im)
    except ImageTooLarge as e:
        return f"{e}: {path}"
    except Image.DecompressionBombError:
        return f"image too large (over twice PIL.Image.MAX_IMAGE_PIXELS): {path}"
    except Exception as e:  # PIL raises several types for broken files
        return f"image unreadable: {path} ({type(e).__name__})"
    return None


def read_manifest(path: str | Path, labels: Sequence[str] | None = None, skip_bad: bool = False,
                  check_images: bool = True, workers: int = 8, progress: bool = False) -> Manifest:
    """Parse and validate a manifest. `labels`: the seen + unseen names every listed label must be in."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first line
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read manifest ({e})") from None
    root = os.path.normpath(os.path.abspath(path.parent))
    known = set(labels) if labels is not None else None
    problems: list[tuple[int, str]] = []
    samples: list[Sample] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            s = _parse_line(line, root, known, lineno)
        except ValueError as e:
            problems.append((lineno, str(e)))
            continue
        if s.path in first_line:
            problems.append((lineno, f"duplicate image {s.image!r} (first on line {first_line[s.path]})"))
            continue
        first_line[s.path] = lineno
        samples.append(s)
    if check_images and samples:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            found = pool.map(_image_problem, [s.path for s in samples])
            if progress:
                from tqdm import tqdm

                found = tqdm(found, total=len(samples), desc="checking images", unit="img", leave=False)
            found = list(found)
        bad = {s.line for s, p in zip(samples, found, strict=True) if p}
        problems += [(s.line, p) for s, p in zip(samples, found, strict=True) if p]
        samples = [s for s in samples if s.line not in bad]
    problems.sort()
    messages = [f"{path}:{n}: {msg}" for n, msg in problems]
    if messages and not skip_bad:
        shown = messages[:MAX_REPORTED]
        more = len(messages) - len(shown)
        tail = f"\n... and {more} more" if more else ""
        raise ManifestError("\n".join(shown) + tail +
                            f"\n{len(messages)} bad line(s) in {path}: fix them, or pass --skip-bad to drop them")
    if not samples:
        raise ManifestError(f"{path}: the manifest has no usable images" +
                            (f" ({len(messages)} bad line(s) skipped)" if messages else ""))
    return Manifest(path=path, samples=samples, skipped=messages)


def load_rgb(path: str) -> Image.Image:
    """The image as the runtime sees it: EXIF orientation honoured, any mode to RGB (qks.images)."""
    try:
        return open_rgb(path)
    except Exception as e:
        raise OSError(f"cannot read image {path}: {e}") from None


class ManifestDataset(torch.utils.data.Dataset):
    """(pixels [3, H, W] float, targets [L] int8 in {+1, -1, 0}) over `labels`, in manifest order."""

    def __init__(self, samples: Sequence[Sample], labels: Sequence[str], transform):
        self.samples = list(samples)
        self.labels = list(labels)
        self.index = {name: j for j, name in enumerate(self.labels)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[i]
        return self.transform(load_rgb(s.path)), torch.from_numpy(s.targets(self.index))
