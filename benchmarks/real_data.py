"""Real photos, open vocabulary: QKS against its baselines on the scene benchmark, over seeds, and the
deployed bundle against PyTorch, in one run.

Per seed, a scene split (benchmarks/scenes.py: 315 concepts of real photo cut-outs, about 3:1 seen /
unseen by concept, the split drawn by the seed; generated under --work if missing, reused otherwise):

1. chance       uniformly random scores on the same images (the mean over --chance-draws draws);
2. zero-shot    the `lite` backbone alone, no head: a label's score is its best location,
                max_n <token_n, label> (`LiteBackbone.zero_shot_features`);
3. projection   a projection-only head (`qks-train --layers 0 --no-zero-shot`): every image token
                through a trained C -> D projection (initialised to the identity), best token;
4. projection + zero-shot  the same head with qks-train's defaults (`--layers 0`): held-out concepts
                and the zero-shot term, as (6);
5. QKS (paper)  the paper's head alone (`qks-train --no-zero-shot --val-concepts 0`): queries,
                self-/cross-attention, max over queries;
6. QKS          qks-train's defaults: the same head, 10 % of the seen labels held out to validate
                transfer, and the backbone's zero-shot scores added with the weight that validation
                chose (`HeadConfig.zero_shot`);
7. bundle       seed 0: `qks-export` of (6)'s best.pt, then `qks-infer --all-scores` (the torch-free
                runtime, ONNX Runtime CPU, fp32) over the test images; metrics from its output.

Every head is trained by `qks.train.train` (what `qks-train --backbone lite --cached-tokens` runs) with
the same head size, optimiser, batch and epochs; the backbone's tokens are computed once per seed and
shared by the four runs. Scoring is `qks.evaluate.predict` (what `qks-eval` runs) on the test images'
cached tokens (the eval transform, as qks-eval's). Metrics (qks.metrics, percent): ZSL (unseen labels,
test scenes hold at least one unseen object each) mAP, F1@1, F1@3; GZSL (all labels) mAP, F1@3, F1@5;
seen mAP (the seen labels on the GZSL images). Mean and standard deviation over seeds, and each
method minus the zero-shot backbone per seed (paired: the same split). Time per stage.

    python -m benchmarks.real_data --work /tmp/qks-real-data --seeds 0 1 2 \\
        --json benchmarks/results/real_data.json --markdown benchmarks/results/real_data.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The head every trained row uses (CPU-sized; measured in benchmarks/RESULTS.md, "Real data").
DEFAULTS = {"epochs": 15, "lr": 3e-4, "proj_lr": 1e-3, "layers": 2, "queries": 12, "ffn": 1536, "loss": "asl",
            "batch_size": 16, "train": 3000, "test": 800}
ZSL_K, GZSL_K = (1, 3), (3, 5)
METRICS = ["zsl_map", "zsl_f1@1", "zsl_f1@3", "gzsl_map", "gzsl_f1@3", "gzsl_f1@5", "seen_map"]
TRAINED = ["projection_only", "projection_zero_shot", "qks_paper", "qks"]
METHODS = ["zero_shot", *TRAINED]
NAMES = {"chance": "chance (random scores)", "zero_shot": "zero-shot lite backbone (no head)",
         "projection_only": "projection-only head (`--layers 0 --no-zero-shot`)",
         "projection_zero_shot": "projection-only head + zero-shot term (`--layers 0`, else defaults)",
         "qks_paper": "QKS, the paper's head alone (`--no-zero-shot --val-concepts 0`)",
         "qks": "QKS, qks-train's defaults (+ zero-shot term, held-out concepts)",
         "qks_bundle": "QKS defaults, the bundle through qks-infer (seed 0)"}
# qks.train.TrainOptions fields per trained row (on top of the shared head settings).
RUNS = {"projection_only": {"layers": 0, "zero_shot": False, "val_concepts": 0.0},
        "projection_zero_shot": {"layers": 0},
        "qks_paper": {"zero_shot": False, "val_concepts": 0.0},
        "qks": {}}


# ---- metrics -----------------------------------------------------------------------------------

def metrics(scores: np.ndarray, targets: np.ndarray, unseen_mask: np.ndarray) -> dict:
    """The table's metrics (percent) of one method's scores [images, labels]."""
    from qks.metrics import gzsl_selection, mean_average_precision, zsl_gzsl_report

    r = zsl_gzsl_report(scores, targets, unseen_mask, topk=ZSL_K + GZSL_K)
    z, g = r["zsl"], r["gzsl"]
    out = {"zsl_images": z["images"], "gzsl_images": g["images"], "zsl_map": 100 * z["map"],
           "gzsl_map": 100 * g["map"]}
    out |= {f"zsl_f1@{k}": 100 * z["f1"][str(k)]["f1"] for k in ZSL_K}
    out |= {f"gzsl_f1@{k}": 100 * g["f1"][str(k)]["f1"] for k in GZSL_K}
    images, _ = gzsl_selection(targets)
    seen_cols = np.flatnonzero(~unseen_mask)
    out["seen_map"] = 100 * mean_average_precision(scores[np.ix_(images, seen_cols)],
                                                   targets[np.ix_(images, seen_cols)]).map
    return out


def chance_metrics(targets: np.ndarray, unseen_mask: np.ndarray, draws: int = 50, seed: int = 0) -> dict:
    """The mean of `metrics` over `draws` draws of uniformly random scores on these targets."""
    rng = np.random.default_rng(seed)
    rows = [metrics(rng.random(targets.shape), targets, unseen_mask) for _ in range(max(1, draws))]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


# ---- one seed ----------------------------------------------------------------------------------

class Split:
    """A scene split with its labels, test targets and cached lite tokens (train and test)."""

    def __init__(self, data: Path, work: Path, log):
        import torch

        from qks.backbones import create_backbone
        from qks.config import ModelConfig
        from qks.data import read_label_lists, read_manifest
        from qks.model import QKSModel
        from qks.train import cache_tokens

        self.data, self.work = data, work
        self.seen, self.unseen = read_label_lists(data / "seen.txt", data / "unseen.txt")
        self.labels = self.seen + self.unseen
        self.test = read_manifest(data / "test.jsonl", self.labels)
        index = {n: j for j, n in enumerate(self.labels)}
        self.targets = np.stack([s.targets(index) for s in self.test.samples])
        self.unseen_mask = np.arange(len(self.labels)) >= len(self.seen)
        self.backbone = create_backbone("lite")
        model = QKSModel(ModelConfig(backbone="lite"), self.backbone)
        t0 = time.perf_counter()
        self.tokens_dir = work / "tokens"
        for name, manifest in (("train", read_manifest(data / "train.jsonl", self.labels)), ("test", self.test)):
            (self.tokens_dir / name).mkdir(parents=True, exist_ok=True)
            tokens = cache_tokens(model, manifest, self.tokens_dir / name, torch.device("cpu"), 32, 0, False, False)
            if name == "test":
                self.test_tokens = tokens
        self.tokens_seconds = time.perf_counter() - t0
        log(f"  tokens: {self.tokens_seconds:.0f} s (reused when cached)")

    def zero_shot_scores(self, label_cache: Path, prompts: list[str] | None = None) -> np.ndarray:
        """The backbone alone on the test images; label embeddings from `prompts` (default: the pool)."""
        import torch

        from qks.prompts import LabelEmbedder, load_prompts
        from qks.scoring import score

        emb = LabelEmbedder(self.backbone, prompts or load_prompts("default"), cache_dir=label_cache)(self.labels)
        tokens = torch.from_numpy(np.asarray(self.test_tokens, dtype=np.float32))
        with torch.no_grad():
            return torch.cat([score(self.backbone.zero_shot_features(tokens[i:i + 200]), emb)
                              for i in range(0, len(tokens), 200)]).numpy()

    def seed_run(self, run_dir: Path) -> None:
        """A fresh run directory holding (hard links to) the training tokens, reused by cache_tokens."""
        import shutil

        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        for name in ("tokens.npy", "tokens.json"):
            try:
                os.link(self.tokens_dir / "train" / name, run_dir / name)
            except OSError:
                shutil.copyfile(self.tokens_dir / "train" / name, run_dir / name)


def _finished(run_dir: Path, options) -> bool:
    """Whether `run_dir` holds a run of these very options that trained every epoch."""
    try:
        saved = json.loads((run_dir / "run.json").read_text())["options"]
        epochs = sum(1 for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip())
    except (OSError, ValueError, KeyError):
        return False
    return saved == json.loads(json.dumps(options.to_dict())) and epochs == options.epochs and (
        run_dir / "best.pt").is_file()


def train_and_score(split: Split, run_dir: Path, settings: dict, seed: int, label_cache: Path, log,
                    reuse: bool = False) -> tuple:
    """qks-train with cached tokens (or, with `reuse`, a finished run of the same options), then best.pt
    scored on the test tokens: (logits, info)."""
    import torch

    from qks.checkpoint import load_checkpoint, model_from_checkpoint
    from qks.evaluate import predict
    from qks.prompts import LabelEmbedder
    from qks.train import TokenDataset, TrainOptions, train

    options = TrainOptions(
        data=str(split.data / "train.jsonl"), seen=str(split.data / "seen.txt"),
        unseen=str(split.data / "unseen.txt"), out=str(run_dir), backbone="lite", cached_tokens=True,
        device="cpu", workers=0, seed=seed, label_cache=str(label_cache), **settings)
    t0 = time.perf_counter()
    reused = reuse and _finished(run_dir, options)
    if reused:
        log("    reusing the finished run (same options)")
        summary = {"epoch": options.epochs}
    else:
        split.seed_run(run_dir)
        summary = train(options, progress=False, log=lambda m: log(f"    {m}"))
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = load_checkpoint(run_dir / "best.pt")
    model = model_from_checkpoint(state, backbone=split.backbone)
    emb = LabelEmbedder(split.backbone, list(state["prompts"]), cache_dir=label_cache)(split.labels)
    ds = TokenDataset(split.test_tokens, np.arange(len(split.test.samples)), split.test, split.labels)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False)
    logits, _ = predict(model, loader, emb, torch.device("cpu"), from_tokens=True)
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    best = max(records, key=lambda r: r["val_score"] if r["val_score"] is not None else -1)
    if reused:  # the epochs' own times, as the run measured them
        t_train = sum(r["seconds"] for r in records)
    info = {"train_s": t_train, "reused": reused, "eval_s": time.perf_counter() - t0, "best_epoch": best["epoch"],
            "epochs": summary.get("epoch"), "zero_shot_weight": best.get("zero_shot_weight"),
            "held_out_concepts": len(json.loads((run_dir / "run.json").read_text())["held_out_concepts"])}
    return logits, info


def console_script(name: str) -> str:
    """The console script installed beside this interpreter (the venv's), else on PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def export_and_infer(split: Split, ckpt: Path, work: Path, threads: int, label_cache: Path,
                     log) -> tuple[np.ndarray, dict]:
    """qks-export, then qks-infer --all-scores over the test images: (probabilities [images, labels], info)."""
    bundle, preds = work / "bundle", work / "bundle_predictions.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    cmd = [console_script("qks-export"), "--ckpt", str(ckpt), "--out", str(bundle), "--label-cache", str(label_cache), "-q"]
    log("    $ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)
    t_export = time.perf_counter() - t0
    cmd = [console_script("qks-infer"), str(split.data / "images" / "test"), "--bundle", str(bundle), "--labels",
           str(split.data / "labels.txt"), "--all-scores", "--backend", "ort-cpu", "--precision", "fp32",
           "--threads", str(threads), "--workers", "1", "--batch-size", "16", "--out", str(preds), "--overwrite",
           "--no-progress"]
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
    missing = [s.path for s in split.test.samples if Path(s.path).name not in by_name]
    if missing:
        raise RuntimeError(f"qks-infer wrote no scores for {len(missing)} test image(s), e.g. {missing[0]}")
    probs = np.array([[by_name[Path(s.path).name][n] for n in split.labels] for s in split.test.samples])
    return probs, {"export_s": t_export, "infer_s": t_infer, "bundle": str(bundle)}


def run_seed(seed: int, args, log) -> dict:
    from benchmarks.scenes import SceneConfig, ensure

    work = args.work / f"seed{seed}"
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    data = work / "scenes"
    ensure(data, SceneConfig(train_scenes=args.train, test_scenes=args.test, seed=seed, concepts=args.concepts),
           log=lambda m: log("  " + m))
    times["data"] = time.perf_counter() - t0
    split = Split(data, work, log)
    times["tokens"] = split.tokens_seconds
    label_cache = args.work / "label_cache"
    rows = {"chance": chance_metrics(split.targets, split.unseen_mask, draws=args.chance_draws)}
    t0 = time.perf_counter()
    rows["zero_shot"] = metrics(split.zero_shot_scores(label_cache), split.targets, split.unseen_mask)
    times["zero_shot"] = time.perf_counter() - t0
    shared = {"layers": args.layers, "queries": args.queries, "ffn": args.ffn, "epochs": args.epochs,
              "loss": args.loss, "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads}
    training, logits = {}, {}
    for name in args.methods:
        settings = {**shared, **RUNS[name]}
        if settings["layers"] == 0:
            settings["lr"] = args.proj_lr
        log(f"  [{name}] qks-train " + " ".join(f"{k}={v}" for k, v in sorted(settings.items())))
        logits[name], training[name] = train_and_score(split, work / f"run_{name}", settings, seed, label_cache, log,
                                                       reuse=args.reuse)
        rows[name] = metrics(logits[name], split.targets, split.unseen_mask)
        times[f"{name}_train"] = training[name]["train_s"]
        log(f"    ZSL mAP {rows[name]['zsl_map']:.1f}, ZSL F1@1 {rows[name]['zsl_f1@1']:.1f}, GZSL mAP "
            f"{rows[name]['gzsl_map']:.1f}, seen mAP {rows[name]['seen_map']:.1f}")
    out = {"seed": seed, "data": str(data), "scenes": json.loads((data / "scenes.json").read_text()),
           "test_images": len(split.test.samples), "seen": split.seen, "unseen": split.unseen,
           "metrics": rows, "training": training, "seconds": times}
    if seed == args.bundle_seed and "qks" in logits and not args.no_bundle:
        log("  [bundle] qks-export, qks-infer --all-scores, metrics from its output")
        probs, info = export_and_infer(split, work / "run_qks" / "best.pt", work, args.threads, label_cache, log)
        rows["qks_bundle"] = metrics(probs, split.targets, split.unseen_mask)
        times["export"], times["infer"] = info["export_s"], info["infer_s"]
        torch_probs = 1.0 / (1.0 + np.exp(-logits["qks"].astype(np.float64)))
        out["parity"] = {
            "max_abs_probability_diff": float(np.abs(torch_probs - probs).max()),
            "max_abs_metric_diff": max(abs(rows["qks_bundle"][k] - rows["qks"][k]) for k in METRICS),
            "top1_agreement": float((torch_probs.argmax(1) == probs.argmax(1)).mean())}
    return out


# ---- over seeds --------------------------------------------------------------------------------

def summarise(seeds: list[dict]) -> dict:
    """Mean and standard deviation per method and metric, and each method minus zero-shot per seed."""
    methods = [m for m in ["chance", *METHODS] if all(m in s["metrics"] for s in seeds)]
    out = {}
    for m in methods:
        row = {}
        for k in METRICS:
            v = [s["metrics"][m][k] for s in seeds]
            row[k] = {"mean": statistics.mean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v}
            if m != "zero_shot":
                d = [s["metrics"][m][k] - s["metrics"]["zero_shot"][k] for s in seeds]
                row[k]["minus_zero_shot"] = {"mean": statistics.mean(d), "min": min(d), "max": max(d), "runs": d}
        out[m] = row
    return out


def markdown(r: dict) -> str:
    cols = ["ZSL mAP", "ZSL F1@1", "ZSL F1@3", "GZSL mAP", "GZSL F1@3", "GZSL F1@5", "seen mAP"]
    n = len(r["seeds"])
    lines = [f"| method ({n} seed{'s' if n > 1 else ''}: mean ± sd) | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for m, row in r["summary"].items():
        cells = [f"{row[k]['mean']:.1f} ± {row[k]['sd']:.1f}" if n > 1 else f"{row[k]['mean']:.1f}" for k in METRICS]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    lines += ["", "Minus the zero-shot backbone on the same split (mean, and the range over seeds):", "",
              "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, row in r["summary"].items():
        if m in ("chance", "zero_shot"):
            continue
        cells = [f"{row[k]['minus_zero_shot']['mean']:+.1f} [{row[k]['minus_zero_shot']['min']:+.1f}, "
                 f"{row[k]['minus_zero_shot']['max']:+.1f}]" for k in METRICS]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    b = next((s for s in r["seeds"] if "qks_bundle" in s["metrics"]), None)
    if b:
        row, p = b["metrics"]["qks_bundle"], b["parity"]
        lines += ["", f"Bundle (seed {b['seed']}, qks-export + qks-infer, ONNX Runtime CPU fp32): "
                  + ", ".join(f"{c} {row[k]:.1f}" for c, k in zip(cols, METRICS, strict=True))
                  + f"; against PyTorch: max |metric diff| {p['max_abs_metric_diff']:.2g} points, max |probability "
                  f"diff| {p['max_abs_probability_diff']:.2g}, top-1 agreement {100 * p['top1_agreement']:.1f} %."]
    return "\n".join(lines)


def run(args, log=print) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    seeds = []
    for seed in args.seeds:
        log(f"[seed {seed}]")
        seeds.append(run_seed(seed, args, log))
    settings = {k: getattr(args, k) for k in ("train", "test", "concepts", "epochs", "lr", "proj_lr", "layers",
                                              "queries", "ffn", "loss", "batch_size", "threads")}
    return {"benchmark": "real_data (scenes)", "seeds": seeds, "summary": summarise(seeds),
            "settings": {**settings, "backbone": "lite", "cached_tokens": True, "methods": args.methods},
            "units": "percent; mAP counts a label with no positive as 0", "total_seconds": time.perf_counter() - t0,
            "machine": {"platform": platform.platform(), "processor": _cpu_model(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "python": platform.python_version()}}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/qks-real-data"),
                   help="scenes, tokens, runs and bundle, one folder per seed (default %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split and training seeds (default 0 1 2)")
    p.add_argument("--train", type=int, default=DEFAULTS["train"], help="training scenes (default %(default)s)")
    p.add_argument("--test", type=int, default=DEFAULTS["test"], help="test scenes (default %(default)s)")
    p.add_argument("--concepts", type=int, default=None, help="train on this many seen concepts only, the same "
                   "unseen ones and test scenes (a learning curve; default: all)")
    p.add_argument("--methods", nargs="+", choices=TRAINED, default=TRAINED, help="trained rows (default: all)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="QKS learning rate (default %(default)s)")
    p.add_argument("--proj-lr", type=float, default=DEFAULTS["proj_lr"],
                   help="projection-only learning rate (default %(default)s)")
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"], help="QKS head layers L (default %(default)s)")
    p.add_argument("--queries", type=int, default=DEFAULTS["queries"], help="query tokens Nq (default %(default)s)")
    p.add_argument("--ffn", type=int, default=DEFAULTS["ffn"], help="head FFN width (default %(default)s)")
    p.add_argument("--loss", default=DEFAULTS["loss"], help="training loss (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads (default 1: fastest for "
                   "the small head on the 2-core machine)")
    p.add_argument("--chance-draws", type=int, default=50)
    p.add_argument("--bundle-seed", type=int, default=0, help="the seed whose QKS run is exported and run by qks-infer")
    p.add_argument("--no-bundle", action="store_true", help="skip qks-export / qks-infer")
    p.add_argument("--reuse", action="store_true", help="keep runs a previous call finished with the same options "
                   "(retrain only what changed)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="write the tables as markdown here")
    return p


def main(argv: list[str] | None = None) -> int:
    from benchmarks.scenes import StampsUnavailable

    args = _parser().parse_args(argv)
    try:
        results = run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    except StampsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(results)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
