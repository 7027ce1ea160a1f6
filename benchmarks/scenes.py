"""Scenes of real photo cut-outs: the offline open-vocabulary benchmark (315 named concepts).

Source: Debian's `tuxpaint-stamps-default` (2022.06.04, GPL-2): photo cut-outs, most of them PNGs
with transparency, in folders by theme. `benchmarks/data/stamp_concepts.tsv` (curated by hand)
names the concept each photo stamp shows: 426 stamps of 315 concepts (animals, plants, food,
vehicles, tools, instruments, sports, household and seasonal objects, road signs, planets).
`make stamps` extracts the PNGs from the .deb into .cache/tuxpaint-stamps (no install, none of
the package's 200 MB of sounds).

A scene pastes 1-4 cut-outs of distinct concepts onto a background, at a random scale, position and
horizontal mirroring (not for the stamps Tux Paint marks `nomirror`, nor for signs, which carry text),
with limited overlap; its
labels are the concepts pasted, every other concept absent. Backgrounds: plain, a two-colour
gradient, smooth colour noise, or a photo texture from scikit-image (brick, grass, gravel), tinted.

Split, by seed: the concepts are split seen / unseen (`unseen_fraction`, about 1 in 4). Training
scenes hold seen concepts only. Test scenes hold at least one unseen concept each, beside seen
ones. Where a seen concept has several stamps, one of them is kept for the test scenes only (a new
photo of a trained concept). Everything is deterministic in the configuration.

The count trap (measured on the earlier mosaics): how many objects a scene holds says how likely it
is to hold an unseen one. Here the number of objects is uniform in [min, max] for both splits and
the number of unseen objects uniform in [1, n] given n, so the trap is smaller but not gone:
report ZSL F1@1 (is the first-ranked unseen label right?) beside ZSL mAP, with chance for both.

Output (under `out_dir`):
    images/train/000000.jpg ...  RGB JPEG (quality 92), `size` x `size`
    images/test/000000.jpg ...
    train.jsonl, test.jsonl      {"image": "images/test/000000.jpg", "labels": [...], "stamps": [...],
                                  "boxes": [[x0, y0, x1, y1], ...], "background": "plain"}
    seen.txt, unseen.txt, labels.txt (seen then unseen), scenes.json (configuration and counts)
`stamps` lists the stamp files pasted, in paste order, and `boxes` where each went; qks.data ignores
the extra keys.

CLI: `python -m benchmarks.scenes /tmp/qks-scenes --train 3000 --test 800 --seed 0`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONCEPTS_TSV = Path(__file__).resolve().parent / "data" / "stamp_concepts.tsv"
STAMPS_ENV = "QKS_STAMPS"
DEFAULT_STAMPS = ROOT / ".cache" / "tuxpaint-stamps"
SYSTEM_STAMPS = Path("/usr/share/tuxpaint/stamps")  # where `apt-get install tuxpaint-stamps-default` puts them
BACKGROUNDS = ("plain", "gradient", "noise", "texture")


class StampsUnavailable(RuntimeError):
    """The stamp photos are not installed; the message says how to get them."""


@dataclass
class SceneConfig:
    train_scenes: int = 3000
    test_scenes: int = 800
    unseen_fraction: float = 0.25  # of the concepts, never in a training scene
    seed: int = 0
    size: int = 224  # scene width and height in pixels
    min_objects: int = 1
    max_objects: int = 4
    scale: tuple[float, float] = (0.30, 0.55)  # an object's longer side, as a fraction of `size`
    max_overlap: float = 0.25  # at most this fraction of either object's box may be covered
    concepts: int | None = None  # use only this many seen concepts (a learning curve), None = all


@dataclass(frozen=True)
class Stamp:
    path: Path
    concept: str
    flip: bool  # whether it may be mirrored horizontally


def stamps_dir(explicit: str | Path | None = None) -> Path:
    """The folder of the extracted stamps: explicit, $QKS_STAMPS, .cache/tuxpaint-stamps, or the
    system's installed package."""
    for cand in (explicit, os.environ.get(STAMPS_ENV), DEFAULT_STAMPS, SYSTEM_STAMPS):
        if cand and (Path(cand) / "animals").is_dir():
            return Path(cand)
    raise StampsUnavailable("the tuxpaint-stamps-default photos are not installed: run `make stamps` "
                            f"(extracts them into {DEFAULT_STAMPS}) or set {STAMPS_ENV}")


