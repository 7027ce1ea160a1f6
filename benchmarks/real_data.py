"""Real images, open vocabulary: QKS against its baselines on Fashion-/Animal-MNIST mosaics, and the
deployed bundle against PyTorch, in one run.

On a mosaic split (benchmarks/mosaic.py; generated under --data if missing, reused otherwise):

1. zero-shot   the `lite` backbone's own scoring with no trained head (benchmarks.lite_zero_shot:
               max over locations of token . label embedding);
2. projection  a projection-only head (`qks-train --layers 0`): no queries, no decoder; every image
               token goes through the head's projection (C -> D, initialised to the identity) and
               each label takes its best token; trained like QKS;
3. QKS         `qks.train.train` (what `qks-train --backbone lite --cached-tokens` runs) on the
               training split, scored by `qks.evaluate.evaluate` (what `qks-eval` runs) on the test
               split, images through the backbone (no cached tokens at test time);
4. bundle      `qks-export` of QKS's best.pt, then `qks-infer --all-scores` (the torch-free runtime,
               ONNX Runtime CPU, fp32 graph) over the test images with labels.txt; the metrics are
               recomputed from the probabilities it wrote, beside PyTorch's.

Metrics (qks.metrics, percent): ZSL (the unseen labels, images with an unseen item) mAP and F1@1,
F1@3; GZSL (all labels, all images) mAP and F1@3, F1@5; seen mAP (the seen labels on all test
images). Chance: the mean of the same metrics over 200 draws of uniformly random scores on the
same images. Time per stage. Writes JSON and a markdown table.

    python -m benchmarks.real_data --data /tmp/qks-mosaic --work /tmp/qks-real-data \\
        --json benchmarks/results/real_data.json --markdown benchmarks/results/real_data.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Chosen from the measurements in benchmarks/RESULTS.md ("Real data" section).
DEFAULTS = {"epochs": 15, "lr": 3e-4, "layers": 2, "queries": 12, "ffn": 1536, "loss": "asl", "batch_size": 16,
            "proj_lr": 1e-3}
METRICS = ["zsl_map", "zsl_f1@1", "zsl_f1@3", "gzsl_map", "gzsl_f1@3", "gzsl_f1@5", "seen_map"]
METHODS = ["zero_shot", "projection_only", "qks_pytorch", "qks_bundle"]
NAMES = {"chance": "chance (random scores)", "zero_shot": "zero-shot lite backbone (no head)",
         "projection_only": "projection-only head (trained)", "qks_pytorch": "QKS (PyTorch, qks-eval)",
         "qks_bundle": "QKS (bundle, qks-infer ORT CPU)"}


def _targets(data: Path) -> tuple[list[str], list[str], list, np.ndarray, np.ndarray]:
    from qks.data import read_label_lists, read_manifest

    seen, unseen = read_label_lists(data / "seen.txt", data / "unseen.txt")
    labels = seen + unseen
    samples = read_manifest(data / "test.jsonl", labels).samples
    index = {n: j for j, n in enumerate(labels)}
    targets = np.stack([s.targets(index) for s in samples])
    unseen_mask = np.array([n in set(unseen) for n in labels])
    return seen, unseen, samples, targets, unseen_mask


def metrics(scores: np.ndarray, targets: np.ndarray, unseen_mask: np.ndarray) -> dict:
    """The table's metrics (percent) of one method's scores [images, labels]."""
    from benchmarks.lite_zero_shot import GZSL_K, ZSL_K, _summary
    from qks.metrics import gzsl_selection, mean_average_precision, zsl_gzsl_report

    out = _summary(zsl_gzsl_report(scores, targets, unseen_mask, topk=ZSL_K + GZSL_K))
    images, _ = gzsl_selection(targets)
    seen_cols = np.flatnonzero(~unseen_mask)
    out["seen_map"] = 100 * mean_average_precision(scores[np.ix_(images, seen_cols)],
                                                   targets[np.ix_(images, seen_cols)]).map
    return out


def chance_metrics(targets: np.ndarray, unseen_mask: np.ndarray, draws: int = 200, seed: int = 0) -> dict:
    """lite_zero_shot.chance (same draws) plus the seen-label mAP of random scores."""
    from benchmarks.lite_zero_shot import chance

    out = chance(targets, unseen_mask, draws=draws, seed=seed)
    rng = np.random.default_rng(seed)
    out["seen_map"] = float(np.mean([metrics(rng.random(targets.shape), targets, unseen_mask)["seen_map"]
                                     for _ in range(max(1, draws // 4))]))
    return out


def _seed_tokens(src: Path | None, run_dir: Path) -> None:
    """Reuse the training tokens another run of the same manifest cached (cache_tokens checks its key)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if src is not None and (src / "tokens.json").is_file():
        for name in ("tokens.npy", "tokens.json"):
            target = run_dir / name
            target.unlink(missing_ok=True)
            try:
                os.link(src / name, target)
            except OSError:
                shutil.copyfile(src / name, target)


