"""Per-label thresholds against one global threshold on the scene benchmark (issue 22, item 1).

1. scenes (benchmarks/scenes.py, seed 0): --train + --calib training scenes (seen concepts only) and
   --test test scenes (each holds at least one unseen concept);
2. `qks-train --backbone lite --cached-tokens` on the first --train training scenes only (the demo's
   head and defaults), `qks-export` (its bank "default" holds the seen AND the unseen labels);
3. `qks-calibrate` on the other --calib training scenes, held out from training (scenes the head never
   saw, composed from the same pool of training cut-outs; the test scenes use other photos of the
   concepts): per-label F1-optimal thresholds, the same with --floor-at-global, and the lowest
   thresholds reaching precision 0.9. The unseen labels have no positive there (they never appear in
   a training scene), so they fall back to the global rule: the best single threshold for the sample;
4. `qks-infer --all-scores` (bank default) over the test scenes, then each selection rule applied to the
   same probabilities: 0.5 (qks-infer's default), the best global threshold fitted on the calibration
   scenes (what the fallback uses), the three per-label fits, and, for reference only, the global
   threshold that is best on the test scenes themselves (an oracle: it looks at the answers).

Metrics (percent): micro F1 (pooled true/false positives) and macro F1 (the mean over labels with at
least one positive in the test scenes), on all labels, the seen labels and the unseen labels, plus
the mean number of labels kept per image.

Steps 1-2 are cached under --work (reused when present: the bundle is trained once).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m benchmarks.thresholds --work .cache/thresholds \\
        --json benchmarks/results/thresholds.json --markdown benchmarks/results/thresholds.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.demo import _run  # prints the command, runs it, returns its seconds

ROOT = Path(__file__).resolve().parent.parent


def _env(threads: int) -> dict:
    t = str(threads)
    return {**os.environ, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def prepare(work: Path, n_train: int, n_calib: int, n_test: int, epochs: int, threads: int) -> dict:
    """Scenes, the fit/calibration split of the training scenes, and the bundle (each reused if present)."""
    from benchmarks.real_data import DEFAULTS, console_script
    from benchmarks.scenes import SceneConfig, ensure

    env, times = _env(threads), {}
    data, run, bundle, cache = work / "data", work / "run", work / "bundle", work / "label_cache"
    t0 = time.perf_counter()
    ensure(data, SceneConfig(train_scenes=n_train + n_calib, test_scenes=n_test, seed=0), log=print)
    lines = (data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (data / "fit.jsonl").write_text("\n".join(lines[:n_train]) + "\n", encoding="utf-8")
    (data / "calib.jsonl").write_text("\n".join(lines[n_train:]) + "\n", encoding="utf-8")
    times["data"] = time.perf_counter() - t0
    if not (run / "best.pt").is_file():
        times["train"] = _run([
            console_script("qks-train"), "--data", str(data / "fit.jsonl"), "--seen", str(data / "seen.txt"),
            "--unseen", str(data / "unseen.txt"), "--backbone", "lite", "--cached-tokens", "--out", str(run),
            "--layers", str(DEFAULTS["layers"]), "--queries", str(DEFAULTS["queries"]), "--ffn", str(DEFAULTS["ffn"]),
            "--lr", str(DEFAULTS["lr"]), "--epochs", str(epochs), "--batch-size", str(DEFAULTS["batch_size"]),
            "--device", "cpu", "--workers", "1", "--threads", str(threads), "--label-cache", str(cache), "--quiet"], env)
    if not (bundle / "manifest.json").is_file():  # its bank "default": the seen + unseen labels
        times["export"] = _run([console_script("qks-export"), "--ckpt", str(run / "best.pt"), "--out", str(bundle),
                                "--label-cache", str(cache), "-q"], env)
    return times


# -- evaluation ----------------------------------------------------------------------------------

def counts(probs: np.ndarray, targets: np.ndarray, thr) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label true positives, false positives, false negatives of the selection p >= thr."""
    kept, pos = probs >= np.asarray(thr, dtype=np.float32), targets > 0
    return (kept & pos).sum(0), (kept & ~pos).sum(0), (~kept & pos).sum(0)


def f1_scores(probs: np.ndarray, targets: np.ndarray, thr, cols: np.ndarray) -> dict:
    """Micro F1 (pooled counts) and macro F1 (mean over labels with a positive) over the columns `cols`, percent."""
    tp, fp, fn = (c[cols] for c in counts(probs, targets, thr))
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
    has = (tp + fn) > 0
    macro = float(np.mean(2 * tp[has] / np.maximum(2 * tp[has] + fp[has] + fn[has], 1))) if has.any() else 0.0
    return {"micro_f1": round(100 * float(micro), 2), "macro_f1": round(100 * macro, 2), "labels": int(has.sum())}


def oracle_global(probs: np.ndarray, targets: np.ndarray) -> float:
    """The single threshold with the best micro F1 on these very scenes (an upper bound for a global rule)."""
    from qks.runtime.thresholds import Target, global_threshold

    return global_threshold(probs, targets, Target("f1"))


def evaluate(probs: np.ndarray, targets: np.ndarray, unseen: np.ndarray, rules: dict) -> dict:
    groups = {"all": np.arange(probs.shape[1]), "seen": np.flatnonzero(~unseen), "unseen": np.flatnonzero(unseen)}
    out = {}
    for name, thr in rules.items():
        row = {g: f1_scores(probs, targets, thr, cols) for g, cols in groups.items()}
        row["labels_per_image"] = round(float((probs >= np.asarray(thr, dtype=np.float32)).sum(1).mean()), 2)
        out[name] = row
    return out


