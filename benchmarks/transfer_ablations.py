"""What was tried to make a trained head beat the zero-shot backbone on unseen labels, on one seed of
the scene benchmark: the measurements behind benchmarks/RESULTS.md ("Unseen labels: what was tried").

Runs on a seed folder of `benchmarks.real_data` (its scenes, cached lite tokens and, for the first
ablation, its trained runs). Heads are trained in-process on the cached training tokens with what
qks-train uses (AdamW, weight decay 1e-4, batch 16, the default prompt pool, the benchmark's head
size), all training scenes, a fixed number of epochs, the last epoch scored on the test tokens:

- weights     the paper's head (`run_qks_paper/best.pt`) plus w times the zero-shot scores, for a grid
              of w chosen on the TEST set: the best any weight can do (an upper bound of the
              product's validation-chosen weight), and whether any w beats zero-shot alone;
- oracle      per unseen label, the AP of the benchmark's trained heads (alone) against zero-shot's, and
              the mean of the better of the two: what a perfect per-label choice between them could
              reach, the ceiling of any gate or mixture that picks per label;
- prompts     the zero-shot backbone with one prompt ("a photo of a {}.") and with the label name
              alone, against the default pool of 85 templates;
- size        the paper's head with other depths and query counts (L, Nq), alone and plus w x zero-shot;
- joint       the head trained with the zero-shot term inside the loss (fixed w), instead of alone;
- distill     a zero-shot-preserving term: the head's scores on a fixed vocabulary (the 1,000
              ImageNet class names, fixed independently of the unseen list; 17 of the 79 unseen labels
              of seed 0 are ImageNet names) pulled towards the backbone's own (per-image Pearson); each
              head also plus w times the zero-shot scores, w on the test grid as for `weights`;
- losses      BCE and the pairwise ranking loss against ASL, for the paper's head;
- curve       seen concepts 25 / 50 / 100 (the same unseen concepts and test scenes): how transfer grows
              with the number of seen concepts, for the projection-only head and the paper's head.

    python -m benchmarks.transfer_ablations --work /tmp/qks-real-data --seed 0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ABLATIONS = ("weights", "oracle", "prompts", "size", "joint", "distill", "losses", "curve")
WEIGHTS = (0, 1, 2, 4, 8, 16, 32, 64, 128)  # zero-shot weights scored on the test set (an upper bound)


def _tensor(a):
    import torch

    return torch.from_numpy(np.asarray(a, dtype=np.float32))


class Tokens:
    """A seed's cached tokens, training targets and label embeddings (benchmarks.real_data.Split)."""

    def __init__(self, data: Path, work: Path, log):
        from benchmarks.real_data import Split
        from qks.data import read_manifest
        from qks.prompts import LabelEmbedder, load_prompts

        self.split = Split(data, work, log)
        sp = self.split
        index = {n: j for j, n in enumerate(sp.seen)}
        train = read_manifest(data / "train.jsonl", sp.labels).samples
        self.y = _tensor(np.stack([s.targets(index) for s in train]))
        self.x = _tensor(np.load(sp.tokens_dir / "train" / "tokens.npy", mmap_mode="r"))
        self.xt = _tensor(sp.test_tokens)
        self.label_cache = work.parent / "label_cache"
        self.emb = LabelEmbedder(sp.backbone, load_prompts("default"), cache_dir=self.label_cache)(sp.labels)
        self.zs_test = sp.zero_shot_scores(self.label_cache)

    def metrics(self, scores: np.ndarray) -> dict:
        from benchmarks.real_data import metrics

        return {k: round(v, 2) for k, v in metrics(scores, self.split.targets, self.split.unseen_mask).items()
                if not k.endswith("images")}


def _head(layers: int, args, dim: int = 384):
    """A fresh head, initialised from the seed (every ablation starts from the same weights)."""
    import torch

    from qks.config import HeadConfig
    from qks.head import QueryHead

    torch.manual_seed(args.seed)
    cfg = HeadConfig(layers=layers, queries=args.queries, ffn=args.ffn)
    return QueryHead(cfg, dim, dim, projection=torch.eye(dim))


def train_head(t: Tokens, head, lr: float, epochs: int, seed: int, loss: str = "asl", extra=None, added=None):
    """Train `head` on the cached tokens; `extra(head, query_features, rows)` adds a term to the loss,
    `added` [training images, seen labels] is added to the head's logits inside the loss."""
    import torch

    from qks.losses import get_loss
    from qks.scoring import score

    torch.manual_seed(seed)
    loss_fn = get_loss(loss)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    e = t.emb[:len(t.split.seen)]
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(len(t.x), generator=g)
        for i in range(0, len(t.x), 16):
            rows = perm[i:i + 16]
            qf = head(t.x[rows])
            logits = score(qf, e) if added is None else score(qf, e) + added[rows]
            value = loss_fn(logits, t.y[rows])
            if extra is not None:
                value = value + extra(head, qf, rows)
            opt.zero_grad()
            value.backward()
            opt.step()
    return head


