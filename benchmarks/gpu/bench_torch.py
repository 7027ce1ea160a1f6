"""The QKS image path (pixels -> query features) in PyTorch on one GPU: correctness, then speed.

1. Correctness first: every mode's query features against fp32 eager (TF32 off) on the same
   seeded inputs: per-image cosine (min), max |error| relative to the output scale, and top-5 label
   agreement (max-over-queries scoring against label embeddings from the model's own text tower).
2. Speed per mode and batch size: warm-up, then timed iterations (CUDA events on the GPU,
   perf_counter on the CPU): median ms per batch, images/s, achieved TFLOP/s (FLOPs per image
   counted by torch.utils.flop_counter on the model) and that as a fraction of the matrix-multiply
   peak measured in the same run (a large matmul in the mode's dtype).

Modes: fp32 (eager, TF32 off), tf32, fp16 / bf16 (torch.autocast), fp16-math (autocast with
scaled-dot-product attention forced to the math kernel: what SDPA's fused kernels bring),
fp16-graph / bf16-graph (autocast, CUDA-graph replay of a captured batch), fp16-compile /
bf16-compile (torch.compile, inductor, for --compile-batches only: compiling takes a minute each).

    python benchmarks/gpu/bench_torch.py --out results/            # on a GPU machine
    python benchmarks/gpu/bench_torch.py --device cpu --quick --backbone openclip:tests/data/qks-tiny-vit.json:none \
        --head tiny --out /tmp/r                                      # smoke test on a CPU

Writes OUT/gpu_bench.json and OUT/gpu_bench.md (rewritten after every measurement, so a run cut
short keeps what it measured). Random weights (`openclip:ViT-B-16:none`) are fine for speed;
parity on random weights is a weak check (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `qks` without installing it

LABELS = ["animal", "beach", "bird", "boats", "buildings", "car", "cat", "clouds", "dog", "flowers", "grass",
          "horses", "lake", "mountain", "ocean", "person", "plants", "road", "sky", "snow", "street", "sunset",
          "tree", "water", "window", "airport", "bridge", "castle", "coral", "fox", "glacier", "harbor", "rainbow",
          "temple", "zebra"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "a photo of the large {}.", "a photo of many {}."]
ALL_MODES = ["fp32", "tf32", "fp16", "bf16", "fp16-math", "fp16-graph", "bf16-graph", "fp16-compile", "bf16-compile"]
TOPK = 5


def build(args, torch):
    from qks.config import RECIPES, HeadConfig, ModelConfig
    from qks.model import QKSModel
    from qks.prompts import LabelEmbedder

    head = RECIPES["nuswide"] if args.head == "nuswide" else HeadConfig(layers=2, queries=4, heads=4, ffn=96)
    torch.manual_seed(0)
    model = QKSModel(ModelConfig(backbone=args.backbone, head=head)).eval().requires_grad_(False).to(args.device)
    with torch.no_grad():
        bank = LabelEmbedder(model.backbone, TEMPLATES)(LABELS).to(args.device).float()
    return model, bank


def flops_per_image(model, size, torch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size, device=next(model.parameters()).device)
    # nn.MultiheadAttention's native fast path (open_clip's trunk in eval) is invisible to the counter:
    # count the same maths on the composite path
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as fc:  # parameters frozen: no autograd graph
            model.query_features(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return float(fc.get_total_flops())


def matmul_peak(torch, device, dtype, n: int, reps: int) -> float:
    """TFLOP/s of an n x n x n matmul in `dtype` (median of `reps`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_fn(torch, device, lambda: a @ b, warmup=3, iters=reps)
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def time_fn(torch, device, fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() (CUDA events on the GPU, each call timed separately)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


class Runner:
    """A mode's forward for one batch size: fn() runs the model on its static input."""

    def __init__(self, torch, model, mode: str, x, device: str):
        self.torch, self.model, self.mode, self.x, self.device = torch, model, mode, x, device
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode.split("-")[0])
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        torch.backends.cudnn.allow_tf32 = mode == "tf32"
        self.out = None
        if mode.endswith("-compile"):
            self.compiled = torch.compile(model.query_features, dynamic=False)
        if mode.endswith("-graph"):
            self._capture()

    def _forward(self, fn=None):
        torch = self.torch
        fn = fn or self.model.query_features
        with torch.no_grad():
            if self.dtype is None:
                return fn(self.x)
            with torch.autocast(device_type=self.device, dtype=self.dtype):
                if self.mode.endswith("-math"):
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    with sdpa_kernel(SDPBackend.MATH):
                        return fn(self.x)
                return fn(self.x)

    def _capture(self):
        torch = self.torch
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self._forward()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._forward()

    def __call__(self):
        if self.mode.endswith("-graph"):
            self.graph.replay()
            return self.out
        if self.mode.endswith("-compile"):
            return self._forward(self.compiled)
        return self._forward()


def parity(torch, out, ref, bank) -> dict:
    o, r = out.float(), ref.float()
    cos = torch.nn.functional.cosine_similarity(o.flatten(1), r.flatten(1), dim=1)
    so = torch.einsum("bqd,ld->bql", o, bank).amax(1)
    sr = torch.einsum("bqd,ld->bql", r, bank).amax(1)
    k = min(TOPK, bank.shape[0])
    to, tr = so.topk(k, dim=1).indices.tolist(), sr.topk(k, dim=1).indices.tolist()
    agree = sum(len(set(a) & set(b)) / k for a, b in zip(to, tr, strict=True)) / len(to)
    return {"cosine_min": float(cos.min()), "max_abs_err": float((o - r).abs().max()),
            "rel_err": float((o - r).abs().max() / r.abs().max()), f"top{TOPK}_agreement": agree,
            "finite": bool(torch.isfinite(o).all())}


def write(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_bench.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    m = report["machine"]
    lines = [f"# QKS image path in PyTorch: {m['device_name']}", "",
             f"{report['date']}; torch {m['torch']}, CUDA {m['cuda']}; model {report['model']['backbone']} "
             f"(head L={report['model']['layers']}, Nq={report['model']['queries']}); "
             f"{report['model']['gflop_per_image']:.2f} GFLOP per image (torch.utils.flop_counter)", "",
             f"Measured matmul peak (n = {report['peak']['n']}): "
             + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in report["peak"].items() if k != "n"), "",
             f"## Correctness vs fp32 eager (batch {report['parity_batch']})", "",
             "| mode | cosine min | max abs err / scale | top-5 agreement | finite |", "|---|---|---|---|---|"]
    for mode, p in report["parity"].items():
        if "error" in p:
            lines.append(f"| {mode} | {p['error']} | | | |")
        else:
            lines.append(f"| {mode} | {p['cosine_min']:.6f} | {p['rel_err']:.2e} | {p['top5_agreement']:.1%} | "
                         f"{p['finite']} |")
    lines += ["", "## Speed", "", "| mode | batch | ms / batch | images/s | TFLOP/s | of peak |",
              "|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['batch']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['mode']} | {r['batch']} | {r['ms']:.3f} | {r['images_per_s']:.1f} | "
                         f"{r['tflops']:.1f} | {r['fraction_of_peak']:.1%} |")
    lines += ["", f"Method: {report['method']}", ""]
    (out_dir / "gpu_bench.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="results folder")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--backbone", default="openclip:ViT-B-16:none")
    ap.add_argument("--head", default="nuswide", choices=["nuswide", "tiny"], help="nuswide: L=7, Nq=12 (the paper)")
    ap.add_argument("--modes", default=",".join(ALL_MODES))
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--compile-batches", default="8,64", help="batch sizes the -compile modes run (slow to compile)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-n", type=int, default=8192)
    ap.add_argument("--parity-batch", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="smoke test: batch 1,2; 2 iterations; small peak matmul")
    args = ap.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_torch: error: torch sees no CUDA device (use --device cpu --quick for a smoke test)")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad:
        sys.exit(f"bench_torch: error: unknown mode {bad[0]!r} (one of {', '.join(ALL_MODES)})")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    compile_batches = {int(b) for b in args.compile_batches.split(",") if b}
    if args.quick:
        batches, args.iters, args.warmup, args.peak_n, args.parity_batch = [1, 2], 2, 1, 256, 2
        compile_batches = set()
    if args.device == "cpu":  # CUDA graphs and fp16 autocast are GPU things; bf16 autocast runs on the CPU
        modes = [m for m in modes if m in ("fp32", "bf16", "bf16-compile") and
                 (not m.endswith("-compile") or compile_batches)]

    model, bank = build(args, torch)
    size = int(model.backbone.preprocess.size)
    flops = flops_per_image(model, size, torch)
    dev_name = torch.cuda.get_device_name(0) if args.device == "cuda" else (platform.processor() or "cpu")
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"device": args.device, "device_name": dev_name, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "model": {"backbone": args.backbone, "layers": model.config.head.layers,
                  "queries": model.config.head.queries, "image_size": size, "gflop_per_image": flops / 1e9,
                  "labels": len(LABELS), "templates": len(TEMPLATES)},
        "method": (f"seeded random pixels; {args.warmup} warm-up and {args.iters} timed iterations per mode and "
                   "batch, median; " + ("CUDA events" if args.device == "cuda" else "time.perf_counter")
                   + " around each forward (inputs already on the device; outputs not copied back); fraction of "
                   "peak = images/s x FLOPs per image / the measured matmul peak of the mode's dtype "
                   "(fp32 modes: fp32 without TF32; tf32: TF32)"),
        "peak": {"n": args.peak_n},
        "parity_batch": args.parity_batch,
        "parity": {}, "results": [],
    }
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if args.device == "cpu":
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for name, dt in dtypes.items():
        report["peak"][name] = matmul_peak(torch, args.device, dt, args.peak_n, max(args.iters // 3, 2))
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        report["peak"]["tf32"] = matmul_peak(torch, args.device, torch.float32, args.peak_n, 5)
        torch.backends.cuda.matmul.allow_tf32 = False
    write(args.out, report)

    # 1. correctness
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.parity_batch, 3, size, size, generator=g).to(args.device)
    ref = Runner(torch, model, "fp32", x, args.device)().float().clone()
    for mode in modes:
        if mode == "fp32":
            continue
        try:
            out = Runner(torch, model, mode, x, args.device)()
            report["parity"][mode] = parity(torch, out, ref, bank)
        except Exception as e:  # a mode that fails here is reported, not fatal
            report["parity"][mode] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        write(args.out, report)
        print(f"parity {mode}: {report['parity'][mode]}", flush=True)

    # 2. speed
    peak_of = {"fp32": "fp32", "tf32": "tf32", "fp16": "fp16", "bf16": "bf16"}
    for mode in modes:
        for b in batches:
            if mode.endswith("-compile") and b not in compile_batches:
                continue
            rec = {"mode": mode, "batch": b}
            try:
                xb = torch.randn(b, 3, size, size, generator=g).to(args.device)
                run = Runner(torch, model, mode, xb, args.device)
                ms = time_fn(torch, args.device, run, args.warmup, args.iters)
                ips = b * 1e3 / ms
                tflops = ips * flops / 1e12
                peak = report["peak"].get(peak_of[mode.split("-")[0]])
                rec.update(ms=ms, images_per_s=ips, tflops=tflops, fraction_of_peak=tflops / peak if peak else None)
            except Exception as e:  # out of memory at a large batch, a compile failure: recorded
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            report["results"].append(rec)
            write(args.out, report)
            print(f"{mode:<13} batch {b:>4}: " + (f"{rec['ms']:9.3f} ms  {rec['images_per_s']:9.1f} img/s  "
                                                 f"{rec['fraction_of_peak']:.1%} of peak" if "ms" in rec
                                                 else rec["error"]), flush=True)
    print(f"wrote {args.out / 'gpu_bench.json'} and {args.out / 'gpu_bench.md'}")


if __name__ == "__main__":
    main()