def calibrate(bundle: Path, data: Path, target: str, env: dict, threads: int, *extra: str) -> tuple[dict, float]:
    from benchmarks.real_data import console_script

    secs = _run([console_script("qks-calibrate"), "--bundle", str(bundle), "--data", str(data), "--bank", "default",
                 "--target", target, "--backend", "ort-cpu", "--threads", str(threads), "--workers", "1",
                 "--no-progress", *extra], env)
    return json.loads((bundle / "labels" / "default.thresholds.json").read_text(encoding="utf-8")), secs


def test_scores(bundle: Path, data: Path, names: list[str], env: dict, threads: int, work: Path) -> np.ndarray:
    from benchmarks.real_data import console_script

    preds = work / "test_scores.jsonl"
    _run([console_script("qks-infer"), str(data / "images" / "test"), "--bundle", str(bundle), "--bank", "default",
          "--all-scores", "--backend", "ort-cpu", "--threads", str(threads), "--workers", "1", "--out", str(preds),
          "--overwrite", "--no-progress"], env)
    records = {r["image"]: r["scores"] for r in map(json.loads, preds.read_text(encoding="utf-8").splitlines())}
    manifest = [json.loads(ln) for ln in (data / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    return np.array([[records[Path(m["image"]).name][n] for n in names] for m in manifest], dtype=np.float32)


def markdown(res: dict) -> str:
    lines = [f"Scene benchmark (seed 0): bundle trained on {res['setup']['fit_scenes']} training scenes, thresholds "
             f"fitted on {res['setup']['calib_scenes']} other training scenes, evaluated on {res['setup']['test_scenes']} "
             f"test scenes; {res['setup']['seen']} seen + {res['setup']['unseen']} unseen labels (percent).", "",
             "| rule | threshold | micro F1 all | macro F1 all | micro F1 seen | macro F1 seen | micro F1 unseen "
             "| macro F1 unseen | labels/image |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in res["rules"].items():
        lines.append(f"| {name} | {res['thresholds'][name]} | {row['all']['micro_f1']:.1f} | {row['all']['macro_f1']:.1f} "
                     f"| {row['seen']['micro_f1']:.1f} | {row['seen']['macro_f1']:.1f} | {row['unseen']['micro_f1']:.1f} "
                     f"| {row['unseen']['macro_f1']:.1f} | {row['labels_per_image']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.thresholds", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "thresholds")
    p.add_argument("--train", type=int, default=1500, help="training scenes the head is trained on")
    p.add_argument("--calib", type=int, default=1000, help="other training scenes the thresholds are fitted on")
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "thresholds.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "results" / "thresholds.md")
    args = p.parse_args(argv)
    work = args.work.resolve()
    env = _env(args.threads)
    times = prepare(work, args.train, args.calib, args.test, args.epochs, args.threads)
    data, bundle = work / "data", work / "bundle"
    names = (bundle / "labels" / "default.txt").read_text(encoding="utf-8").splitlines()
    unseen_names = set((data / "unseen.txt").read_text(encoding="utf-8").splitlines())
    unseen = np.array([n in unseen_names for n in names])
    manifest = [json.loads(ln) for ln in (data / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    targets = np.array([[1 if n in m["labels"] else -1 for n in names] for m in manifest], dtype=np.int8)

    prec, times["calibrate_precision"] = calibrate(bundle, data / "calib.jsonl", "precision=0.9", env, args.threads)
    floored, times["calibrate_f1_floor"] = calibrate(bundle, data / "calib.jsonl", "f1", env, args.threads,
                                                     "--floor-at-global")
    f1, times["calibrate_f1"] = calibrate(bundle, data / "calib.jsonl", "f1", env, args.threads)  # stored last
    t0 = time.perf_counter()
    probs = test_scores(bundle, data, names, env, args.threads, work)
    times["infer_test"] = time.perf_counter() - t0
    oracle = oracle_global(probs, targets)
    rules = {"0.5 (qks-infer's default)": 0.5,
             "best global, fitted on the calibration scenes": f1["global_threshold"],
             "per-label F1 (qks-calibrate)": np.asarray(f1["thresholds"], dtype=np.float32),
             "per-label F1, none below the global (--floor-at-global)": np.asarray(floored["thresholds"],
                                                                                  dtype=np.float32),
             "per-label precision=0.9 (qks-calibrate --target precision=0.9)": np.asarray(prec["thresholds"],
                                                                                         dtype=np.float32),
             "best global on the test scenes (oracle, for reference)": oracle}
    shown = {k: (f"{v:.3f}" if np.ndim(v) == 0 else f"per label (median {float(np.median(v)):.3f})")
             for k, v in rules.items()}
    res = {"setup": {"fit_scenes": args.train, "calib_scenes": args.calib, "test_scenes": args.test,
                     "seen": int((~unseen).sum()), "unseen": int(unseen.sum()), "epochs": args.epochs,
                     "min_positives": f1["min_positives"],
                     "fitted_per_label": {"f1": len(names) - len(f1["fallback_labels"]),
                                          "precision=0.9": len(names) - len(prec["fallback_labels"])},
                     "fallback_unseen": sum(n in unseen_names for n in f1["fallback_labels"]),
                     "fallback_seen": sum(n not in unseen_names for n in f1["fallback_labels"])},
           "thresholds": shown, "rules": evaluate(probs, targets, unseen, rules),
           "times_s": {k: round(v, 1) for k, v in times.items()}}
    print(json.dumps(res, indent=2))
    md = markdown(res)
    print(md)
    args.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    args.markdown.write_text(md, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