def read_concepts(tsv: Path = CONCEPTS_TSV) -> list[tuple[str, str]]:
    """(stamp name without .png, concept) per curated line."""
    rows = []
    for n, line in enumerate(tsv.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, concept = line.partition("\t")
        if not sep or not concept.strip():
            raise ValueError(f"{tsv}:{n}: expected 'stamp<TAB>concept'")
        rows.append((name.strip(), concept.strip()))
    return rows


def load_stamps(root: Path) -> list[Stamp]:
    stamps = []
    for name, concept in read_concepts():
        png = root / f"{name}.png"
        if not png.is_file():
            raise StampsUnavailable(f"{png} is missing: the stamps under {root} are not "
                                    "tuxpaint-stamps-default 2022.06.04 (run `make stamps`)")
        dat = png.with_suffix(".dat")
        # Tux Paint's `nomirror` (its `noflip` is about upside-down flips); signs carry text.
        nomirror = dat.is_file() and "nomirror" in dat.read_text(encoding="utf-8", errors="replace").split()
        stamps.append(Stamp(png, concept, flip=not (nomirror or concept.endswith(" sign"))))
    return stamps


# ---- the split ---------------------------------------------------------------------------------

@dataclass
class Split:
    seen: list[str]  # trained on (all seen concepts, or a subset for a learning curve)
    unseen: list[str]
    test_seen: list[str]  # the seen concepts test scenes draw from: all of them, whatever `concepts` is
    train_stamps: dict[str, list[Stamp]]  # seen concept -> stamps for training scenes
    test_stamps: dict[str, list[Stamp]]  # every concept -> stamps for test scenes


def split_concepts(stamps: list[Stamp], cfg: SceneConfig, rng: np.random.Generator) -> Split:
    by_concept: dict[str, list[Stamp]] = {}
    for s in stamps:
        by_concept.setdefault(s.concept, []).append(s)
    concepts = sorted(by_concept)
    order = rng.permutation(len(concepts))
    n_unseen = max(1, round(cfg.unseen_fraction * len(concepts)))
    unseen = sorted(concepts[i] for i in order[:n_unseen])
    seen = sorted(concepts[i] for i in order[n_unseen:])
    train, test = {}, {}
    for c in seen:
        group = by_concept[c]
        held = int(rng.integers(len(group))) if len(group) > 1 else None
        train[c] = [s for i, s in enumerate(group) if i != held]
        test[c] = [group[held]] if held is not None else list(group)
    for c in unseen:
        test[c] = list(by_concept[c])
    trained = seen
    if cfg.concepts is not None:  # a learning curve: fewer seen concepts, the same unseen ones and test scenes
        keep = rng.permutation(len(seen))[:cfg.concepts]
        trained = sorted(seen[i] for i in keep)
    return Split(trained, unseen, seen, {c: train[c] for c in trained}, test)


# ---- drawing -----------------------------------------------------------------------------------

def _textures() -> list[np.ndarray]:
    """Photo textures shipped with scikit-image (grayscale, 512 x 512); none if it is missing."""
    try:
        from skimage import data
    except ImportError:
        return []
    return [data.brick(), data.grass(), data.gravel()]


def background(kind: str, size: int, rng: np.random.Generator, textures: list[np.ndarray]) -> np.ndarray:
    """[size, size, 3] float32 in [0, 255]."""
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if kind == "plain":
        return np.broadcast_to(c1, (size, size, 3)).astype(np.float32)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:size, 0:size] / (size - 1)
        t = (np.cos(angle) * x + np.sin(angle) * y)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        return (c1 * (1 - t[..., None]) + c2 * t[..., None]).astype(np.float32)
    if kind == "noise":  # smooth colour noise: a coarse random grid, upsampled bilinearly
        from PIL import Image
        cells = int(rng.integers(3, 9))
        grid = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), dtype=np.float32)
    if kind == "texture" and textures:
        from PIL import Image
        tex = textures[int(rng.integers(len(textures)))]
        crop = int(rng.integers(size, tex.shape[0] + 1))
        y, x = rng.integers(0, tex.shape[0] - crop + 1, 2)
        patch = Image.fromarray(tex[y:y + crop, x:x + crop]).resize((size, size), Image.BILINEAR)
        gray = np.asarray(patch, dtype=np.float32)[..., None] / 255.0
        return (gray * (0.4 * c1 + 0.6 * 255.0)).clip(0, 255).astype(np.float32)
    return background("noise", size, rng, textures)


