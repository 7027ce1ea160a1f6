"""qks-infer over a photo library that changes: --exclude, --update (only new or changed images are
tagged, deleted ones dropped, the result equal to a full rerun, a killed update leaves OUT as it was),
--checksum, and their errors through the command line."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image
from qks.runtime.backend import select_backend
from qks.runtime.bundle import Bundle
from qks.runtime.infer import InferError, InferOptions, find_images, run_folder
from qks.runtime.labels import LabelBank
from qks.runtime.update import excluded
from runtime_fixtures import *  # noqa: F403


class _Counting:
    """An engine wrapper that counts the images it ran and can fail after a number of batches."""

    def __init__(self, engine, fail_after: int | None = None):
        self.engine, self.fail_after, self.images, self.batches = engine, fail_after, 0, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, feeds):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt
        self.batches += 1
        self.images += len(next(iter(feeds.values())))
        return self.engine.run(feeds)


def _run(bundle_dir, images, out, fail_after=None, **opts):
    bundle = Bundle.load(bundle_dir)
    bank = LabelBank.from_bundle(bundle)
    engine, _reason = select_backend(bundle, "ort-cpu", threads=1)
    counting = _Counting(engine, fail_after)
    with engine:
        summary = run_folder(images, counting, bank, bundle.preprocess, out,
                             InferOptions(progress=False, workers=1, batch_size=2, **opts), bundle.scoring,
                             {"bundle_sha256": "b" * 64})
    return summary, counting.images


def _bump(path, seconds=10):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_exclude_matches_paths_names_and_folders(photo_library):
    assert excluded("a/b.jpg", ["*.jpg"]) and excluded("a/b.jpg", ["a/*"]) and excluded("a/b.jpg", ["a"])
    assert excluded("x/.thumbnails/y.png", [".thumbnails"]) and not excluded("x/thumbnails2/y.png", [".thumbnails"])
    assert not excluded("a/b.jpg", []) and not excluded("a/b.jpg", ["*.png"])
    assert find_images(photo_library, ["sub"]) == ["astronaut.jpg", "rocket.webp"]
    assert find_images(photo_library, ["*.png", "deeper"]) == ["astronaut.jpg", "rocket.webp", "sub/broken.jpg"]
    assert find_images(photo_library, ["sub/deeper/*"]) == [p for p in find_images(photo_library) if "deeper" not in p]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_update_tags_only_new_and_changed_images_and_equals_a_full_run(runtime_bundle, photo_library, tmp_path, fmt):
    out = tmp_path / f"tags.{fmt}"
    _summary, ran = _run(runtime_bundle, photo_library, out, fmt=fmt, top_k=2)
    assert ran == 5  # six images, one of them broken
    # the library changes: one new image, one replaced, one deleted, one only touched
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photo_library / "sub" / "new.png")
    with Image.open(photo_library / "astronaut.jpg") as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photo_library / "astronaut.jpg", quality=90)
    _bump(photo_library / "astronaut.jpg")
    (photo_library / "sub" / "coffee.png").unlink()
    summary, ran = _run(runtime_bundle, photo_library, out, fmt=fmt, top_k=2, update=True)
    # the new, the replaced, and the broken image (an error record is tried again)
    assert (summary.written, summary.skipped, summary.removed) == (3, 3, 1)
    assert ran == 2
    full = tmp_path / f"full.{fmt}"
    _run(runtime_bundle, photo_library, full, fmt=fmt, top_k=2)
    assert out.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["mode"] == "update" and meta["status"] == "complete" and meta["removed"] == 1
    # nothing changed: nothing but the broken image is run again
    summary, ran = _run(runtime_bundle, photo_library, out, fmt=fmt, top_k=2, update=True)
    assert (summary.written, summary.skipped, ran) == (1, 5, 0)
    assert out.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")


def test_update_with_exclude_drops_the_excluded_records(runtime_bundle, photo_library, tmp_path):
    out = tmp_path / "tags.jsonl"
    _run(runtime_bundle, photo_library, out)
    summary, ran = _run(runtime_bundle, photo_library, out, update=True, exclude=("deeper",))
    assert summary.removed == 1 and ran == 0
    assert [r["image"] for r in read_jsonl(out)] == find_images(photo_library, ["deeper"])  # noqa: F405


def test_checksum_ignores_a_touch_but_not_new_content(runtime_bundle, photo_library, tmp_path):
    out = tmp_path / "tags.jsonl"
    _run(runtime_bundle, photo_library, out, update=True, checksum=True)  # no OUT yet: a full run that stores hashes
    state = json.loads((tmp_path / "tags.jsonl.state.json").read_text())["files"]
    assert len(state["astronaut.jpg"]["sha256"]) == 64
    _bump(photo_library / "astronaut.jpg")
    summary, ran = _run(runtime_bundle, photo_library, out, update=True, checksum=True)
    assert ran == 0 and summary.skipped == 5  # the broken image is tried again, and fails again
    (photo_library / "sub" / "camera_gray.png").write_bytes((photo_library / "sub" / "coffee.png").read_bytes())
    _summary, ran = _run(runtime_bundle, photo_library, out, update=True, checksum=True)
    assert ran == 1
    _bump(photo_library / "astronaut.jpg")
    _summary, ran = _run(runtime_bundle, photo_library, out, update=True)  # without --checksum a touch counts
    assert ran == 1


def test_a_killed_update_leaves_out_as_it_was(runtime_bundle, photo_library, tmp_path):
    out = tmp_path / "tags.jsonl"
    _run(runtime_bundle, photo_library, out)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("tags.jsonl*")}
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.new("RGB", (20, 20), (10, 200, 10)).save(photo_library / name)
    (photo_library / "astronaut.jpg").unlink()
    with pytest.raises(KeyboardInterrupt):
        _run(runtime_bundle, photo_library, out, update=True, fail_after=1)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("tags.jsonl*")} == before
    summary, ran = _run(runtime_bundle, photo_library, out, update=True)  # and the next update completes it
    assert ran == 4 and summary.removed == 1
    assert [r["image"] for r in read_jsonl(out)] == find_images(photo_library)  # noqa: F405


def test_update_refuses_other_settings_and_needs_out(runtime_bundle, photo_library, tmp_path):
    out = tmp_path / "tags.jsonl"
    _run(runtime_bundle, photo_library, out, top_k=2)
    with pytest.raises(InferError, match="was written with top_k=2, this run has 3; not updating it"):
        _run(runtime_bundle, photo_library, out, top_k=3, update=True)
    out.with_name("tags.jsonl.meta.json").unlink()
    with pytest.raises(InferError, match="no readable tags.jsonl.meta.json"):
        _run(runtime_bundle, photo_library, out, top_k=2, update=True)
    with pytest.raises(InferError, match="--update needs --out FILE"):
        _run(runtime_bundle, photo_library, None, update=True)
    with pytest.raises(InferError, match="give --resume or --update, not both"):
        _run(runtime_bundle, photo_library, out, update=True, resume=True)


def test_cli_update_and_its_errors(runtime_bundle, photo_library, tmp_path):
    out = tmp_path / "tags.csv"

    def run(*args):
        return qks_infer(photo_library, runtime_bundle, *args)  # noqa: F405

    first = run("--out", out, "--exclude", "*.webp")
    assert first.returncode == 1, first.stderr  # the broken image is an error record
    Image.new("RGB", (32, 32), (0, 0, 255)).save(photo_library / "blue.png")
    res = run("--out", out, "--exclude", "*.webp", "--update")
    assert res.returncode == 1 and "2 images tagged (1 errors, 4 unchanged, 0 removed)" in res.stderr, res.stderr
    assert "blue.png" in out.read_text()
    for args, msg in ((["--out", out], "exists: pass --resume to continue it, --update to tag what changed"),
                      (["--update"], "--update needs --out FILE"),
                      (["--out", out, "--checksum"], "--checksum goes with --update"),
                      (["--out", out, "--update", "--xmp", "--all-scores"], "cannot be combined with --all-scores")):
        res = run(*args)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and msg in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_states_are_the_listing_time_state(runtime_bundle, photo_library, tmp_path):
    out = tmp_path / "tags.jsonl"
    _run(runtime_bundle, photo_library, out)
    state = json.loads((tmp_path / "tags.jsonl.state.json").read_text())
    assert state["schema"] == 1 and sorted(state["files"]) == find_images(photo_library)
    st = os.stat(photo_library / "astronaut.jpg")
    assert state["files"]["astronaut.jpg"] == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
