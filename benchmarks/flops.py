"""FLOPs per image of the QKS image path, and this machine's measured matrix-multiply peak.

Analytic count (1 multiply-add = 2 FLOPs; matrix products only, which are > 99 % of the work;
LayerNorm, softmax, GELU and residual adds are left out and listed separately):

    python benchmarks/flops.py                       # ViT-B-16 at 224, head L=7, Nq=12 (the paper)
    python benchmarks/flops.py --check               # + torch.utils.flop_counter on the real model
    python benchmarks/flops.py --peak                # + measured GEMM peaks: ONNX Runtime fp32/int8, OpenVINO
                                                     #   fp32/bf16/int8, torch fp32/bf16, numpy fp32
    python benchmarks/flops.py --json out.json

The trunk is open_clip's ViT (patch embedding, `layers` pre-LN blocks of attention + MLP over
1 + (S/P)^2 tokens); the head is `qks.head.QueryHead` (self-attention over Nq queries,
cross-attention from the queries to the trunk's tokens, FFN; then the C -> D projection).
"""

from __future__ import annotations

import argparse
import json
import os

VIT_B_16 = {"image_size": 224, "patch": 16, "width": 768, "layers": 12, "mlp": 3072}
PAPER_HEAD = {"layers": 7, "queries": 12, "width": 768, "ffn": 3072, "embed_dim": 512}


def trunk_macs(image_size: int, patch: int, width: int, layers: int, mlp: int) -> dict:
    n = (image_size // patch) ** 2 + 1  # patches + class token
    c = width
    per_layer = {"qkv": 3 * n * c * c, "attn_scores": n * n * c, "attn_values": n * n * c, "out_proj": n * c * c,
                 "mlp": 2 * n * c * mlp}
    return {"tokens": n, "patch_embed": (n - 1) * c * 3 * patch * patch,
            "per_layer": per_layer, "layers": layers, "total": (n - 1) * c * 3 * patch * patch
            + layers * sum(per_layer.values())}


def head_macs(tokens: int, layers: int, queries: int, width: int, ffn: int, embed_dim: int) -> dict:
    q, m, c = queries, tokens, width
    query_path = {"self_qkvo": 4 * q * c * c, "self_attn": 2 * q * q * c, "cross_q_out": 2 * q * c * c,
                  "cross_attn": 2 * q * m * c, "ffn": 2 * q * c * ffn}
    token_path = {"cross_kv": 2 * m * c * c}  # the keys and values of the image tokens
    per_layer = sum(query_path.values()) + sum(token_path.values())
    return {"per_layer_query_path": query_path, "per_layer_token_path": token_path, "layers": layers,
            "projection": q * c * embed_dim, "total": layers * per_layer + q * c * embed_dim,
            "token_path_total": layers * sum(token_path.values()),
            "query_path_total": layers * sum(query_path.values()) + q * c * embed_dim}


def count(trunk: dict = VIT_B_16, head: dict = PAPER_HEAD) -> dict:
    t = trunk_macs(**trunk)
    h = head_macs(t["tokens"], **head)
    total = t["total"] + h["total"]
    attn = t["layers"] * (t["per_layer"]["attn_scores"] + t["per_layer"]["attn_values"])
    return {"trunk_gflop": 2 * t["total"] / 1e9, "head_gflop": 2 * h["total"] / 1e9, "total_gflop": 2 * total / 1e9,
            "trunk_attention_products_gflop": 2 * attn / 1e9,
            "head_query_path_gflop": 2 * h["query_path_total"] / 1e9,
            "head_token_path_gflop": 2 * h["token_path_total"] / 1e9,
            # what image_encoder.int8.onnx (scope "tokens") runs in INT8: the trunk's weight products
            # (not the patch-embedding Conv, not QK^T / AV) and the head's token keys/values
            "int8_share": (t["total"] - t["patch_embed"] - attn + h["token_path_total"]) / total,
            "trunk": t, "head": h}


def torch_count(backbone: str = "openclip:ViT-B-16:none") -> float:
    """GFLOPs of QKSModel.query_features on one image, counted by torch.utils.flop_counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from qks.config import RECIPES, ModelConfig
    from qks.model import QKSModel

    model = QKSModel(ModelConfig(backbone=backbone, head=RECIPES["nuswide"])).eval().requires_grad_(False)
    size = int(model.backbone.preprocess.size)
    # nn.MultiheadAttention's native fast path (open_clip's trunk in eval) is invisible to the counter:
    # count the same maths on the composite path
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as fc:  # parameters frozen: no autograd graph
            model.query_features(torch.randn(1, 3, size, size))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return fc.get_total_flops() / 1e9


def measured_peak(n: int = 2048, reps: int = 5, threads: int | None = None) -> dict:
    """Median GOP/s of one n x n x n product per engine and precision that runs here
    (`qks.runtime.bench.gemm_peak`, which `qks-bench --peak` uses too), plus numpy fp32;
    `--peak` imports torch first, so the torch fp32 / bf16 (oneDNN) peaks are measured as well."""
    import numpy as np
    import torch  # noqa: F401 - gemm_peak measures torch's products only when torch is imported
    from qks.runtime.bench import _gemm_timer, gemm_peak

    out = gemm_peak(n, reps, threads)
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    out["numpy_fp32"] = 2.0 * n ** 3 / _gemm_timer(lambda: a @ a, reps) / 1e9
    out["threads"] = threads or os.cpu_count()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="also count with torch.utils.flop_counter (needs torch)")
    ap.add_argument("--peak", action="store_true", help="also measure the GEMM peak of this machine")
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads for --peak (numpy: set OPENBLAS_NUM_THREADS)")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    c = count()
    print(f"ViT-B-16 @224 + QKS head (L={PAPER_HEAD['layers']}, Nq={PAPER_HEAD['queries']}, "
          f"C={PAPER_HEAD['width']}): FLOPs per image (2 x multiply-adds of matrix products)")
    print(f"  trunk {c['trunk_gflop']:.2f} GFLOP (of which attention products QK^T, AV: "
          f"{c['trunk_attention_products_gflop']:.2f})")
    print(f"  head  {c['head_gflop']:.2f} GFLOP (keys/values of the {c['trunk']['tokens']} tokens: "
          f"{c['head_token_path_gflop']:.2f}; query path: {c['head_query_path_gflop']:.3f})")
    print(f"  total {c['total_gflop']:.2f} GFLOP; share in INT8 products in image_encoder.int8.onnx: "
          f"{c['int8_share']:.1%}")
    out = {"analytic": c}
    if args.check:
        g = torch_count()
        out["torch_flop_counter_gflop"] = g
        print(f"  torch.utils.flop_counter: {g:.2f} GFLOP ({g / c['total_gflop'] - 1:+.2%} vs analytic; on the CPU it "
              "has no formula for the flash-attention kernel, i.e. the trunk's QK^T and AV)")
    if args.peak:
        p = measured_peak(threads=args.threads)
        out["peak"] = p
        print(f"  measured {p['n']}^3 GEMM, {p['threads']} thread(s), GOP/s: "
              + ", ".join(f"{k} {v:.0f}" for k, v in p.items() if isinstance(v, float)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