def _cutout(stamp: Stamp, longer: int, flip: bool):
    """The stamp as an RGBA Pillow image whose longer side is `longer` pixels."""
    from PIL import Image, ImageOps

    with Image.open(stamp.path) as im:
        im = im.convert("RGBA")
    box = im.getchannel("A").getbbox()  # trim transparent margins: the object fills its box
    if box:
        im = im.crop(box)
    w, h = im.size
    scale = longer / max(w, h)
    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    return ImageOps.mirror(im) if flip else im


def _overlap_ok(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]], limit: float) -> bool:
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in boxes:
        iw, ih = min(x1, a1) - max(x0, a0), min(y1, b1) - max(y0, b0)
        if iw > 0 and ih > 0:
            inter = iw * ih
            if inter > limit * (x1 - x0) * (y1 - y0) or inter > limit * (a1 - a0) * (b1 - b0):
                return False
    return True


def compose(stamps: list[Stamp], cfg: SceneConfig, rng: np.random.Generator, textures: list[np.ndarray]):
    """One scene: (RGB Pillow image, the stamps actually placed, their boxes, the background kind). A
    stamp that finds no place within the overlap limit after 50 tries is left out (rare: 4 objects at
    the largest scale)."""
    from PIL import Image

    size = cfg.size
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    canvas = Image.fromarray(background(kind, size, rng, textures).astype(np.uint8)).convert("RGBA")
    boxes, placed = [], []
    for stamp in stamps:
        longer = int(rng.uniform(*cfg.scale) * size)
        cut = _cutout(stamp, longer, flip=stamp.flip and rng.random() < 0.5)
        w, h = cut.size
        for _ in range(50):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            if _overlap_ok((x, y, x + w, y + h), boxes, cfg.max_overlap):
                canvas.alpha_composite(cut, (x, y))
                boxes.append((x, y, x + w, y + h))
                placed.append(stamp)
                break
    return canvas.convert("RGB"), placed, boxes, kind


def _pick(pool: dict[str, list[Stamp]], concepts: list[str], rng: np.random.Generator) -> list[Stamp]:
    return [pool[c][int(rng.integers(len(pool[c])))] for c in concepts]


def scene_concepts(split: Split, cfg: SceneConfig, test: bool, rng: np.random.Generator) -> list[str]:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    if not test:
        return [split.seen[i] for i in rng.choice(len(split.seen), size=min(n, len(split.seen)), replace=False)]
    k = int(rng.integers(1, n + 1))  # unseen objects: at least one
    k = min(k, len(split.unseen))
    unseen = [split.unseen[i] for i in rng.choice(len(split.unseen), size=k, replace=False)]
    pool = split.test_seen
    seen = [pool[i] for i in rng.choice(len(pool), size=min(n - k, len(pool)), replace=False)]
    both = unseen + seen
    return [both[i] for i in rng.permutation(len(both))]


# ---- the whole split ---------------------------------------------------------------------------

