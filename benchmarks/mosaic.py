"""Multi-label mosaics of real items: a real-image open-vocabulary benchmark that works offline.

Each image is a grid (2x2 by default) with a fixed number of filled cells; every filled cell holds
one real 28x28 item of a distinct class, drawn from
- Fashion-MNIST (Debian package `dataset-fashion-mnist`, IDX files under
  /usr/share/datasets/fashion-mnist; Zalando Research, MIT): t-shirt, trouser, pullover, dress,
  coat, sandal, shirt, sneaker, bag, ankle boot;
- Animal-MNIST (PyPI package `animal-mnist`, installed with --no-deps; MIT): bear, bird, cat, cow,
  dog, elephant, giraffe, horse, sheep, zebra (silhouettes).
An image's labels are the set of its items' classes; every other label is absent (a fully
annotated set: the manifest's `unlisted` rule is "negative", the default of qks.data). Items are
drawn dark on white by default (`background`), the look of the product photos Fashion-MNIST was
made from and of silhouettes: the ImageNet-trained lite backbone scores them better so (zero-shot
GZSL mAP 34.9 against 30.1 on light-on-black, the same ZSL mAP; benchmarks/lite_zero_shot.py).

Split: the classes are split into seen and unseen; training mosaics contain seen classes only,
from the training items; test mosaics use held-out items (Fashion-MNIST's own test set, every
fifth Animal-MNIST item) and hold exactly `test_unseen` unseen items each (1 by default), the
other cells seen items. Both traps measured on such mosaics are closed by construction:
- the number of filled cells is fixed, and so is the number of unseen items per test image, so
  neither how many cells are filled nor how many seen items an image holds tells anything about
  whether (or which) unseen item is present: ZSL mAP cannot be raised by counting;
- with one unseen item per image, ZSL F1@1 (is the top unseen label the right one?) is the
  discriminating number; its chance level is 1 / (unseen classes), and chance mAP is computed on
  the same images by benchmarks/lite_zero_shot.py.
(`test_unseen=-1` draws test items from all classes instead: realistic counts, trap included.)

Output (under `out_dir`, never inside the repository):
    images/train/000000.png ...   RGB PNG, `size` x `size`
    images/test/000000.png ...
    train.jsonl, test.jsonl       {"image": "images/train/000000.png", "labels": [...], "cells": [...]}
    seen.txt, unseen.txt, labels.txt (seen then unseen), mosaic.json (the configuration and counts)
`cells` lists each cell's class (null when empty), row by row; qks.data ignores the key.

The Animal-MNIST files are gzipped pickles of numpy arrays. They are read with an unpickler that
can reconstruct numpy arrays and nothing else, after their sha256 is checked against the values
recorded below; never with a plain `pickle.load`.

CLI: `python -m benchmarks.mosaic /tmp/mosaic --grid 2 --items 4 --train 2000 --test 1000 --seed 0`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
# sha256 of the Debian package's files (dataset-fashion-mnist 0.0~git20200523.55506a9-1).
FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
# Animal-MNIST's label order (checked by eye against the images: 1,000 items per class, in order).
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
# sha256 of the gzipped pickles in animal-mnist 0.4.
ANIMAL_SHA256 = {
    "animal_data_version_3.gz": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "animal_label_version_3.gz": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}
ANIMAL_TEST_EVERY = 5  # every fifth Animal-MNIST item is a test item (it has no split of its own)
SOURCES = ("fashion", "animal")

FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
ANIMAL_INSTALL = "pip install --no-deps animal-mnist"


class DatasetUnavailable(RuntimeError):
    """A source dataset is not installed; the message says how to install it."""


class IntegrityError(ValueError):
    """A data file whose sha256 is not the recorded one."""



def read_verified(path: str | Path, expected_sha256: str) -> bytes:
    """The file's bytes, after checking their sha256 (IntegrityError on a mismatch)."""
    data = Path(path).read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != expected_sha256:
        raise IntegrityError(f"{path}: sha256 {got} is not the recorded {expected_sha256}; refusing to read it")
    return data


