"""`qks-prepare` on tiny fake trees laid out like the NUS-WIDE and Open Images V4 releases."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from qks.data import read_label_lists, read_manifest
from qks.prepare import main


def img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def run(args):
    result = CliRunner().invoke(main, args)
    assert "Traceback" not in result.output
    return result


def jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def nuswide(tmp_path):
    root = tmp_path / "NUS-WIDE"
    write(root / "Concepts81.txt", "sky\ndog\nzebra\n")
    write(root / "NUS_WID_Tags" / "TagList1k.txt", "sky\ndog\nsunset\nbeach\n2007\nnature\n")
    # Train: the list uses Windows separators; one entry has the full original prefix.
    write(root / "ImageList" / "TrainImagelist.txt",
          "actor\\0001_1.jpg\r\nactor\\0002_2.jpg\r\nbeach\\0003_3.jpg\r\nC:\\ImageData\\Flickr\\beach\\0004_4.jpg\r\n")
    write(root / "NUS_WID_Tags" / "Train_Tags1k.dat",
          "1\t0\t1\t0\t0\t0\t\n"   # sky (a concept: not a seen label) + sunset
          "0\t1\t0\t0\t0\t0\t\n"   # dog only: no seen tag, left out
          "0\t0\t0\t1\t0\t1\t\n"   # beach + nature
          "0\t0\t0\t0\t1\t0\t\n")  # 2007, but its image is missing
    for name in ("actor/0001_1.jpg", "actor/0002_2.jpg", "beach/0003_3.jpg"):
        img(root / "Flickr" / name)
    write(root / "ImageList" / "TestImagelist.txt", "sea\\0005_5.jpg\nsea\\0006_6.jpg\nsea\\0007_7.jpg\n")
    write(root / "NUS_WID_Tags" / "Test_Tags1k.dat", "0 0 1 0 0 0\n0 0 0 0 0 0\n0 0 0 0 0 0\n")
    gt = root / "Groundtruth" / "TrainTestLabels"
    write(gt / "Labels_sky_Test.txt", "1\n0\n0\n")
    write(gt / "Labels_dog_Test.txt", "0\n1\n0\n")
    write(gt / "Labels_zebra_Test.txt", "0\n0\n0\n")
    for i in (5, 6, 7):
        img(root / "Flickr" / "sea" / f"000{i}_{i}.jpg")
    return root


def test_nuswide(nuswide):
    out = nuswide  # writing into the release folder: image paths come out relative
    result = run(["nuswide", "--root", str(nuswide), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "4 seen / 3 unseen labels; 2 training and 2 test images" in result.output
    assert "1 listed image(s) not on disk" in result.output
    assert "not the paper's 925 / 81" in result.output  # a fake tree is not the full release
    seen, unseen = read_label_lists(out / "seen.txt", out / "unseen.txt")
    assert seen == ["sunset", "beach", "2007", "nature"] and unseen == ["sky", "dog", "zebra"]
    assert jsonl(out / "train.jsonl") == [
        {"image": "Flickr/actor/0001_1.jpg", "labels": ["sunset"], "unlisted": "negative"},
        {"image": "Flickr/beach/0003_3.jpg", "labels": ["beach", "nature"], "unlisted": "negative"},
    ]
    assert jsonl(out / "test.jsonl") == [
        {"image": "Flickr/sea/0005_5.jpg", "labels": ["sunset", "sky"], "unlisted": "negative"},
        {"image": "Flickr/sea/0006_6.jpg", "labels": ["dog"], "unlisted": "negative"},
    ]
    # What it writes passes qks's own validation.
    m = read_manifest(out / "test.jsonl", seen + unseen)
    assert m.targets(seen + unseen).tolist()[1] == [-1, -1, -1, -1, -1, 1, -1]
    stats = json.loads((out / "prepare.json").read_text())
    assert stats["train"] == {"listed": 4, "missing_images": 1, "no_positive": 1}


def test_nuswide_outside_out_writes_absolute_paths(nuswide, tmp_path):
    # The concept list where the release's ConceptsList.zip puts it.
    (nuswide / "ConceptsList").mkdir()
    (nuswide / "Concepts81.txt").rename(nuswide / "ConceptsList" / "Concepts81.txt")
    out = tmp_path / "prepared"
    assert run(["nuswide", "--root", str(nuswide), "--out", str(out), "--quiet"]).exit_code == 0
    first = jsonl(out / "train.jsonl")[0]["image"]
    assert first == str(nuswide / "Flickr" / "actor" / "0001_1.jpg")
    read_manifest(out / "train.jsonl", read_label_lists(out / "seen.txt", out / "unseen.txt")[0])


def test_nuswide_broken_release(nuswide):
    (nuswide / "Groundtruth" / "TrainTestLabels" / "Labels_zebra_Test.txt").unlink()
    result = run(["nuswide", "--root", str(nuswide), "--out", str(nuswide / "o"), "--quiet"])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: missing release file: {nuswide}/Groundtruth/TrainTestLabels/Labels_zebra_Test.txt"
    write(nuswide / "NUS_WID_Tags" / "Train_Tags1k.dat", "1 0 1\n")
    result = run(["nuswide", "--root", str(nuswide), "--out", str(nuswide / "o"), "--quiet"])
    assert result.exit_code == 1 and "Train_Tags1k.dat:1: 3 columns, expected 6" in result.output


@pytest.fixture
def openimages(tmp_path):
    root = tmp_path / "OpenImages"
    rel = root / "2018_04"
    write(rel / "class-descriptions.csv",
          '/m/01,Cat\n/m/02,Dog\n/m/03,Car\n/m/04,Tree\n/m/05,"Apple, fruit"\n/m/06,Dog\n/m/09,Boat\n')
    write(rel / "classes-trainable.txt", "/m/01\n/m/02\n/m/03\n")
    with (rel / "unseen_labels.pkl").open("wb") as f:
        pickle.dump(np.array(["/m/09", "/m/04", "/m/05", "/m/06"]), f)  # the LESA file: all unseen MIDs
    write(rel / "top_400_unseen.csv", "1\n2\n3\n")  # rows index it
    header = "ImageID,Source,LabelName,Confidence\n"
    write(rel / "train" / "train-annotations-human-imagelabels.csv", header +
          "a1,verification,/m/01,1\na1,verification,/m/02,0\na1,verification,/m/04,1\n"  # /m/04 unseen: dropped
          "a2,verification,/m/03,1\na2,crowdsource,/m/03,0\n"  # sources disagree: unknown -> nothing left
          "a3,verification,/m/01,1\n"  # image missing
          "a4,verification,/m/02,1\na4,verification,/m/77,1\n")  # /m/77 is in no list
    write(rel / "test" / "test-annotations-human-imagelabels.csv", header +
          "t1,verification,/m/04,1\nt1,verification,/m/01,0\n"
          "t2,verification,/m/05,0\nt2,verification,/m/02,1\nt2,verification,/m/06,1\n")
    img(root / "train" / "0a" / "a1.jpg")
    img(root / "train" / "0b" / "a2.jpg")
    img(root / "train" / "a4.jpg")
    img(root / "test" / "t1.jpg")
    img(root / "test" / "t2.jpg")
    return root


def test_openimages(openimages, tmp_path):
    out = tmp_path / "oi"
    result = run(["openimages", "--root", str(openimages), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    seen, unseen = read_label_lists(out / "seen.txt", out / "unseen.txt")
    # Sorted by name; "Dog" names two MIDs, so both get theirs appended.
    assert seen == ["Car", "Cat", "Dog (/m/02)"]
    assert unseen == ["Apple, fruit", "Dog (/m/06)", "Tree"]
    a1, a4 = jsonl(out / "train.jsonl")
    assert a1 == {"image": str(openimages / "train" / "0a" / "a1.jpg"), "labels": ["Cat"],
                  "negatives": ["Dog (/m/02)"], "unlisted": "unknown"}
    assert a4["labels"] == ["Dog (/m/02)"] and a4["negatives"] == []
    t1, t2 = jsonl(out / "test.jsonl")
    assert (t1["labels"], t1["negatives"]) == (["Tree"], ["Cat"])
    assert (t2["labels"], t2["negatives"]) == (["Dog (/m/02)", "Dog (/m/06)"], ["Apple, fruit"])
    m = read_manifest(out / "test.jsonl", seen + unseen)
    assert m.targets(seen + unseen).tolist()[0] == [0, -1, 0, 0, 0, 1]  # unlisted: unknown
    stats = json.loads((out / "prepare.json").read_text())
    assert stats["train"] == {"annotated": 4, "missing_images": 1, "conflicting_labels": 1}
    assert stats["renamed_duplicates"] == 2


def test_openimages_unseen_list_by_name_or_mid(openimages, tmp_path):
    lst = tmp_path / "unseen.txt"
    lst.write_text("Boat\n/m/04\n")
    out = tmp_path / "oi"
    assert run(["openimages", "--root", str(openimages), "--out", str(out), "--unseen-list", str(lst),
                "--quiet"]).exit_code == 0
    assert (out / "unseen.txt").read_text() == "Boat\nTree\n"
    lst.write_text("Unicorn\n")
    result = run(["openimages", "--root", str(openimages), "--out", str(out), "--unseen-list", str(lst)])
    assert result.exit_code == 1 and "'Unicorn' is neither a MID nor a display name" in result.output


def test_openimages_refuses_a_pickle_that_runs_code(openimages, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (openimages / "2018_04" / "unseen_labels.pkl").write_bytes(pickle.dumps(Evil()))
    result = run(["openimages", "--root", str(openimages), "--out", str(tmp_path / "oi"), "--quiet"])
    assert result.exit_code == 1
    assert "refusing to load builtins.print" in result.output and "pwned" not in result.output


def test_help():
    for sub in ([], ["nuswide"], ["openimages"]):
        assert run([*sub, "--help"]).exit_code == 0
    assert run(["nuswide", "--root", "/does/not/exist", "--out", "x"]).exit_code == 2