def head_scores(t: Tokens, head) -> np.ndarray:
    """Test scores of `head` (a trained QueryHead) against every label."""
    head.eval()
    return _test_scores(t, head)


def _test_scores(t: Tokens, features) -> np.ndarray:
    """max-over-queries scores of `features` (test tokens -> query features) on every label, in batches."""
    import torch

    from qks.scoring import score

    with torch.no_grad():
        return torch.cat([score(features(t.xt[i:i + 200]), t.emb) for i in range(0, len(t.xt), 200)]).numpy()


def ablate_weights(t: Tokens, args, log) -> list[dict]:
    """The paper's head from the benchmark run, plus w x zero-shot, for a grid of w (test-selected)."""
    head = _trained_head_scores(t, _seed_dir(args) / "run_qks_paper")
    rows = []
    for w in WEIGHTS:
        rows.append({"weight": w, **t.metrics(head + w * t.zs_test)})
        log(f"    w={w:<4} {rows[-1]}")
    return rows


def _trained_head_scores(t: Tokens, run_dir: Path) -> np.ndarray:
    """Test scores of a benchmark run's head alone (without its zero-shot term, if it has one)."""
    from qks.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(run_dir / "best.pt"), backbone=t.split.backbone)  # eval mode
    return _test_scores(t, model.head_features)


def ablate_oracle(t: Tokens, args, log) -> list[dict]:
    """Per unseen label: the trained head's AP against zero-shot's, on the ZSL images."""
    from qks.metrics import average_precision_per_label, zsl_selection

    images, labels = zsl_selection(t.split.targets, t.split.unseen_mask)
    y = t.split.targets[np.ix_(images, labels)]
    zs = average_precision_per_label(t.zs_test[np.ix_(images, labels)], y)
    rows = []
    for run in ("run_projection_only", "run_qks_paper"):
        head = average_precision_per_label(_trained_head_scores(t, _seed_dir(args) / run)[np.ix_(images, labels)], y)
        rows.append({"run": run, "labels": len(labels), "head_map": round(100 * float(head.mean()), 2),
                     "zero_shot_map": round(100 * float(zs.mean()), 2),
                     "oracle_map": round(100 * float(np.maximum(head, zs).mean()), 2),
                     "head_better_labels": int((head > zs).sum())})
        log(f"    {rows[-1]}")
    return rows


def ablate_prompts(t: Tokens, args, log) -> list[dict]:
    rows = []
    for name, prompts in (("default pool (85)", None), ("a photo of a {}.", ["a photo of a {}."]), ("{}", ["{}"])):
        rows.append({"prompts": name, **t.metrics(t.split.zero_shot_scores(t.label_cache, prompts))})
        log(f"    {rows[-1]}")
    return rows


def ablate_size(t: Tokens, args, log) -> list[dict]:
    rows = []
    for layers, queries in args.sizes:
        head = train_head(t, _head(layers, argparse.Namespace(**{**vars(args), "queries": queries})), args.lr,
                          args.epochs, args.seed)
        rows.append(_with_zero_shot(t, head_scores(t, head), log, f"L={layers} Nq={queries}", layers=layers,
                                    queries=queries))
    return rows


def ablate_joint(t: Tokens, args, log) -> list[dict]:
    """The head trained with the weighted zero-shot scores inside the loss (fixed weight)."""
    import torch

    from qks.scoring import score

    with torch.no_grad():
        zs_train = torch.cat([score(t.x[i:i + 200], t.emb[:len(t.split.seen)]) for i in range(0, len(t.x), 200)])
    rows = []
    for w in args.joint_weights:
        head = train_head(t, _head(args.layers, args), args.lr, args.epochs, args.seed, added=w * zs_train)
        rows.append({"weight": w, **t.metrics(head_scores(t, head) + w * t.zs_test)})
        log(f"    joint w={w}: {rows[-1]}")
    return rows


