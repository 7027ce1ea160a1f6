"""Manifests, label lists, validation messages, the dataset and the transforms."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from qks.backbones.base import Preprocess
from qks.data import ManifestDataset, ManifestError, read_label_list, read_label_lists, read_manifest
from qks.transforms import Cutout, eval_transform, train_transform

LABELS = ["cat", "dog", "car", "bird"]


def write_image(path, seed=0, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_manifest(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture
def root(tmp_path):
    for i in range(3):
        write_image(tmp_path / "img" / f"{i}.png", seed=i)
    return tmp_path


def test_targets_follow_the_unlisted_rule(root):
    m = read_manifest(write_manifest(root / "m.jsonl", [
        {"image": "img/0.png", "labels": ["cat"], "negatives": ["dog"]},
        {"image": "img/1.png", "labels": ["dog"], "negatives": ["car"], "unlisted": "unknown"},
        "",  # blank lines are fine
        {"image": str(root / "img" / "2.png"), "labels": [], "unknown": ["bird"], "id": 7},
    ]), LABELS)
    assert [s.line for s in m.samples] == [1, 2, 4]
    np.testing.assert_array_equal(m.targets(LABELS), [[1, -1, -1, -1], [0, 1, -1, 0], [-1, -1, -1, 0]])
    assert m.samples[0].image == "img/0.png" and m.samples[0].path == str(root / "img" / "0.png")


def bad_case(root, line, expected, labels=LABELS):
    path = write_manifest(root / "bad.jsonl", [{"image": "img/0.png", "labels": ["cat"]}, line])
    with pytest.raises(ManifestError) as e:
        read_manifest(path, labels)
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"{path}:2: "), first
    assert expected in first
    assert "--skip-bad" in str(e.value)


@pytest.mark.parametrize("line, expected", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"labels": ["cat"]}, 'missing "image"'),
    ({"image": "img/1.png", "labels": "cat"}, "'labels' must be a list"),
    ({"image": "img/1.png", "labels": ["zebra"]}, "label 'zebra' is in neither"),
    ({"image": "img/1.png", "labels": ["cat"], "negatives": ["cat"]}, "label 'cat' is listed twice"),
    ({"image": "img/1.png", "unlisted": "maybe"}, '"unlisted" must be'),
    ({"image": "../outside.png"}, "points outside the manifest's folder"),
    ({"image": "img/9.png"}, "image not found"),
    ({"image": "img/0.png", "labels": ["dog"]}, "duplicate image 'img/0.png' (first on line 1)"),
])
def test_bad_lines_have_clear_messages(root, line, expected):
    bad_case(root, line, expected)


def test_unreadable_image(root):
    (root / "img" / "broken.png").write_bytes(b"this is not a png")
    bad_case(root, {"image": "img/broken.png"}, "image unreadable")


def test_skip_bad_drops_and_counts(root):
    path = write_manifest(root / "m.jsonl", [
        {"image": "img/0.png", "labels": ["cat"]}, "{oops", {"image": "img/9.png"}, {"image": "img/1.png"},
    ])
    m = read_manifest(path, LABELS, skip_bad=True)
    assert [s.image for s in m.samples] == ["img/0.png", "img/1.png"]
    assert len(m.skipped) == 2 and m.skipped[0].startswith(f"{path}:2:")


def test_empty_and_missing_manifests(root):
    with pytest.raises(ManifestError, match="no usable images"):
        read_manifest(write_manifest(root / "e.jsonl", [""]), LABELS)
    with pytest.raises(ManifestError, match="no usable images .1 bad line"):
        read_manifest(write_manifest(root / "e2.jsonl", ["{x"]), LABELS, skip_bad=True)
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(root / "nope.jsonl", LABELS)


def test_many_problems_are_summarised(root):
    path = write_manifest(root / "m.jsonl", ["{x"] * 15)
    with pytest.raises(ManifestError) as e:
        read_manifest(path, LABELS)
    lines = str(e.value).splitlines()
    assert len(lines) == 12 and lines[10] == "... and 5 more" and "15 bad line(s)" in lines[11]


def test_label_lists(tmp_path):
    (tmp_path / "s.txt").write_text("cat\ndog\n\n")
    (tmp_path / "u.txt").write_text("bird\ndog\n")
    assert read_label_list(tmp_path / "s.txt") == ["cat", "dog"]
    with pytest.raises(ManifestError, match="in both"):
        read_label_lists(tmp_path / "s.txt", tmp_path / "u.txt")
    (tmp_path / "d.txt").write_text("cat\ncat\n")
    with pytest.raises(ManifestError, match=r"d.txt:2: label 'cat' already listed on line 1"):
        read_label_list(tmp_path / "d.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ManifestError, match="empty"):
        read_label_list(tmp_path / "empty.txt")
    with pytest.raises(ManifestError, match="not found"):
        read_label_list(tmp_path / "missing.txt")


def test_dataset_items(root):
    m = read_manifest(write_manifest(root / "m.jsonl", [
        {"image": "img/0.png", "labels": ["cat"]}, {"image": "img/1.png", "unlisted": "unknown", "negatives": ["car"]},
    ]), LABELS)
    pp = Preprocess(32, "shortest", "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    ds = ManifestDataset(m.samples, ["car", "cat"], eval_transform(pp))
    pixels, targets = ds[1]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert targets.dtype == torch.int8 and targets.tolist() == [-1, 0]
    assert ds[0][1].tolist() == [-1, 1]


@pytest.mark.parametrize("size, mode", [(224, "shortest"), (32, "shortest"), (64, "squash")])
def test_eval_transform_is_open_clips(size, mode):
    from skimage.data import astronaut

    img = Image.fromarray(astronaut()).crop((0, 40, 512, 400))  # not square: the crop matters
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    ours = eval_transform(Preprocess(size, mode, "bicubic", mean, std))(img)
    theirs = open_clip.image_transform(size, is_train=False, mean=mean, std=std, resize_mode=mode,
                                       interpolation="bicubic")(img)
    assert torch.equal(ours, theirs)


def test_eval_transform_matches_the_backbones_own_preprocess(tiny_backbone):
    from skimage.data import astronaut

    img = Image.fromarray(astronaut())
    _, _, preprocess = open_clip.create_model_and_transforms("qks-tiny-vit", pretrained=None)
    assert torch.equal(eval_transform(tiny_backbone.preprocess)(img), preprocess(img))


def test_train_transform_is_random_but_seeded():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    pp = Preprocess(32, "shortest", "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    t = train_transform(pp)
    assert any(isinstance(x, Cutout) for x in t.transforms)
    torch.manual_seed(0)
    a, b = t(img), t(img)
    torch.manual_seed(0)
    assert torch.equal(t(img), a) and not torch.equal(a, b)
    assert a.shape == (3, 32, 32)


def test_cutout_paints_a_half_size_box():
    img = Image.new("RGB", (40, 40), (0, 0, 0))
    torch.manual_seed(3)
    out = np.asarray(Cutout(0.5)(img))
    painted = (out != 0).any(axis=2)
    assert 0 < painted.sum() <= 21 * 21
    assert np.asarray(img).sum() == 0  # the input is untouched


def test_transforms_never_resize_a_thin_strip_whole():
    """A 1 x 1,000,000 strip: torchvision's Resize would first make it 224 x 224,000,000 (150 GB);
    the shared geometry resamples only the crop's region, as the runtime does, to the same pixels."""
    from qks.runtime.preprocess import Preprocess as RuntimePreprocess

    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1, 1_000_000, 3), dtype=np.uint8))
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    ours = eval_transform(Preprocess(224, "shortest", "bicubic", mean, std))(strip)
    runtime = RuntimePreprocess(224, "shortest", "bicubic", tuple(mean), tuple(std))(strip)
    assert ours.shape == (3, 224, 224) and np.array_equal(ours.numpy(), runtime)
    torch.manual_seed(0)
    assert train_transform(Preprocess(224, "shortest", "bicubic", mean, std))(strip).shape == (3, 224, 224)
