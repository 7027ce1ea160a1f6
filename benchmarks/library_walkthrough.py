"""The photo-library walk-through (README "Tagging a photo library"), run as a user would, with the
console commands, on a folder of scene images:

1. `qks-labels`: the label list stored as a bank of the bundle;
2. `qks-calibrate`: one threshold per label, fitted on labelled scenes that are not in the library;
3. near-duplicates planted in the library: JPEG re-encodes, crops to 85 % and half-size copies of a
   few photos;
4. `qks-infer --xmp --embeddings`: tags (with the calibrated thresholds), an XMP sidecar per photo,
   each read back with `exiftool`, and the image embeddings;
5. `qks-dupes`: every planted re-encode must be grouped with its original; the crops and half-size
   copies found, and the groups that join different photos, are printed;
6. `qks-similar`: the photos nearest to one of them, and to a text query;
7. new photos added, `qks-infer --update`: only those are tagged.

Exits 1 when a check fails, printing which. `make demo` runs it on the demo's bundle and scenes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from benchmarks.real_data import console_script


def run(*cmd, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [console_script(str(cmd[0])), *map(str, cmd[1:])]
    print("$", " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd)), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode not in (0, 1):
        raise SystemExit(f"{Path(cmd[0]).name} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    for line in res.stderr.splitlines():
        if line.startswith(Path(cmd[0]).name + ":") and "backend auto:" not in line:
            print("  " + line)
    return res


def read_manifest(path: Path) -> list[dict]:
    root = path.resolve().parent
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [dict(r, image=str(root / r["image"])) for r in rows]


def plant_duplicates(library: Path, originals: list[Path]) -> dict[str, str]:
    """{copy name: original name}: a JPEG re-encode, a centre crop to 85 % and a half-size copy of each."""
    planted = {}
    for src in originals:
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            stem = src.stem
            im.save(library / f"{stem}_reencoded.jpg", quality=75)
            dw, dh = int(w * 0.075), int(h * 0.075)
            im.crop((dw, dh, w - dw, h - dh)).save(library / f"{stem}_cropped.jpg", quality=92)
            im.resize((w // 2, h // 2), Image.Resampling.LANCZOS).save(library / f"{stem}_small.png")
        for kind in ("reencoded.jpg", "cropped.jpg", "small.png"):
            planted[f"{stem}_{kind}"] = src.name
    return planted


def check_sidecars(library: Path, records: list[dict]) -> list[str]:
    """exiftool's reading of every sidecar against the record's labels; the failures."""
    failures = []
    tagged = [r for r in records if "labels" in r and "error" not in r]
    sidecars = [str(library / (r["image"] + ".xmp")) for r in tagged]
    res = subprocess.run(["exiftool", "-j", "-G1", *sidecars], capture_output=True, text=True)
    read = {Path(x["SourceFile"]).name: x for x in json.loads(res.stdout or "[]")}
    for r in tagged:
        got = read.get(r["image"] + ".xmp", {}).get("XMP-dc:Subject", [])
        got = got if isinstance(got, list) else [got]
        if [str(g) for g in got] != list(r["labels"]):
            failures.append(f"{r['image']}.xmp: exiftool reads {got}, the record has {list(r['labels'])}")
    print(f"  exiftool read {len(read)} sidecars; {len(tagged) - len(failures)} hold exactly the record's labels")
    return failures


def check_dupes(groups: list[dict], planted: dict[str, str]) -> list[str]:
    """Re-encodes qks-dupes missed are failures. Crops and half-size copies found, and groups that join
    different photos, are printed: how close a backbone puts a crop, and how far different photos,
    is the backbone's (the lite backbone puts some different scenes closer than a crop of one scene:
    RESULTS.md, "Image embeddings")."""
    group_of = {name: i for i, g in enumerate(groups) for name in g["images"]}
    found = {c for c, o in planted.items() if c in group_of and group_of[c] == group_of.get(o)}
    failures = [f"qks-dupes did not group {c} with {o}" for c, o in planted.items()
                if "_reencoded" in c and c not in found]
    counts = []
    for kind in ("reencoded", "cropped", "small"):
        copies = [c for c in planted if f"_{kind}." in c]
        counts.append(f"{kind} {len([c for c in copies if c in found])}/{len(copies)}")
    mixed = [g for g in groups if len({planted.get(n, n) for n in g["images"]}) > 1]
    print(f"  {len(groups)} groups; planted copies grouped with their original: {', '.join(counts)}; "
          f"{len(mixed)} groups join different photos")
    for g in mixed:
        print(f"  joins {len({planted.get(n, n) for n in g['images']})} different photos (cosine "
              f"{g['min_cosine']:.3f}-{g['max_cosine']:.3f}): {', '.join(sorted(g['images'])[:8])}"
              f"{' ...' if len(g['images']) > 8 else ''}")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.library_walkthrough", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="a bundle with the image embedding output")
    p.add_argument("--data", type=Path, required=True, help="scene folder: train.jsonl and test.jsonl (image + labels)")
    p.add_argument("--labels", type=Path, required=True, help="label file to tag with (stored as bank 'library')")
    p.add_argument("--out", type=Path, required=True, help="work folder (replaced)")
    p.add_argument("--library-size", type=int, default=60, help="test scenes in the library")
    p.add_argument("--calibration-size", type=int, default=300, help="training scenes to calibrate on")
    p.add_argument("--plant", type=int, default=4, help="photos given near-duplicates")
    p.add_argument("--add", type=int, default=5, help="photos added before the update run")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    library = out / "library"
    library.mkdir(parents=True)
    test = read_manifest(args.data / "test.jsonl")
    train = read_manifest(args.data / "train.jsonl")
    for r in test[:args.library_size]:
        shutil.copy(r["image"], library / Path(r["image"]).name)
    calib = out / "calibration.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in train[-args.calibration_size:]), encoding="utf-8")
    threads = ["--threads", args.threads]
    failures: list[str] = []

    print("== 1-2. the label bank and its thresholds")
    run("qks-labels", "--bundle", args.bundle, "--labels", args.labels, "--name", "library", *threads)
    # --floor-at-global: the per-label F1 rule alone let labels the model cannot rank flood the output
    # (micro F1 18.4 -> 8.2 on the scene benchmark; RESULTS.md, "Per-label thresholds")
    run("qks-calibrate", "--bundle", args.bundle, "--data", calib, "--bank", "library", "--floor-at-global",
        "--no-progress", *threads)

    print("== 3. near-duplicates planted")
    planted = plant_duplicates(library, sorted(library.iterdir())[:args.plant])
    print(f"  {len(planted)} copies of {args.plant} photos")

    print("== 4. tags, XMP sidecars, embeddings")
    tags, emb = out / "tags.jsonl", out / "embeddings.npy"
    infer = ["qks-infer", library, "--bundle", args.bundle, "--bank", "library", "--out", tags, "--xmp",
             "--embeddings", emb, "--no-progress", *threads]
    run(*infer)
    records = [json.loads(line) for line in tags.read_text(encoding="utf-8").splitlines()]
    failures += check_sidecars(library, records)

    print("== 5. near-duplicates")
    res = run("qks-dupes", emb)
    failures += check_dupes([json.loads(line) for line in res.stdout.splitlines() if line.strip()], planted)

    print("== 6. similar photos")
    first = records[0]["image"]
    for query in ([first], ["--text", "a photo of a dog"]):
        res = run("qks-similar", emb, *query, "-k", "3", "--format", "plain")
        print("  " + res.stdout.strip().replace("\n", "\n  "))

    print("== 7. photos added, an update run")
    added = train[:args.add]
    for r in added:
        shutil.copy(r["image"], library / f"added_{Path(r['image']).name}")
    res = run(*infer, "--update")
    want = f"{len(added)} images tagged (0 errors, {len(records)} unchanged, 0 removed)"
    if want not in res.stderr:
        failures.append(f"the update run did not say '{want}': {res.stderr.strip()[-300:]}")
    print(f"\nwalk-through: {time.perf_counter() - t0:.0f} s, {len(failures)} failed checks")
    for f in failures:
        print("FAILED: " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
