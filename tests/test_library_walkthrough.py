"""The README's photo-library walk-through (benchmarks/library_walkthrough.py), end to end with the console
commands on real photos: bank, calibration, planted near-duplicates, tags + XMP read back by exiftool +
embeddings, qks-dupes finding every planted copy (and joining no two photos), qks-similar, an update
that tags only the added photos. `make demo` runs the same on the demo's scenes and trained bundle."""

from __future__ import annotations

import json
import shutil

import pytest
from runtime_fixtures import *  # noqa: F403

if shutil.which("exiftool") is None:
    pytest.skip("exiftool is not installed (make exiftool)", allow_module_level=True)
pytest.importorskip("pyexiv2", reason="pyexiv2 is not installed (pip install 'qks[library]')")

PHOTOS = {"astronaut": ["traffic light"], "coffee": ["car"], "chelsea": ["cat"], "rocket": ["car", "bird"],
          "hubble_deep_field": ["bird"], "immunohistochemistry": ["dog"], "retina": ["dog", "cat"],
          "coins": ["car"], "camera": ["bird", "cat"], "colorwheel": ["traffic light"]}


@pytest.fixture
def scenes(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for name, labels in PHOTOS.items():
        img = photo(name).convert("RGB")  # noqa: F405
        img.thumbnail((320, 320))
        img.save(data / "images" / f"{name}.jpg", quality=92)
        rows.append(json.dumps({"image": f"images/{name}.jpg", "labels": labels}) + "\n")
    (data / "test.jsonl").write_text("".join(rows[:6]))
    (data / "train.jsonl").write_text("".join(rows[6:]))
    (data / "labels.txt").write_text("cat\ndog\ncar\nbird\ntraffic light\n")
    return data


def test_walkthrough_passes_its_checks(lite_zero_shot_bundle, scenes, tmp_path, capsys):
    """On the lite backbone's zero-shot bundle: a random-weight tower's embeddings do not tell photos
    apart, so near-duplicates would be meaningless on it."""
    from benchmarks.library_walkthrough import main

    bundle = tmp_path / "bundle"  # the walk-through stores a bank and its thresholds in it
    shutil.copytree(lite_zero_shot_bundle, bundle)
    rc = main(["--bundle", str(bundle), "--data", str(scenes), "--labels", str(scenes / "labels.txt"),
               "--out", str(tmp_path / "walk"), "--library-size", "6", "--calibration-size", "4", "--plant", "2",
               "--add", "2"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert ("planted copies grouped with their original: reencoded 2/2, cropped 2/2, small 2/2; "
            "0 groups join different photos") in printed
    assert "2 images tagged (0 errors, 12 unchanged, 0 removed)" in printed