# --- restricted unpickling -------------------------------------------------------------------


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: `find_class` resolves only the globals that an
    array pickle references (the array reconstructor, `ndarray`, `dtype`); any other global (such
    as `os.system` or `builtins.eval`) raises `pickle.UnpicklingError` before anything runs."""

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def load_numpy_pickle(data: bytes) -> np.ndarray:
    """A numpy array from pickle bytes, through `NumpyArrayUnpickler`; anything else is refused."""
    obj = NumpyArrayUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, np.ndarray):
        raise pickle.UnpicklingError(f"expected a numpy array, got {type(obj).__name__}")
    return obj


def load_verified_gzip_pickle(path: str | Path, expected_sha256: str) -> np.ndarray:
    return load_numpy_pickle(gzip.decompress(read_verified(path, expected_sha256)))


# --- sources ---------------------------------------------------------------------------------


@dataclass
class ItemSet:
    """Items of one source: images uint8 [N, 28, 28] and class indices [N], per split."""

    name: str
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _read_idx(data: bytes) -> np.ndarray:
    """An IDX file (MNIST format) of unsigned bytes."""
    magic = struct.unpack(">I", data[:4])[0]
    if magic >> 8 != 0x08:  # 0x08: unsigned byte
        raise ValueError(f"not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"IDX file holds {arr.size} bytes for shape {dims}")
    return arr.reshape(dims)


def load_fashion_mnist(root: str | Path = FASHION_DIR) -> ItemSet:
    root = Path(root)
    missing = [n for n in FASHION_SHA256 if not (root / n).is_file()]
    if missing:
        raise DatasetUnavailable(f"Fashion-MNIST not found under {root} (missing {missing[0]}): {FASHION_INSTALL}")

    def idx(name: str) -> np.ndarray:
        return _read_idx(gzip.decompress(read_verified(root / name, FASHION_SHA256[name])))

    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = idx(f"{prefix}-images-idx3-ubyte.gz"), idx(f"{prefix}-labels-idx1-ubyte.gz")
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST {split}: unexpected shapes {images.shape}, {labels.shape}")
        out[split] = (images, labels.astype(np.int64))
    return ItemSet("fashion", list(FASHION_CLASSES), *out["train"], *out["test"])


def animal_mnist_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(f"Animal-MNIST is not installed: {ANIMAL_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"


def load_animal_mnist(root: str | Path | None = None) -> ItemSet:
    root = Path(root) if root is not None else animal_mnist_dir()
    missing = [n for n in ANIMAL_SHA256 if not (root / n).is_file()]
    if missing:
        raise DatasetUnavailable(f"Animal-MNIST data not found under {root} (missing {missing[0]}): {ANIMAL_INSTALL}")
    images = load_verified_gzip_pickle(root / "animal_data_version_3.gz", ANIMAL_SHA256["animal_data_version_3.gz"])
    labels = load_verified_gzip_pickle(root / "animal_label_version_3.gz", ANIMAL_SHA256["animal_label_version_3.gz"])
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8 or labels.shape != (len(images),):
        raise ValueError(f"Animal-MNIST: unexpected arrays {images.shape} {images.dtype}, {labels.shape}")
    labels = labels.astype(np.int64)
    test = np.arange(len(images)) % ANIMAL_TEST_EVERY == 0
    return ItemSet("animal", list(ANIMAL_CLASSES), images[~test], labels[~test], images[test], labels[test])


def load_sources(sources: tuple[str, ...] | list[str]) -> list[ItemSet]:
    loaders = {"fashion": load_fashion_mnist, "animal": load_animal_mnist}
    bad = [s for s in sources if s not in loaders]
    if bad or not sources:
        raise ValueError(f"unknown source(s) {bad}: choose from {', '.join(SOURCES)}")
    return [loaders[s]() for s in sources]


# --- mosaics ---------------------------------------------------------------------------------


@dataclass
class MosaicConfig:
    grid: int = 2  # the mosaic is grid x grid cells
    items: int = 4  # filled cells per image, fixed (a varying count would predict unseen presence)
    sources: list[str] = field(default_factory=lambda: list(SOURCES))  # "fashion", "animal"
    unseen: list[str] | None = None  # unseen class names; None = `num_unseen` drawn with the seed
    num_unseen: int = 6  # unseen classes when `unseen` is None, spread evenly over the sources
    train_images: int = 2000
    test_images: int = 1000
    test_unseen: int = 1  # unseen items in every test image (-1: any mix, drawn from all classes)
    size: int = 224  # output side in pixels
    background: str = "white"  # "white": dark items on white, as the photos Fashion-MNIST was made from; "black"
    seed: int = 0

    def validate(self, n_classes: int) -> None:
        if self.grid < 1 or not 1 <= self.items <= self.grid * self.grid:
            raise ValueError(f"items must be in [1, grid^2 = {self.grid * self.grid}], got {self.items}")
        if self.size < 28 * self.grid // 4 or self.train_images < 0 or self.test_images < 0:
            raise ValueError("size and image counts must be positive")
        if self.background not in ("white", "black"):
            raise ValueError(f"background must be white or black, got {self.background!r}")
        if self.test_unseen != -1 and not 1 <= self.test_unseen <= self.items:
            raise ValueError(f"test_unseen must be -1 or in [1, items], got {self.test_unseen}")


def split_classes(items: list[ItemSet], config: MosaicConfig) -> tuple[list[str], list[str]]:
    """(seen, unseen) class names. Unseen: as given, or drawn with the seed, evenly over sources."""
    names = [c for s in items for c in s.classes]
    if len(set(names)) != len(names):
        raise ValueError("class names clash between sources")
    if config.unseen is not None:
        unknown = [u for u in config.unseen if u not in names]
        if unknown:
            raise ValueError(f"unseen class {unknown[0]!r} is not a class of {', '.join(config.sources)}")
        unseen = [c for c in names if c in set(config.unseen)]
    else:
        rng = np.random.default_rng([config.seed, 1])
        per = [config.num_unseen // len(items) + (i < config.num_unseen % len(items)) for i in range(len(items))]
        unseen = []
        for s, k in zip(items, per, strict=True):
            if not 0 <= k <= len(s.classes):
                raise ValueError(f"cannot hold out {k} of {s.name}'s {len(s.classes)} classes")
            pick = set(rng.choice(len(s.classes), size=k, replace=False).tolist())
            unseen += [c for i, c in enumerate(s.classes) if i in pick]
    seen = [c for c in names if c not in set(unseen)]
    if not seen or not unseen:
        raise ValueError("the split needs at least one seen and one unseen class")
    return seen, unseen


def _compose_cells(rng: np.random.Generator, config: MosaicConfig, seen: list[str], unseen: list[str],
                   split: str) -> list[str | None]:
    """The class of every cell (None: empty), row by row."""
    k = config.items
    if split == "train":
        if k > len(seen):
            raise ValueError(f"{k} items per image need at least {k} seen classes, there are {len(seen)}")
        classes = [seen[i] for i in rng.choice(len(seen), size=k, replace=False)]
    elif config.test_unseen == -1:
        pool = seen + unseen
        classes = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
    else:
        u = config.test_unseen
        if u > len(unseen) or k - u > len(seen):
            raise ValueError(f"test images need {u} unseen and {k - u} seen classes: not enough classes")
        classes = [unseen[i] for i in rng.choice(len(unseen), size=u, replace=False)]
        classes += [seen[i] for i in rng.choice(len(seen), size=k - u, replace=False)]
    cells: list[str | None] = [None] * (config.grid * config.grid)
    for pos, c in zip(rng.permutation(len(cells))[:k], rng.permutation(classes), strict=True):
        cells[int(pos)] = str(c)
    return cells


def render(cells: list[np.ndarray | None], grid: int, size: int, background: str = "white"):
    """A PIL RGB image: the 28x28 items on a grid, upscaled (bicubic) to size x size. The sources
    store light items on black; on "white" the grey levels are inverted (dark items on white)."""
    from PIL import Image

    canvas = np.zeros((grid * 28, grid * 28), dtype=np.uint8)
    for i, item in enumerate(cells):
        if item is not None:
            r, c = divmod(i, grid)
            canvas[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] = item
    if background == "white":
        canvas = 255 - canvas
    img = Image.fromarray(canvas, mode="L").resize((size, size), Image.Resampling.BICUBIC)
    return img.convert("RGB")


def generate(out_dir: str | Path, config: MosaicConfig, items: list[ItemSet] | None = None,
             progress: bool = False) -> dict:
    """Write the dataset under `out_dir`; returns the summary also written to mosaic.json."""
    items = items if items is not None else load_sources(config.sources)
    classes = [c for s in items for c in s.classes]
    config.validate(len(classes))
    seen, unseen = split_classes(items, config)
    # Per class: (source images, indices of that class) for each split.
    pools: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"train": {}, "test": {}}
    for s in items:
        for split, imgs, labels in (("train", s.train_images, s.train_labels), ("test", s.test_images, s.test_labels)):
            for ci, name in enumerate(s.classes):
                idx = np.flatnonzero(labels == ci)
                if len(idx) == 0:
                    raise ValueError(f"{s.name} {split} has no item of class {name!r}")
                pools[split][name] = (imgs, idx)

    out = Path(out_dir)
    summary: dict = {"config": asdict(config), "seen": seen, "unseen": unseen, "splits": {}}
    for split, count, stream in (("train", config.train_images, 2), ("test", config.test_images, 3)):
        rng = np.random.default_rng([config.seed, stream])
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        label_counts = dict.fromkeys(seen + unseen, 0)
        for n in range(count):
            cells = _compose_cells(rng, config, seen, unseen, split)
            arrays = []
            for c in cells:
                if c is None:
                    arrays.append(None)
                    continue
                imgs, idx = pools[split][c]
                arrays.append(imgs[idx[rng.integers(len(idx))]])
            rel = f"images/{split}/{n:06d}.png"
            tmp = out / f"{rel}.tmp"
            render(arrays, config.grid, config.size, config.background).save(tmp, format="PNG")
            os.replace(tmp, out / rel)
            labels = sorted({c for c in cells if c is not None}, key=(seen + unseen).index)
            for c in labels:
                label_counts[c] += 1
            lines.append(json.dumps({"image": rel, "labels": labels, "cells": cells}))
            if progress and (n + 1) % 500 == 0:
                print(f"  {split}: {n + 1}/{count}", file=sys.stderr)
        (out / f"{split}.jsonl").write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
        summary["splits"][split] = {"images": count, "label_counts": label_counts}
    (out / "seen.txt").write_text("".join(c + "\n" for c in seen), encoding="utf-8")
    (out / "unseen.txt").write_text("".join(c + "\n" for c in unseen), encoding="utf-8")
    (out / "labels.txt").write_text("".join(c + "\n" for c in seen + unseen), encoding="utf-8")
    (out / "mosaic.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _parser() -> argparse.ArgumentParser:
    d = MosaicConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.mosaic", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="where to write the dataset (outside the repository, e.g. /tmp/mosaic)")
    p.add_argument("--grid", type=int, default=d.grid, help="grid side in cells (default %(default)s)")
    p.add_argument("--items", type=int, default=d.items, help="filled cells per image, fixed (default %(default)s)")
    p.add_argument("--sources", default=",".join(d.sources), help="comma-separated: fashion,animal (default %(default)s)")
    p.add_argument("--unseen", default=None, help="comma-separated unseen class names (default: drawn with the seed)")
    p.add_argument("--num-unseen", type=int, default=d.num_unseen, help="unseen classes to draw (default %(default)s)")
    p.add_argument("--train", type=int, default=d.train_images, help="training images (default %(default)s)")
    p.add_argument("--test", type=int, default=d.test_images, help="test images (default %(default)s)")
    p.add_argument("--test-unseen", type=int, default=d.test_unseen,
                   help="unseen items per test image; -1 = any mix (default %(default)s)")
    p.add_argument("--size", type=int, default=d.size, help="image side in pixels (default %(default)s)")
    p.add_argument("--background", choices=("white", "black"), default=d.background,
                   help="white: dark items on white (default); black: the sources' light items on black")
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def config_from_args(args: argparse.Namespace) -> MosaicConfig:
    return MosaicConfig(
        grid=args.grid, items=args.items, sources=[s.strip() for s in args.sources.split(",") if s.strip()],
        unseen=[u.strip() for u in args.unseen.split(",") if u.strip()] if args.unseen else None,
        num_unseen=args.num_unseen, train_images=args.train, test_images=args.test,
        test_unseen=args.test_unseen, size=args.size, background=args.background, seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = config_from_args(args)
        summary = generate(args.out_dir, config, progress=True)
    except DatasetUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, IntegrityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {summary['splits']['train']['images']} training and {summary['splits']['test']['images']} test "
          f"mosaics to {args.out_dir}")
    print(f"seen ({len(summary['seen'])}): {', '.join(summary['seen'])}")
    print(f"unseen ({len(summary['unseen'])}): {', '.join(summary['unseen'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
