"""The `lite` backbone's own zero-shot scoring on the mosaic benchmark, with no trained head.

Method: every test image goes through the backbone once (EfficientNet-Lite0 features at the 7 x 7
locations, plus the pooled features); each backbone variant turns them into image tokens in
MiniLM's text space; a label's score is the pooled dot product of the tokens with the label's
embedding from `qks.prompts.LabelEmbedder` (the default prompt pool: the unnormalised mean of the
label's prompts' MiniLM embeddings), pooled over locations by `max` or `mean` (or `global`: the
pooled-feature token alone, the classifier's image-level prediction). Metrics come from
`qks.metrics` on the manifest's targets (every unlisted label negative): ZSL (unseen labels,
images with an unseen item) and GZSL (all labels, all images) mAP and micro F1@K. Chance is the
mean of the same metrics over random scores on the same images.

    python -m benchmarks.lite_zero_shot --data /tmp/mosaic            # generates it if missing
    python -m benchmarks.lite_zero_shot --data /tmp/mosaic --variants lite,lite:temp=2 --pools max
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_VARIANTS = ["lite", "lite:names=bare", "lite:names=ens7", "lite:text=raw", "lite:temp=0.5", "lite:temp=2"]
DEFAULT_POOLS = ["max", "mean", "global"]
ZSL_K = (1, 3)
GZSL_K = (3, 5)


def chance(targets: np.ndarray, unseen: np.ndarray, draws: int = 200, seed: int = 0) -> dict:
    """The metrics of uniformly random scores on these targets, averaged over `draws` draws."""
    from qks.metrics import zsl_gzsl_report

    rng = np.random.default_rng(seed)
    rows = [_summary(zsl_gzsl_report(rng.random(targets.shape), targets, unseen, topk=ZSL_K + GZSL_K))
            for _ in range(draws)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _summary(report: dict) -> dict:
    z, g = report["zsl"], report["gzsl"]
    out = {"zsl_images": z["images"], "zsl_map": 100 * z["map"], "gzsl_images": g["images"], "gzsl_map": 100 * g["map"]}
    out |= {f"zsl_f1@{k}": 100 * z["f1"][str(k)]["f1"] for k in ZSL_K}
    out |= {f"gzsl_f1@{k}": 100 * g["f1"][str(k)]["f1"] for k in GZSL_K}
    return out


@torch.no_grad()
def location_features(backbone, paths: list[str], batch_size: int = 32) -> torch.Tensor:
    """[images, 1 + 49, 1280]: pooled features first, then the 7 x 7 locations."""
    from qks.data import load_rgb
    from qks.transforms import eval_transform

    if not backbone.global_token:
        raise ValueError("compute features with a `lite:global` backbone")
    tf = eval_transform(backbone.preprocess)
    out = []
    for i in range(0, len(paths), batch_size):
        pixels = torch.stack([tf(load_rgb(p)) for p in paths[i:i + batch_size]])
        out.append(backbone.location_features(pixels))
    return torch.cat(out)


@torch.no_grad()
def variant_scores(backbone, feats: torch.Tensor, label_emb: torch.Tensor, pool: str) -> np.ndarray:
    """[images, labels] scores of one variant and pooling from shared features (pooled first)."""
    x = feats if backbone.global_token else feats[:, 1:]
    if pool == "global":
        x = feats[:, :1]
    tokens = backbone.tokens_from_features(x)  # [B, N, D]
    sims = torch.einsum("bnd,ld->bnl", tokens, label_emb)
    if pool in ("max", "global"):
        return sims.amax(dim=1).numpy()
    if pool == "mean":
        return sims.mean(dim=1).numpy()
    raise ValueError(f"unknown pool {pool!r}")


def run(data: Path, variants: list[str], pools: list[str], cache_dir: Path | None, limit: int | None) -> dict:
    from qks.backbones import create_backbone
    from qks.data import read_label_lists, read_manifest
    from qks.metrics import zsl_gzsl_report
    from qks.prompts import LabelEmbedder, load_prompts

    seen, unseen = read_label_lists(data / "seen.txt", data / "unseen.txt")
    labels = seen + unseen
    manifest = read_manifest(data / "test.jsonl", labels)
    samples = manifest.samples[:limit] if limit else manifest.samples
    targets = np.stack([s.targets({n: j for j, n in enumerate(labels)}) for s in samples])
    unseen_mask = np.array([name in set(unseen) for name in labels])
    templates = load_prompts("default")

    t0 = time.perf_counter()
    feat_backbone = create_backbone("lite:global")
    feats = location_features(feat_backbone, [s.path for s in samples])
    t_feats = time.perf_counter() - t0
    del feat_backbone

    results = {"data": str(data), "images": len(samples), "seen": seen, "unseen": unseen,
               "feature_seconds": round(t_feats, 1), "chance": chance(targets, unseen_mask), "rows": []}
    for spec in variants:
        t0 = time.perf_counter()
        backbone = create_backbone(spec)
        label_emb = LabelEmbedder(backbone, templates, cache_dir=cache_dir)(labels)
        build_s = time.perf_counter() - t0
        for pool in pools:
            scores = variant_scores(backbone, feats, label_emb, pool)
            row = {"variant": spec, "pool": pool, "build_seconds": round(build_s, 1)}
            row |= _summary(zsl_gzsl_report(scores, targets, unseen_mask, topk=ZSL_K + GZSL_K))
            results["rows"].append(row)
            print(_format_row(row), flush=True)
        del backbone
    return results


_COLS = ["zsl_map", "zsl_f1@1", "zsl_f1@3", "gzsl_map", "gzsl_f1@3", "gzsl_f1@5"]


def _format_row(row: dict) -> str:
    name = f"{row.get('variant', 'chance')} [{row.get('pool', '-')}]"
    return f"{name:<28}" + "".join(f"{row[c]:>11.1f}" for c in _COLS)


def table(results: dict) -> str:
    lines = [f"{'variant [pool]':<28}" + "".join(f"{c:>11}" for c in _COLS)]
    lines += [_format_row(r) for r in results["rows"]]
    lines.append(_format_row({"variant": "chance (random scores)", "pool": "-", **results["chance"]}))
    c = results["chance"]
    lines.append(f"{results['images']} test images; ZSL on {c['zsl_images']} images, {len(results['unseen'])} unseen "
                 f"labels; GZSL on {c['gzsl_images']} images, {len(results['seen']) + len(results['unseen'])} labels")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lite_zero_shot", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/qks-mosaic"),
                   help="a mosaic dataset (benchmarks.mosaic); generated with the defaults if missing")
    p.add_argument("--variants", default=";".join(DEFAULT_VARIANTS),
                   help="backbone specs separated by ';' (default: %(default)s)")
    p.add_argument("--pools", default=",".join(DEFAULT_POOLS), help="max, mean, global (default %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/qks-label-cache"), help="label-embedding cache")
    p.add_argument("--limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.data / "test.jsonl").is_file():
        from benchmarks.mosaic import MosaicConfig, generate

        print(f"generating the mosaic benchmark (defaults) under {args.data}", file=sys.stderr)
        generate(args.data, MosaicConfig(), progress=True)
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    pools = [q.strip() for q in args.pools.split(",") if q.strip()]
    results = run(args.data, variants, pools, args.cache_dir, args.limit)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
