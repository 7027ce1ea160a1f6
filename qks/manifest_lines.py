"""One line of a labelled JSONL manifest (the format qks/data.py documents), torch-free: qks-train's
loader (qks/data.py) and qks-calibrate (qks.runtime.calibrate) parse lines with it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

UNLISTED = ("negative", "unknown")


@dataclass(frozen=True)
class Sample:
    image: str  # as written in the manifest line (what predictions report)
    path: str  # resolved file path
    line: int  # 1-based line in the manifest
    positives: tuple[str, ...] = ()
    negatives: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    unlisted: str = "negative"

    def targets(self, index: dict[str, int]) -> np.ndarray:
        """[len(index)] int8 in {+1, -1, 0} over the labels of `index`; labels outside it are dropped."""
        t = np.full(len(index), -1 if self.unlisted == "negative" else 0, dtype=np.int8)
        for names, value in ((self.negatives, -1), (self.unknown, 0), (self.positives, 1)):
            for name in names:
                j = index.get(name)
                if j is not None:
                    t[j] = value
        return t


def name_list(obj: dict, key: str) -> tuple[str, ...]:
    v = obj.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{key!r} must be a list of label names")
    return tuple(v)


def parse_line(text: str, root: str, known: set[str] | None, lineno: int) -> Sample:
    """One manifest line -> Sample; ValueError with a one-line reason for a bad line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object")
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ValueError("missing \"image\" (a path string)")
    pos, neg, unk = name_list(obj, "labels"), name_list(obj, "negatives"), name_list(obj, "unknown")
    unlisted = obj.get("unlisted", "negative")
    if unlisted not in UNLISTED:
        raise ValueError(f"\"unlisted\" must be \"negative\" or \"unknown\", not {unlisted!r}")
    if known is not None:
        for name in pos + neg + unk:
            if name not in known:
                raise ValueError(f"label {name!r} is in neither the seen nor the unseen list")
    clash = (set(pos) & set(neg)) or (set(pos) & set(unk)) or (set(neg) & set(unk))
    if clash:
        raise ValueError(f"label {sorted(clash)[0]!r} is listed twice (labels/negatives/unknown)")
    if os.path.isabs(image):
        path = os.path.normpath(image)
    else:
        # Lexical check, so that a symlinked image folder inside the root is still accepted.
        path = os.path.normpath(os.path.join(root, image))
        if os.path.commonpath([root, path]) != root:
            raise ValueError(f"image {image!r} points outside the manifest's folder {root}")
    return Sample(image=image, path=path, line=lineno, positives=pos, negatives=neg, unknown=unk,
                  unlisted=unlisted)
