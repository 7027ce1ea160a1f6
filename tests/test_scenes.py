"""benchmarks/scenes.py: the curated concepts, and a small scene split with the properties the
open-vocabulary benchmark relies on (needs the stamps: `make stamps`)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

from benchmarks import scenes

try:
    STAMPS = scenes.stamps_dir()
except scenes.StampsUnavailable as e:
    STAMPS, _WHY = None, str(e)
needs_stamps = pytest.mark.skipif(STAMPS is None, reason=_WHY if STAMPS is None else "")


def test_curated_concepts_file():
    rows = scenes.read_concepts()
    names = [n for n, _ in rows]
    concepts = Counter(c for _, c in rows)
    assert len(rows) == 426 and len(concepts) == 315
    assert len(set(names)) == len(names)  # each stamp once
    assert all(c == c.strip() and c == c.lower() for c in concepts)
    assert not any(n.endswith("_mirror") or "/cartoon/" in n or n.startswith("symbols/") for n in names)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    if STAMPS is None:
        pytest.skip(_WHY)
    out = tmp_path_factory.mktemp("scenes")
    cfg = scenes.SceneConfig(train_scenes=40, test_scenes=30, seed=3)
    info = scenes.generate(out, cfg, progress=False)
    return out, cfg, info


def _records(root, name):
    return [json.loads(ln) for ln in (root / f"{name}.jsonl").read_text().splitlines()]


def _lines(root, name):
    return (root / name).read_text().splitlines()


@needs_stamps
def test_every_stamp_of_the_curated_list_is_installed():
    stamps = scenes.load_stamps(STAMPS)
    assert len(stamps) == 426 and all(s.path.is_file() for s in stamps)
    by_name = {s.path.name: s for s in stamps}
    assert not by_name["stop.png"].flip  # signs carry text
    assert not by_name["drumkit.png"].flip and by_name["crow.png"].flip  # Tux Paint's `nomirror`


@needs_stamps
def test_split_by_concept(split):
    root, _, info = split
    seen, unseen = _lines(root, "seen.txt"), _lines(root, "unseen.txt")
    assert len(seen) + len(unseen) == 315 and not set(seen) & set(unseen)
    assert len(unseen) == round(0.25 * 315) == info["unseen"]
    assert _lines(root, "labels.txt") == seen + unseen
    train, test = _records(root, "train"), _records(root, "test")
    assert len(train) == 40 and len(test) == 30
    for r in train:
        assert 1 <= len(r["labels"]) <= 4 and set(r["labels"]) <= set(seen)
    for r in test:
        assert 1 <= len(r["labels"]) <= 4 and set(r["labels"]) & set(unseen), r  # an unseen object in each
        assert set(r["labels"]) <= set(seen) | set(unseen)


@needs_stamps
def test_scenes_images_boxes_and_overlap(split):
    root, cfg, _ = split
    for r in _records(root, "test")[:10] + _records(root, "train")[:10]:
        with Image.open(root / r["image"]) as im:
            assert im.size == (cfg.size, cfg.size) and im.mode == "RGB"
        assert len(r["boxes"]) == len(r["stamps"]) == len(r["labels"]) and r["background"] in scenes.BACKGROUNDS
        for x0, y0, x1, y1 in r["boxes"]:
            assert 0 <= x0 < x1 <= cfg.size and 0 <= y0 < y1 <= cfg.size
        assert scenes._overlap_ok(tuple(r["boxes"][-1]), [tuple(b) for b in r["boxes"][:-1]], cfg.max_overlap)


@needs_stamps
def test_a_seen_concept_keeps_one_photo_for_test_only(tmp_path):
    stamps = scenes.load_stamps(STAMPS)
    import numpy as np

    split = scenes.split_concepts(stamps, scenes.SceneConfig(seed=3), np.random.default_rng(3))
    per_concept = Counter(s.concept for s in stamps)
    multi = [c for c in split.seen if per_concept[c] > 1]
    assert multi
    for c in multi:
        assert len(split.test_stamps[c]) == 1 and split.test_stamps[c][0] not in split.train_stamps[c]


@needs_stamps
def test_deterministic_for_a_seed_and_different_across_seeds(split, tmp_path):
    root, cfg, _ = split
    again = tmp_path / "again"
    scenes.generate(again, cfg, progress=False)
    assert (again / "test.jsonl").read_bytes() == (root / "test.jsonl").read_bytes()
    assert (again / "images/test/000007.jpg").read_bytes() == (root / "images/test/000007.jpg").read_bytes()
    other = tmp_path / "other"
    scenes.generate(other, scenes.SceneConfig(train_scenes=2, test_scenes=2, seed=4), progress=False)
    assert _lines(other, "unseen.txt") != _lines(root, "unseen.txt")


@needs_stamps
def test_learning_curve_keeps_the_test_scenes(split, tmp_path):
    root, cfg, _ = split
    few = tmp_path / "few"
    scenes.generate(few, scenes.SceneConfig(train_scenes=10, test_scenes=30, seed=3, concepts=12), progress=False)
    seen = _lines(few, "seen.txt")
    assert len(seen) == 12 and set(seen) <= set(_lines(root, "seen.txt"))
    assert _lines(few, "unseen.txt") == _lines(root, "unseen.txt")
    assert (few / "images/test/000011.jpg").read_bytes() == (root / "images/test/000011.jpg").read_bytes()
    for full, part in zip(_records(root, "test"), _records(few, "test"), strict=True):
        assert part["stamps"] == full["stamps"]
        assert set(part["labels"]) == set(full["labels"]) & (set(seen) | set(_lines(few, "unseen.txt")))
    assert all(set(r["labels"]) <= set(seen) for r in _records(few, "train"))


@needs_stamps
def test_manifests_load_with_qks_data(split):
    from qks.data import read_label_lists, read_manifest

    root, _, _ = split
    seen, unseen = read_label_lists(root / "seen.txt", root / "unseen.txt")
    for name in ("train", "test"):
        m = read_manifest(root / f"{name}.jsonl", seen + unseen)
        assert len(m.samples) == (40 if name == "train" else 30) and not m.skipped


@needs_stamps
def test_ensure_reuses_a_matching_split(split):
    root, cfg, info = split
    said = []
    assert scenes.ensure(root, cfg, log=said.append) == json.loads(json.dumps(info)) and "reusing" in said[0]


def test_missing_stamps_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(scenes.STAMPS_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setattr(scenes, "DEFAULT_STAMPS", tmp_path / "nowhere")
    monkeypatch.setattr(scenes, "SYSTEM_STAMPS", tmp_path / "nowhere")
    with pytest.raises(scenes.StampsUnavailable, match="make stamps"):
        scenes.stamps_dir()
    assert scenes.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "make stamps" in err[0]
    (tmp_path / "partial" / "animals").mkdir(parents=True)
    with pytest.raises(scenes.StampsUnavailable, match="is missing"):
        scenes.load_stamps(tmp_path / "partial")
