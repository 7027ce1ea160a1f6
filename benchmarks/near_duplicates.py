"""What cosine separates near-duplicates from different scenes: the measurement behind qks-dupes'
default threshold (qks.runtime.search.DUPES_THRESHOLD).

Scenes of real photo cut-outs (benchmarks/scenes.py, test split of a seed) are embedded with a bundle
(the image graph's `embedding` output, fp32 on ONNX Runtime CPU). For the first `--planted` scenes, copies
are made as a photo library gets them: JPEG re-encodes (quality 75 and 50), centred crops to 90 %, 85 % and
80 %, a half-size resize, and a crop to 85 % then half size. Reported:
- the cosine of each kind of copy with its original (min, 5th percentile, mean);
- the cosine of every pair of different scenes (max, 99.9th percentile, mean);
- per candidate threshold: the share of copies found (cosine >= t), the pairs of different scenes above
  it, and what connected components (qks-dupes' grouping) make of the whole set: groups that join two
  originals, copies left out of their original's group.

    python -m benchmarks.near_duplicates --bundle BUNDLE --scenes /tmp/qks-scenes-nd [--test 400 --planted 60]
    python -m benchmarks.near_duplicates --bundle BUNDLE --photos   # scikit-image's photos instead

Writes benchmarks/results/near_duplicates.{json,md} (near_duplicates_photos.* with --photos).
"""

from __future__ import annotations

import argparse
import io
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
# scikit-image's photos (its "cat" is "chelsea" again, so it is left out)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field",
          "immunohistochemistry", "retina", "page", "horse")
THRESHOLDS = (0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98)


