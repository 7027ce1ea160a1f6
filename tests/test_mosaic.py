"""The mosaic benchmark generator: safe loading of its sources, labels, grid, split and seed."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from benchmarks import mosaic  # the repository's folder; pytest's pythonpath puts it on sys.path
from benchmarks.mosaic import (  # noqa: E402
    IntegrityError,
    ItemSet,
    MosaicConfig,
    generate,
    load_numpy_pickle,
    read_verified,
    split_classes,
)


def _have_fashion() -> bool:
    return all((mosaic.FASHION_DIR / n).is_file() for n in mosaic.FASHION_SHA256)


def _have_animal() -> bool:
    try:
        mosaic.animal_mnist_dir()
    except mosaic.DatasetUnavailable:
        return False
    return True


needs_fashion = pytest.mark.skipif(not _have_fashion(), reason=f"Fashion-MNIST not installed: {mosaic.FASHION_INSTALL}")
needs_animal = pytest.mark.skipif(not _have_animal(), reason=f"Animal-MNIST not installed: {mosaic.ANIMAL_INSTALL}")


# --- restricted unpickling -------------------------------------------------------------------


class _Exploit:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_unpickler_refuses_a_pickle_that_would_run_a_command(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(f"touch {marker}"), protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        load_numpy_pickle(payload)
    assert not marker.exists()
    # The same payload hidden inside an otherwise innocent array pickle is refused too.
    nested = pickle.dumps([np.arange(3), _Exploit(f"touch {marker}")], protocol=4)
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(nested)
    assert not marker.exists()


@pytest.mark.parametrize("obj", [eval, getattr, __import__, {"a": 1}, [1, 2]])
def test_unpickler_refuses_anything_but_an_array(obj):
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(pickle.dumps(obj, protocol=4))


@pytest.mark.parametrize("array", [np.arange(12, dtype=np.int64).reshape(3, 4),
                                   np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8),
                                   np.array([1.5, -2.0], dtype=">f4")])
def test_unpickler_reads_numpy_arrays(array):
    data = pickle.dumps(array, protocol=4)
    out = load_numpy_pickle(data)
    reference = pickle.loads(data)  # our own bytes, just made: the plain unpickler is the reference
    assert out.dtype == reference.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_sha256_mismatch_is_refused(tmp_path):
    path = tmp_path / "data.gz"
    path.write_bytes(gzip.compress(pickle.dumps(np.zeros((2, 28, 28), np.uint8), protocol=4)))
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_verified(path, good) == path.read_bytes()
    with pytest.raises(IntegrityError, match="refusing"):
        read_verified(path, "0" * 64)
    # A stand-in Animal-MNIST folder whose files are not the recorded ones is refused before unpickling.
    for name in mosaic.ANIMAL_SHA256:
        (tmp_path / name).write_bytes(path.read_bytes())
    with pytest.raises(IntegrityError):
        mosaic.load_animal_mnist(tmp_path)


# --- generation on synthetic items (fast, no datasets needed) ----------------------------------

# Every synthetic item is a flat 28x28 patch whose grey level encodes (class, split), so a rendered
# mosaic (at 28 px a cell: no resampling, black background: no inversion) can be decoded exactly.
def _level(source: int, cls: int, split: str) -> int:
    return 20 + 10 * (5 * source + cls) + (0 if split == "train" else 5)


def _synthetic_sources() -> list[ItemSet]:
    sets = []
    for si, (name, classes) in enumerate((("fashion", ["t-shirt", "trouser", "bag", "coat", "sandal"]),
                                          ("animal", ["cat", "dog", "zebra", "horse", "cow"]))):
        parts = {}
        for split, per in (("train", 6), ("test", 3)):
            labels = np.repeat(np.arange(len(classes)), per)
            images = np.stack([np.full((28, 28), _level(si, c, split), np.uint8) for c in labels])
            parts[split] = (images, labels)
        sets.append(ItemSet(name, classes, *parts["train"], *parts["test"]))
    return sets


def _decode(path, grid: int, split_of_level: dict[int, tuple[str, str]]):
    a = np.asarray(Image.open(path))
    assert a.shape == (28 * grid, 28 * grid, 3)
    cells = []
    for r in range(grid):
        for c in range(grid):
            v = int(a[r * 28 + 14, c * 28 + 14, 0])
            cells.append(None if v == 0 else split_of_level[v])
    return cells


def _levels(sources):
    return {_level(si, ci, split): (name, split) for si, s in enumerate(sources) for ci, name in enumerate(s.classes)
            for split in ("train", "test")}


def _read(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_mosaic_labels_grid_and_split(tmp_path):
    sources = _synthetic_sources()
    config = MosaicConfig(grid=3, items=5, unseen=["bag", "coat", "zebra"], train_images=40, test_images=30,
                          test_unseen=2, size=84, background="black", seed=3)
    summary = generate(tmp_path, config, items=sources)
    seen = (tmp_path / "seen.txt").read_text().split("\n")[:-1]
    unseen = (tmp_path / "unseen.txt").read_text().split("\n")[:-1]
    assert unseen == ["bag", "coat", "zebra"] == summary["unseen"]
    assert seen == ["t-shirt", "trouser", "sandal", "cat", "dog", "horse", "cow"]
    assert (tmp_path / "labels.txt").read_text().split("\n")[:-1] == seen + unseen
    levels = _levels(sources)
    for split, count in (("train", 40), ("test", 30)):
        rows = _read(tmp_path / f"{split}.jsonl")
        assert len(rows) == count
        for row in rows:
            assert row["image"] == f"images/{split}/{rows.index(row):06d}.png"
            labels = row["labels"]
            # A fixed number of filled cells, each a distinct class; labels are exactly those classes.
            assert len(row["cells"]) == 9 and sum(c is not None for c in row["cells"]) == 5
            assert sorted(labels) == sorted(c for c in row["cells"] if c is not None) and len(set(labels)) == 5
            n_unseen = sum(lab in unseen for lab in labels)
            assert n_unseen == (0 if split == "train" else 2)
            # At 28 px a cell the pixels decode exactly: they hold what the manifest says, from the
            # right split's items (no training item appears in a test image).
            decoded = _decode(tmp_path / row["image"], 3, levels)
            assert [None if d is None else d[0] for d in decoded] == row["cells"]
            assert {d[1] for d in decoded if d is not None} == {split}
    assert summary["splits"]["test"]["label_counts"]["bag"] > 0


def test_white_background_inverts(tmp_path):
    sources = _synthetic_sources()
    cfg = dict(grid=2, items=1, num_unseen=2, train_images=3, test_images=0, size=56, seed=0)
    generate(tmp_path / "w", MosaicConfig(**cfg), items=sources)
    generate(tmp_path / "b", MosaicConfig(**cfg, background="black"), items=sources)
    white = np.asarray(Image.open(tmp_path / "w/images/train/000000.png")).astype(int)
    black = np.asarray(Image.open(tmp_path / "b/images/train/000000.png")).astype(int)
    np.testing.assert_array_equal(white, 255 - black)
    assert (white == 255).mean() > 0.5  # three empty cells of four


def test_deterministic_for_a_seed(tmp_path):
    sources = _synthetic_sources()
    config = dict(grid=2, items=4, num_unseen=4, train_images=12, test_images=8, size=64)
    generate(tmp_path / "a", MosaicConfig(**config, seed=7), items=sources)
    generate(tmp_path / "b", MosaicConfig(**config, seed=7), items=sources)
    generate(tmp_path / "c", MosaicConfig(**config, seed=8), items=sources)
    for name in ("train.jsonl", "test.jsonl", "seen.txt", "unseen.txt", "mosaic.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for i in range(8):
        rel = f"images/test/{i:06d}.png"
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a/test.jsonl").read_bytes() != (tmp_path / "c/test.jsonl").read_bytes()


def test_unseen_split_is_drawn_evenly_over_sources():
    sources = _synthetic_sources()
    for seed in range(5):
        seen, unseen = split_classes(sources, MosaicConfig(num_unseen=4, seed=seed))
        assert len(unseen) == 4 and len(seen) == 6 and not set(seen) & set(unseen)
        assert sum(u in sources[0].classes for u in unseen) == 2
    draws = {tuple(split_classes(sources, MosaicConfig(num_unseen=4, seed=s))[1]) for s in range(5)}
    assert len(draws) > 1


def test_any_mix_test_images_and_bad_configs(tmp_path):
    sources = _synthetic_sources()
    generate(tmp_path, MosaicConfig(grid=2, items=2, num_unseen=4, train_images=4, test_images=30, size=56,
                                    test_unseen=-1, seed=0), items=sources)
    counts = {sum(lab in (tmp_path / "unseen.txt").read_text().split() for lab in r["labels"])
              for r in _read(tmp_path / "test.jsonl")}
    assert counts <= {0, 1, 2} and len(counts) > 1
    bad = [dict(items=5, grid=2), dict(items=0), dict(test_unseen=5, items=4), dict(background="grey"),
           dict(unseen=["unicorn"]), dict(num_unseen=0)]
    for kw in bad:
        with pytest.raises(ValueError):
            generate(tmp_path / "bad", MosaicConfig(**{"train_images": 1, "test_images": 1, **kw}), items=sources)


def test_manifest_reads_with_qks_data(tmp_path):
    from qks.data import read_label_lists, read_manifest

    generate(tmp_path, MosaicConfig(grid=2, items=3, num_unseen=4, train_images=6, test_images=6, size=56),
             items=_synthetic_sources())
    seen, unseen = read_label_lists(tmp_path / "seen.txt", tmp_path / "unseen.txt")
    m = read_manifest(tmp_path / "test.jsonl", seen + unseen)
    t = m.targets(seen + unseen)
    assert t.shape == (6, 10) and ((t == 1).sum(axis=1) == 3).all() and ((t == -1).sum(axis=1) == 7).all()
    assert ((t[:, len(seen):] == 1).sum(axis=1) == 1).all()  # one unseen item in every test image


# --- the real datasets -------------------------------------------------------------------------


@needs_animal
def test_animal_mnist_loads_safely():
    items = mosaic.load_animal_mnist()
    assert items.classes == mosaic.ANIMAL_CLASSES
    assert items.train_images.shape == (8000, 28, 28) and items.test_images.shape == (2000, 28, 28)
    assert np.bincount(items.test_labels).tolist() == [200] * 10


@needs_fashion
def test_fashion_mnist_loads():
    items = mosaic.load_fashion_mnist()
    assert items.train_images.shape == (60000, 28, 28) and items.test_images.shape == (10000, 28, 28)
    assert np.bincount(items.test_labels).tolist() == [1000] * 10


@needs_fashion
@needs_animal
def test_cli_on_the_real_datasets(tmp_path, capsys):
    assert mosaic.main([str(tmp_path), "--train", "8", "--test", "6", "--size", "112", "--seed", "2"]) == 0
    assert "unseen (6)" in capsys.readouterr().out
    rows = _read(tmp_path / "test.jsonl")
    names = set(mosaic.FASHION_CLASSES) | set(mosaic.ANIMAL_CLASSES)
    assert len(rows) == 6 and all(set(r["labels"]) <= names and len(r["labels"]) == 4 for r in rows)
    with Image.open(tmp_path / rows[0]["image"]) as im:
        assert im.size == (112, 112) and im.mode == "RGB"
    assert mosaic.main([str(tmp_path / "x"), "--unseen", "unicorn"]) == 1


def test_chance_levels_of_the_zero_shot_benchmark():
    """One unseen positive among U unseen labels per image: chance ZSL F1@1 is 1/U, and chance
    ZSL mAP is close to the positives' share (a little above it: AP rewards early hits)."""
    from benchmarks.lite_zero_shot import chance

    rng = np.random.default_rng(0)
    n, seen, unseen = 600, 8, 4
    targets = -np.ones((n, seen + unseen), dtype=np.int8)
    for i in range(n):
        targets[i, rng.choice(seen, 3, replace=False)] = 1
        targets[i, seen + rng.integers(unseen)] = 1
    mask = np.arange(seen + unseen) >= seen
    c = chance(targets, mask, draws=40)
    assert c["zsl_images"] == n and c["gzsl_images"] == n
    assert c["zsl_f1@1"] == pytest.approx(100 / unseen, abs=2.5)
    assert 100 / unseen < c["zsl_map"] < 100 / unseen + 8
