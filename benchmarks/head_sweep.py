"""Head settings and seeds on the real-data mosaics, fast: heads trained in-process on cached lite tokens.

benchmarks/real_data.py runs each method once through qks-train / qks-eval / qks-export; this script
answers "is the difference between two heads larger than the seed noise?" It reuses the training
tokens that real_data.py cached (`WORK/run_qks/tokens.npy`, eval transform), caches the test tokens
once under `WORK/sweep_test`, and trains each head with what qks-train uses (AdamW, weight decay
1e-4, ASL, the default prompt pool, batch 16) for a fixed number of epochs on all training images
(no validation split, no schedule: the last epoch is scored). Metrics: qks.metrics, percent.

    python -m benchmarks.real_data --data /tmp/qks-mosaic --work /tmp/qks-real-data   # tokens first
    python -m benchmarks.head_sweep --data /tmp/qks-mosaic --work /tmp/qks-real-data --seeds 0 1 2 \\
        --heads projection qks qks-no-norm --json benchmarks/results/head_sweep.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# name -> (HeadConfig fields, learning rate). "qks" is real_data.py's QKS row, "projection" its baseline.
HEADS = {
    "projection": (dict(layers=0), 1e-3),
    "qks": (dict(layers=2, queries=12, ffn=1536), 3e-4),
    "qks-no-norm": (dict(layers=2, queries=12, ffn=1536, memory_norm=False), 3e-4),
    "qks-L7": (dict(layers=7, queries=12, ffn=1536), 1e-4),
}
METRICS = ("zsl_map", "zsl_f1_1", "gzsl_map", "seen_map")


def load_split(data: Path, work: Path):
    """(train tokens, train targets [seen], test tokens, test targets, unseen mask, label embeddings)."""
    import torch

    from qks.backbones import create_backbone
    from qks.config import ModelConfig
    from qks.data import read_label_lists, read_manifest
    from qks.model import QKSModel
    from qks.prompts import LabelEmbedder, load_prompts
    from qks.train import cache_tokens

    seen, unseen = read_label_lists(data / "seen.txt", data / "unseen.txt")
    labels = seen + unseen
    backbone = create_backbone("lite")
    emb = LabelEmbedder(backbone, load_prompts("default"), cache_dir=work / "label_cache")(labels)
    train, test = read_manifest(data / "train.jsonl", labels), read_manifest(data / "test.jsonl", labels)
    tokens = work / "run_qks" / "tokens.npy"
    if not tokens.is_file():
        sys.exit(f"head_sweep: no cached training tokens at {tokens}: run benchmarks.real_data with --work {work} first")
    model = QKSModel(ModelConfig(backbone="lite"), backbone)
    (work / "sweep_test").mkdir(parents=True, exist_ok=True)
    test_tokens = cache_tokens(model, test, work / "sweep_test", torch.device("cpu"), 32, 0, False, False)
    index = {n: j for j, n in enumerate(labels)}
    y_train = np.stack([s.targets(index) for s in train.samples])[:, :len(seen)].astype(np.float32)
    y_test = np.stack([s.targets(index) for s in test.samples])
    as_tensor = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    return (as_tensor(np.load(tokens, mmap_mode="r")), as_tensor(y_train), as_tensor(test_tokens), y_test,
            np.arange(len(labels)) >= len(seen), emb, len(seen))


def train_and_score(split, head_fields: dict, lr: float, seed: int, epochs: int, batch: int) -> dict:
    import torch

    from qks.config import HeadConfig
    from qks.head import QueryHead
    from qks.losses import asl
    from qks.metrics import mean_average_precision, zsl_gzsl_report
    from qks.scoring import score

    x, y, x_test, y_test, unseen, emb, n_seen = split
    torch.manual_seed(seed)
    dim = x.shape[-1]
    head = QueryHead(HeadConfig(**head_fields), dim, emb.shape[1], projection=torch.eye(dim, emb.shape[1]))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            b = perm[i:i + batch]
            loss = asl(score(head(x[b]), emb[:n_seen]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        s = torch.cat([score(head(x_test[i:i + 200]), emb) for i in range(0, len(x_test), 200)]).numpy()
    r = zsl_gzsl_report(s, y_test, unseen, topk=(1,))
    return {"zsl_map": 100 * r["zsl"]["map"], "zsl_f1_1": 100 * r["zsl"]["f1"]["1"]["f1"],
            "gzsl_map": 100 * r["gzsl"]["map"],
            "seen_map": 100 * mean_average_precision(s[:, :n_seen], y_test[:, :n_seen]).map,
            "train_s": time.perf_counter() - t0}


def table(runs: list[dict]) -> str:
    lines = ["| head | lr | seeds | " + " | ".join(METRICS) + " |", "|---" * (3 + len(METRICS)) + "|"]
    for name in dict.fromkeys(r["head"] for r in runs):
        rs = [r for r in runs if r["head"] == name]
        cells = []
        for m in METRICS:
            v = [r[m] for r in rs]
            cells.append(f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}")
        lines.append(f"| {name} | {rs[0]['lr']:g} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the mosaic split (benchmarks.mosaic / real_data)")
    p.add_argument("--work", type=Path, required=True, help="real_data.py's --work folder (its cached tokens)")
    p.add_argument("--heads", nargs="+", choices=sorted(HEADS), default=["projection", "qks"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write every run's numbers here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    split = load_split(args.data, args.work)
    runs = []
    for name in args.heads:
        fields, lr = HEADS[name]
        for seed in args.seeds:
            r = {"head": name, "lr": lr, "seed": seed, **train_and_score(split, fields, lr, seed, args.epochs,
                                                                          args.batch_size)}
            print(json.dumps(r), flush=True)
            runs.append(r)
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "batch_size": args.batch_size, "heads":
                                         {n: HEADS[n] for n in args.heads}, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