def variants(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size

    def jpeg(im, q):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        buf.seek(0)
        return Image.open(buf).convert("RGB")

    def crop(im, f):
        dx, dy = int(w * (1 - f) / 2), int(h * (1 - f) / 2)
        return im.crop((dx, dy, w - dx, h - dy))

    return {"jpeg_q75": jpeg(img, 75), "jpeg_q50": jpeg(img, 50), "crop_90": crop(img, 0.90),
            "crop_85": crop(img, 0.85), "crop_80": crop(img, 0.80), "resize_50": img.resize((w // 2, h // 2), Image.BICUBIC),
            "crop_85_resize_50": crop(img, 0.85).resize((int(w * 0.85) // 2, int(h * 0.85) // 2), Image.BICUBIC)}


def embed(bundle, images: list[Image.Image], batch: int = 16) -> np.ndarray:
    from qks.runtime.backend import select_backend

    out_name = bundle.require_embedding()
    engine, _ = select_backend(bundle, "ort-cpu", precision="fp32")
    rows = []
    with engine:
        for i in range(0, len(images), batch):
            pixels = np.stack([bundle.preprocess(im) for im in images[i:i + batch]])
            rows.append(engine.run({"pixels": pixels})[out_name])
    return np.concatenate(rows)


def scene_images(scenes_dir: Path, test: int, seed: int) -> list[Image.Image]:
    from benchmarks.scenes import SceneConfig, ensure

    ensure(scenes_dir, SceneConfig(train_scenes=0, test_scenes=test, seed=seed))
    return [Image.open(f).convert("RGB") for f in sorted((scenes_dir / "images" / "test").glob("*.jpg"))[:test]]


def photo_images() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]


def measure(bundle_dir: Path, originals: list[Image.Image], planted: int, source: dict) -> dict:
    from qks.runtime.bundle import Bundle
    from qks.runtime.vectors import NumpyIndex, connected_groups

    bundle = Bundle.load(bundle_dir)
    copies, owner, kinds = [], [], []
    for i, img in enumerate(originals[:planted]):
        for kind, im in variants(img).items():
            copies.append(im)
            owner.append(i)
            kinds.append(kind)
    t = time.perf_counter()
    vec = embed(bundle, originals + copies)
    seconds = time.perf_counter() - t
    base, cop = vec[:len(originals)], vec[len(originals):]
    copy_cos = (cop * base[owner]).sum(axis=1)
    diff = base @ base.T
    iu = np.triu_indices(len(base), 1)
    diff_cos = diff[iu]
    per_kind = {}
    for kind in dict.fromkeys(kinds):
        c = copy_cos[[k == kind for k in kinds]]
        per_kind[kind] = {"min": float(c.min()), "p5": float(np.percentile(c, 5)), "mean": float(c.mean())}
    # every image's true group: its original's index
    truth = list(range(len(originals))) + owner
    sweep = []
    for th in THRESHOLDS:
        groups = connected_groups(len(vec), NumpyIndex(vec).pairs_above(th))
        mixed = sum(1 for rows, _, _ in groups if len({truth[r] for r in rows}) > 1)
        grouped = {r: g for g, (rows, _, _) in enumerate(groups) for r in rows}
        missed = sum(1 for j, o in enumerate(owner)
                     if grouped.get(len(originals) + j) is None or grouped.get(len(originals) + j) != grouped.get(o))
        sweep.append({"threshold": th, "copies_found": float((copy_cos >= th).mean()),
                      "different_pairs_above": int((diff_cos >= th).sum()), "groups": len(groups),
                      "groups_joining_originals": mixed, "copies_not_with_original": missed})
    return {"bundle": str(bundle_dir), "backbone": bundle.manifest["model"].get("backbone"),
            "embedding_dim": bundle.embedding_dim, "scenes": len(originals), "planted_from": planted,
            "copies": len(copies), "embed_seconds": round(seconds, 1), "copy_cosine": per_kind,
            "different_scenes": {"pairs": int(len(diff_cos)), "max": float(diff_cos.max()),
                                 "p99_9": float(np.percentile(diff_cos, 99.9)), "mean": float(diff_cos.mean())},
            "sweep": sweep, "machine": {"cpu": platform.processor() or platform.machine()}, "images": source}


def markdown(r: dict) -> str:
    lines = [f"Near-duplicates: {r['backbone']} embedding ({r['embedding_dim']}-d), {r['scenes']} {r['images']['kind']}, "
             f"{r['copies']} planted copies of {r['planted_from']}", "",
             "| copy | min cosine | 5th pct | mean |", "|---|---|---|---|"]
    for kind, c in r["copy_cosine"].items():
        lines.append(f"| {kind} | {c['min']:.4f} | {c['p5']:.4f} | {c['mean']:.4f} |")
    d = r["different_scenes"]
    lines += ["", f"Different {r['images']['kind']} ({d['pairs']} pairs): max {d['max']:.4f}, 99.9th pct {d['p99_9']:.4f}, "
              f"mean {d['mean']:.4f}", "",
              "| threshold | copies found | different pairs above | groups | groups joining 2 originals | "
              "copies not with their original |", "|---|---|---|---|---|---|"]
    for s in r["sweep"]:
        lines.append(f"| {s['threshold']:.2f} | {s['copies_found']:.1%} | {s['different_pairs_above']} | {s['groups']} | "
                     f"{s['groups_joining_originals']} | {s['copies_not_with_original']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.vector_search import write_results

    p = argparse.ArgumentParser(prog="python -m benchmarks.near_duplicates", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--scenes", type=Path, default=Path("/tmp/qks-scenes-nd"))
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--planted", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--photos", action="store_true", help="scikit-image's photos instead of scenes (all planted)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.photos:
        originals, source = photo_images(), {"kind": "photos", "names": list(PHOTOS)}
        a.planted = len(originals)
    else:
        originals = scene_images(a.scenes, a.test, a.seed)
        source = {"kind": "scenes", "seed": a.seed, "test_scenes": a.test}
    a.out = a.out or RESULTS / ("near_duplicates_photos" if a.photos else "near_duplicates")
    r = measure(a.bundle, originals, a.planted, source)
    write_results(a.out, r, markdown(r))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