def zero_shot_scores(samples: list, labels: list[str], cache_dir: Path) -> np.ndarray:
    """[images, labels]: the backbone's own scores, through lite_zero_shot's functions (the `lite`
    defaults, max over the 7 x 7 locations: the numbers lite_zero_shot reports for `lite [max]`)."""
    from benchmarks.lite_zero_shot import location_features, variant_scores
    from qks.backbones import create_backbone
    from qks.prompts import LabelEmbedder, load_prompts

    feats = location_features(create_backbone("lite:global"), [s.path for s in samples])
    backbone = create_backbone("lite")
    label_emb = LabelEmbedder(backbone, load_prompts("default"), cache_dir=cache_dir)(labels)
    return variant_scores(backbone, feats, label_emb, "max")


def train_and_eval(data: Path, run_dir: Path, args, layers: int, queries: int, ffn: int, lr: float,
                   tokens_from: Path | None, log) -> tuple[np.ndarray, dict, dict]:
    """qks-train (cached tokens) then qks-eval on the test split: (logits, eval report, timings)."""
    from qks.evaluate import evaluate
    from qks.train import TrainOptions, train

    # A rerun keeps the tokens its previous run cached (qks.train.cache_tokens reuses them only
    # when its key - manifest, backbone weights, preprocessing - still matches).
    kept = run_dir.parent / (run_dir.name + ".tokens")
    reused = (run_dir / "tokens.json").is_file()
    if reused:
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir(parents=True)
        for name in ("tokens.npy", "tokens.json"):
            os.replace(run_dir / name, kept / name)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    _seed_tokens(kept if reused else tokens_from, run_dir)
    shutil.rmtree(kept, ignore_errors=True)
    t0 = time.perf_counter()
    options = TrainOptions(
        data=str(data / "train.jsonl"), seen=str(data / "seen.txt"), unseen=str(data / "unseen.txt"),
        out=str(run_dir), backbone="lite", layers=layers, queries=queries, ffn=ffn, epochs=args.epochs, lr=lr,
        loss=args.loss, batch_size=args.batch_size, cached_tokens=True, device="cpu", workers=args.workers,
        seed=args.seed, val_fraction=args.val_fraction)
    summary = train(options, progress=False, log=lambda m: log(f"    {m}"))
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate(run_dir / "best.pt", data / "test.jsonl", seen=data / "seen.txt", unseen=data / "unseen.txt",
                      topk=(1, 3, 5), device="cpu", workers=args.workers, batch_size=32)
    t_eval = time.perf_counter() - t0
    best = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    best_epoch = max((r for r in best if r.get("val_score") is not None), key=lambda r: r["val_score"],
                     default={"epoch": len(best)})["epoch"]
    return result.logits, result.report, {"tokens_reused": reused or tokens_from is not None, "train_s": t_train, "eval_s": t_eval, "best_epoch": best_epoch,
                                          "epochs": summary.get("epoch"), "best_val_score": summary.get("best_score")}