def generate(out_dir: Path, cfg: SceneConfig, stamps_root: str | Path | None = None, progress: bool = True) -> dict:
    """Write the scenes, manifests and label lists under `out_dir`; returns scenes.json's content."""
    from tqdm import tqdm

    root = stamps_dir(stamps_root)
    stamps = load_stamps(root)
    rng = np.random.default_rng(cfg.seed)
    split = split_concepts(stamps, cfg, rng)
    textures = _textures()
    known = set(split.seen) | set(split.unseen)
    out_dir = Path(out_dir)
    counts = {}
    for name, n, test in (("train", cfg.train_scenes, False), ("test", cfg.test_scenes, True)):
        img_dir = out_dir / "images" / name
        img_dir.mkdir(parents=True, exist_ok=True)
        pool = split.test_stamps if test else split.train_stamps
        lines, objects = [], 0
        for i in tqdm(range(n), desc=f"{name} scenes", unit="scene", disable=not progress):
            scene_rng = np.random.default_rng([cfg.seed, int(test), i])
            image, placed, boxes, kind = compose(_pick(pool, scene_concepts(split, cfg, test, scene_rng), scene_rng),
                                                 cfg, scene_rng, textures)
            if test and not any(s.concept in split.unseen for s in placed):
                # The unseen object found no place (rare): paste it alone on a fresh background.
                image, placed, boxes, kind = compose(
                    _pick(pool, [split.unseen[int(scene_rng.integers(len(split.unseen)))]], scene_rng),
                    cfg, scene_rng, textures)
            rel = f"images/{name}/{i:06d}.jpg"
            image.save(out_dir / rel, quality=92)
            objects += len(placed)
            # Labels: the concepts of this split's label set (a learning curve's test scenes also hold
            # seen concepts it does not train: unannotated objects, like any tagger meets).
            lines.append(json.dumps({"image": rel, "labels": sorted({s.concept for s in placed} & known),
                                     "stamps": [str(s.path.relative_to(root)) for s in placed],
                                     "boxes": [list(b) for b in boxes], "background": kind}))
        (out_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[name] = {"scenes": n, "objects": objects}
    (out_dir / "seen.txt").write_text("\n".join(split.seen) + "\n", encoding="utf-8")
    (out_dir / "unseen.txt").write_text("\n".join(split.unseen) + "\n", encoding="utf-8")
    (out_dir / "labels.txt").write_text("\n".join(split.seen + split.unseen) + "\n", encoding="utf-8")
    info = {"config": asdict(cfg), "stamps": str(root), "concepts": len(split.seen) + len(split.unseen),
            "seen": len(split.seen), "unseen": len(split.unseen), "counts": counts,
            "source": "tuxpaint-stamps-default 2022.06.04 (Debian, GPL-2); concepts: benchmarks/data/stamp_concepts.tsv"}
    (out_dir / "scenes.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def ensure(out_dir: Path, cfg: SceneConfig, stamps_root: str | Path | None = None, log=print,
           progress: bool | None = None) -> dict:
    """Reuse the split under `out_dir` when it was generated with this configuration, else generate it."""
    meta = Path(out_dir) / "scenes.json"
    if meta.is_file():
        info = json.loads(meta.read_text(encoding="utf-8"))
        if info.get("config") == json.loads(json.dumps(asdict(cfg))):
            log(f"[data] reusing the scenes under {out_dir}")
            return info
    log(f"[data] generating {cfg.train_scenes} training and {cfg.test_scenes} test scenes under {out_dir}")
    return generate(out_dir, cfg, stamps_root, progress=sys.stderr.isatty() if progress is None else progress)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scenes", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (outside the repository)")
    p.add_argument("--train", type=int, default=SceneConfig.train_scenes, help="training scenes (default %(default)s)")
    p.add_argument("--test", type=int, default=SceneConfig.test_scenes, help="test scenes (default %(default)s)")
    p.add_argument("--unseen-fraction", type=float, default=SceneConfig.unseen_fraction)
    p.add_argument("--concepts", type=int, default=None, help="keep only this many seen concepts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stamps", type=Path, default=None, help=f"extracted stamps (default ${STAMPS_ENV} or {DEFAULT_STAMPS})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 < args.unseen_fraction < 1:
        print("error: --unseen-fraction must be in (0, 1)", file=sys.stderr)
        return 2
    cfg = SceneConfig(train_scenes=args.train, test_scenes=args.test, unseen_fraction=args.unseen_fraction,
                      concepts=args.concepts, seed=args.seed)
    try:
        info = generate(args.out, cfg, args.stamps)
    except StampsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: info[k] for k in ("concepts", "seen", "unseen", "counts")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