def ablate_distill(t: Tokens, args, log) -> list[dict]:
    """A zero-shot-preserving term on the ImageNet class names, for both heads."""
    import torch

    from qks.backbones.lite import imagenet_class_names
    from qks.prompts import LabelEmbedder, load_prompts
    from qks.scoring import score

    vocab = LabelEmbedder(t.split.backbone, load_prompts("default"), cache_dir=t.label_cache)(
        [n.lower() for n in imagenet_class_names()])
    with torch.no_grad():
        teacher = torch.cat([score(t.x[i:i + 200], vocab) for i in range(0, len(t.x), 200)])

    def pearson(head, qf, rows, weight=args.distill_weight):
        h, z = score(qf, vocab), teacher[rows]
        hs = (h - h.mean(1, keepdim=True)) / (h.std(1, keepdim=True) + 1e-6)
        zs = (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6)
        return weight * ((hs - zs) ** 2).mean()

    rows = []
    for name, layers, lr in (("projection_only", 0, args.proj_lr), ("qks_paper", args.layers, args.lr)):
        for term in (None, pearson):
            head = train_head(t, _head(layers, args), lr, args.epochs, args.seed, extra=term)
            rows.append(_with_zero_shot(t, head_scores(t, head), log, f"{name} distill={term is not None}",
                                        head=name, distill=term is not None))
    return rows


def _with_zero_shot(t: Tokens, scores: np.ndarray, log, name: str, **row) -> dict:
    """`row` with the head's metrics alone and plus w x zero-shot for the test grid of w (logged with
    the w best on ZSL mAP)."""
    alone = {**row, **t.metrics(scores)}
    plus = [{"weight": w, **t.metrics(scores + w * t.zs_test)} for w in WEIGHTS[1:]]
    log(f"    {name}: {alone}; best test-selected w: {max(plus, key=lambda r: r['zsl_map'])}")
    return {**alone, "plus_zero_shot": plus}


def _seed_dir(args) -> Path:
    return args.work / f"seed{args.seed}"


def ablate_losses(t: Tokens, args, log) -> list[dict]:
    rows = []
    for loss in ("asl", "bce", "ranking"):
        head = train_head(t, _head(args.layers, args), args.lr, args.epochs, args.seed, loss=loss)
        rows.append({"loss": loss, **t.metrics(head_scores(t, head))})
        log(f"    {loss}: {rows[-1]}")
    return rows


def ablate_curve(t: Tokens | None, args, log) -> list[dict]:
    from benchmarks.scenes import SceneConfig, ensure

    rows = []
    for k in args.concepts:
        work = args.work / f"seed{args.seed}-concepts{k}"
        ensure(work / "scenes", SceneConfig(train_scenes=args.train, test_scenes=args.test, seed=args.seed,
                                            concepts=k), log=lambda m: log("    " + m))
        t = Tokens(work / "scenes", work, log)
        for name, layers, lr in (("projection_only", 0, args.proj_lr), ("qks_paper", args.layers, args.lr)):
            head = train_head(t, _head(layers, args), lr, args.epochs, args.seed)
            rows.append({"concepts": k, "head": name, **t.metrics(head_scores(t, head))})
            log(f"    {k} concepts, {name}: {rows[-1]}")
        rows.append({"concepts": k, "head": "zero_shot", **t.metrics(t.zs_test)})
    return rows


def main(argv: list[str] | None = None) -> int:
    from benchmarks.real_data import DEFAULTS

    p = argparse.ArgumentParser(prog="python -m benchmarks.transfer_ablations", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/qks-real-data"), help="benchmarks.real_data's --work")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", choices=ABLATIONS, default=list(ABLATIONS))
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--proj-lr", type=float, default=DEFAULTS["proj_lr"])
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"])
    p.add_argument("--queries", type=int, default=DEFAULTS["queries"])
    p.add_argument("--ffn", type=int, default=DEFAULTS["ffn"])
    p.add_argument("--train", type=int, default=DEFAULTS["train"])
    p.add_argument("--test", type=int, default=DEFAULTS["test"])
    p.add_argument("--joint-weights", type=float, nargs="+", default=[8.0, 16.0])
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--sizes", type=lambda v: tuple(int(x) for x in v.split("x")), nargs="+",
                   default=[(1, 12), (2, 4), (2, 24)], help="head sizes LxNq for `size` (default 1x12 2x4 2x24)")
    p.add_argument("--concepts", type=int, nargs="+", default=[25, 50, 100])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    work = _seed_dir(args)
    if not (work / "scenes" / "scenes.json").is_file():
        print(f"error: {work} holds no benchmarks.real_data run (run it with --work {args.work} first)", file=sys.stderr)
        return 2
    results = {"seed": args.seed, "settings": {k: v for k, v in vars(args).items() if k not in ("work", "json")}}
    t = Tokens(work / "scenes", work, log) if set(args.only) - {"curve"} else None
    if t is not None:
        results["zero_shot"] = t.metrics(t.zs_test)
    ablate = {"weights": ablate_weights, "oracle": ablate_oracle, "prompts": ablate_prompts, "size": ablate_size,
              "joint": ablate_joint, "distill": ablate_distill, "losses": ablate_losses, "curve": ablate_curve}
    for name in args.only:
        log(f"[{name}]")
        t0 = time.perf_counter()
        results[name] = ablate[name](t, args, log)
        results[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