def _tool(name: str) -> str:
    """The console script installed beside this interpreter (the venv's), else on PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def export_and_infer(data: Path, ckpt: Path, work: Path, samples: list, labels: list[str], threads: int,
                     log) -> tuple[np.ndarray, dict]:
    """qks-export, then qks-infer --all-scores over the test images: (probabilities [images, labels], info)."""
    bundle, preds = work / "bundle", work / "bundle_predictions.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    cmd = [_tool("qks-export"), "--ckpt", str(ckpt), "--out", str(bundle), "-q"]
    log("    $ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)
    t_export = time.perf_counter() - t0
    images_dir = data / "images" / "test"
    cmd = [_tool("qks-infer"), str(images_dir), "--bundle", str(bundle), "--labels", str(data / "labels.txt"),
           "--all-scores", "--backend", "ort-cpu", "--precision", "fp32", "--threads", str(threads),
           "--workers", "1", "--batch-size", "16", "--out", str(preds), "--overwrite", "--no-progress"]
    log("    $ " + " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    t_infer = time.perf_counter() - t0
    by_name = {}
    for line in preds.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "error" in rec:
            raise RuntimeError(f"qks-infer failed on {rec['image']}: {rec['error']}")
        by_name[Path(rec["image"]).name] = rec["scores"]
    missing = [s.path for s in samples if Path(s.path).name not in by_name]
    if missing:
        raise RuntimeError(f"qks-infer wrote no scores for {len(missing)} test image(s), e.g. {missing[0]}")
    probs = np.array([[by_name[Path(s.path).name][n] for n in labels] for s in samples], dtype=np.float64)
    return probs, {"export_s": t_export, "infer_s": t_infer, "bundle": str(bundle), "predictions": str(preds)}


def run(args, log=print) -> dict:
    import torch

    from benchmarks.mosaic import MosaicConfig, generate

    torch.set_num_threads(args.threads)
    data, work = args.data, args.work
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    if not (data / "test.jsonl").is_file():
        log(f"[data] generating the mosaic split under {data}")
        cfg = MosaicConfig(train_images=args.train, test_images=args.test, num_unseen=args.num_unseen,
                           seed=args.seed)
        generate(data, cfg)
    else:
        log(f"[data] reusing {data}")
    times["data"] = time.perf_counter() - t0
    mosaic = json.loads((data / "mosaic.json").read_text())
    seen, unseen, samples, targets, unseen_mask = _targets(data)
    labels = seen + unseen
    work.mkdir(parents=True, exist_ok=True)

    log("[chance] random scores on the same images")
    t0 = time.perf_counter()
    rows = {"chance": chance_metrics(targets, unseen_mask, draws=args.chance_draws)}
    times["chance"] = time.perf_counter() - t0

    log("[zero-shot] lite backbone, no head (benchmarks.lite_zero_shot's scoring, max over locations)")
    t0 = time.perf_counter()
    rows["zero_shot"] = metrics(zero_shot_scores(samples, labels, work / "label_cache"), targets, unseen_mask)
    times["zero_shot"] = time.perf_counter() - t0

    log(f"[qks] qks-train --backbone lite --cached-tokens (L={args.layers}, Nq={args.queries}, ffn={args.ffn}, "
        f"lr {args.lr}, {args.epochs} epochs, {args.loss}), then qks-eval")
    qks_logits, qks_report, qks_t = train_and_eval(data, work / "run_qks", args, args.layers, args.queries,
                                                   args.ffn, args.lr, None, log)
    rows["qks_pytorch"] = metrics(qks_logits, targets, unseen_mask)
    times["qks_train"], times["qks_eval"] = qks_t["train_s"], qks_t["eval_s"]

    log(f"[projection-only] no query layers, tokens @ projection (lr {args.proj_lr}), trained the same way")
    proj_logits, _, proj_t = train_and_eval(data, work / "run_projection", args, 0, 1, args.ffn, args.proj_lr,
                                            work / "run_qks", log)
    rows["projection_only"] = metrics(proj_logits, targets, unseen_mask)
    times["projection_train"], times["projection_eval"] = proj_t["train_s"], proj_t["eval_s"]

    log("[bundle] qks-export, qks-infer --all-scores, metrics from its output")
    probs, info = export_and_infer(data, work / "run_qks" / "best.pt", work, samples, labels, args.threads, log)
    rows["qks_bundle"] = metrics(probs, targets, unseen_mask)
    times["export"], times["infer"] = info["export_s"], info["infer_s"]
    torch_probs = 1.0 / (1.0 + np.exp(-qks_logits.astype(np.float64)))
    parity = {
        "max_abs_probability_diff": float(np.abs(torch_probs - probs).max()),
        "max_abs_metric_diff": max(abs(rows["qks_bundle"][k] - rows["qks_pytorch"][k]) for k in METRICS),
        "top1_agreement": float((torch_probs.argmax(1) == probs.argmax(1)).mean()),
    }
    times["total"] = time.perf_counter() - t_all

    return {
        "benchmark": "real_data", "data": str(data), "mosaic": mosaic["config"],
        "test_images": len(samples), "zsl_images": int(rows["chance"]["zsl_images"]),
        "gzsl_images": int(rows["chance"]["gzsl_images"]), "seen": seen, "unseen": unseen,
        "settings": {"backbone": "lite", "layers": args.layers, "queries": args.queries, "ffn": args.ffn,
                     "lr": args.lr, "projection_lr": args.proj_lr, "epochs": args.epochs, "loss": args.loss,
                     "batch_size": args.batch_size, "val_fraction": args.val_fraction, "seed": args.seed,
                     "threads": args.threads, "cached_tokens": True,
                     "bundle_runtime": "qks-infer --backend ort-cpu --precision fp32 --all-scores"},
        "training": {"qks": qks_t, "projection_only": proj_t},
        "units": "percent; mAP counts a label with no positive as 0",
        "metrics": {m: {k: round(float(v), 4) for k, v in rows[m].items()} for m in ["chance", *METHODS]},
        "parity": parity, "seconds": {k: round(v, 1) for k, v in times.items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "qks_eval_report": qks_report,
    }


def markdown(r: dict) -> str:
    cols = ["ZSL mAP", "ZSL F1@1", "ZSL F1@3", "GZSL mAP", "GZSL F1@3", "GZSL F1@5", "seen mAP", "time"]
    s = r["seconds"]
    time_of = {"chance": f"{s['chance']:.0f} s", "zero_shot": f"{s['zero_shot']:.0f} s",
               "projection_only": f"{s['projection_train']:.0f} s train + {s['projection_eval']:.0f} s eval",
               "qks_pytorch": f"{s['qks_train']:.0f} s train + {s['qks_eval']:.0f} s eval",
               "qks_bundle": f"{s['export']:.0f} s export + {s['infer']:.0f} s infer"}
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in ["chance", *METHODS]:
        row = r["metrics"][m]
        cells = [("-" if row.get(k) is None else f"{row[k]:.1f}") for k in METRICS]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + f" | {time_of[m]} |")
    st, p = r["settings"], r["parity"]
    lines.append("")
    lines.append(f"{r['test_images']} test images ({r['zsl_images']} in ZSL, {len(r['unseen'])} unseen labels: "
                 f"{', '.join(r['unseen'])}; GZSL {r['gzsl_images']} images, {len(r['seen']) + len(r['unseen'])} "
                 f"labels); QKS head L={st['layers']}, Nq={st['queries']}, FFN {st['ffn']}, lr {st['lr']}, "
                 f"{st['epochs']} epochs, {st['loss']}; projection-only lr {st['projection_lr']}. "
                 f"Bundle vs PyTorch: max |metric diff| {p['max_abs_metric_diff']:.2g} points, max |prob diff| "
                 f"{p['max_abs_probability_diff']:.2g}, top-1 agreement {100 * p['top1_agreement']:.1f} %. "
                 f"Total {s['total']:.0f} s on {r['machine']['cpus']} CPUs, {st['threads']} thread(s).")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/qks-mosaic"),
                   help="mosaic split (benchmarks.mosaic); generated if missing (default %(default)s)")
    p.add_argument("--train", type=int, default=2000, help="training mosaics when generating (default %(default)s)")
    p.add_argument("--test", type=int, default=1000, help="test mosaics when generating (default %(default)s)")
    p.add_argument("--num-unseen", type=int, default=6, help="unseen classes when generating (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data split and training seed (default %(default)s)")
    p.add_argument("--work", type=Path, default=Path("/tmp/qks-real-data"),
                   help="run directories, bundle and predictions (default %(default)s)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="QKS learning rate (default %(default)s)")
    p.add_argument("--proj-lr", type=float, default=DEFAULTS["proj_lr"],
                   help="projection-only learning rate (default %(default)s)")
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"], help="QKS head layers L (default %(default)s)")
    p.add_argument("--queries", type=int, default=DEFAULTS["queries"], help="query tokens Nq (default %(default)s)")
    p.add_argument("--ffn", type=int, default=DEFAULTS["ffn"], help="head FFN width (default %(default)s)")
    p.add_argument("--loss", default=DEFAULTS["loss"], help="training loss (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads (default 1: fastest on "
                   "the 2-core machine)")
    p.add_argument("--workers", type=int, default=1, help="image-loading workers (default %(default)s)")
    p.add_argument("--chance-draws", type=int, default=200)
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as markdown here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    results = run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    table = markdown(results)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
