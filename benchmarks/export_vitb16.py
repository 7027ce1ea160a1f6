"""Export the paper's configuration (open_clip ViT-B-16, head L=7 / Nq=12) and report what it took.

Random weights (`openclip:ViT-B-16:none`: no download), an untrained head, NUS-WIDE-style labels
and the default 85-template prompt pool; real photos from scikit-image as calibration images.
Prints graph sizes, the export's time per stage, and the parity recorded in the manifest; then
times ONNX Runtime CPU on the fp32 and fp16 image graphs (batch 1 and 8, median of a few runs).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/export_vitb16.py [--out DIR] [--tensorrt] [--no-fp16]

Slow on a 2-core CPU (several minutes); it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LABELS = ["animal", "beach", "bird", "boats", "buildings", "car", "cat", "clouds", "dog", "flowers", "grass",
          "horses", "lake", "mountain", "ocean", "person", "plants", "road", "sky", "snow", "street", "sunset",
          "tree", "water", "window"]
UNSEEN = ["airport", "bridge", "castle", "coral", "fox", "glacier", "harbor", "rainbow", "temple", "zebra"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="bundle folder (default: a temporary one, removed)")
    ap.add_argument("--tensorrt", action="store_true", help="also build TensorRT (for RTX) engines")
    ap.add_argument("--no-fp16", action="store_true")
    ap.add_argument("--runs", type=int, default=3, help="timed ORT runs per batch size")
    ap.add_argument("--report-only", type=Path, default=None, metavar="BUNDLE",
                    help="print the report of an existing bundle (no export)")
    args = ap.parse_args()
    if args.report_only:
        m = json.loads((args.report_only / "manifest.json").read_text())
        for k, v in m["export"]["seconds"].items():
            print(f"  {k:<22} {v:8.1f} s")
        report(args.report_only, m, args.runs)
        return

    import torch
    from qks.export.bundle import export_bundle_report

    from qks.checkpoint import save_checkpoint
    from qks.config import RECIPES, ModelConfig
    from qks.model import QKSModel
    from qks.prompts import load_prompts

    work = Path(tempfile.mkdtemp(prefix="qks-vitb16-"))
    out = args.out or work / "bundle"
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        cfg = ModelConfig(backbone="openclip:ViT-B-16:none", head=RECIPES["nuswide"])
        model = QKSModel(cfg)
        ckpt = save_checkpoint(work / "best.pt", model, seen=LABELS, unseen=UNSEEN, prompts=load_prompts())
        t_model = time.perf_counter() - t0
        cal = work / "calibration"
        cal.mkdir()
        import skimage

        data = Path(skimage.__file__).parent / "data"
        for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                     "hubble_deep_field.jpg", "retina.jpg", "immunohistochemistry.png", "color.png"):
            if (data / name).is_file():
                shutil.copy(data / name, cal / name)
        print(f"model + checkpoint: {t_model:.1f} s; calibration images: {len(list(cal.iterdir()))}")

        t0 = time.perf_counter()
        result = export_bundle_report(ckpt, out, fp16=not args.no_fp16, tensorrt=args.tensorrt,
                                      calibration_images=cal, log=lambda m: print(f"  [{time.perf_counter() - t0:6.1f} s] {m}",
                                                                                   flush=True))
        total = time.perf_counter() - t0
        m = result.manifest
        print(f"\nexport total: {total:.1f} s (torch {torch.__version__}, {os.cpu_count()} CPUs)")
        for k, v in m["export"]["seconds"].items():
            print(f"  {k:<22} {v:8.1f} s")
        report(out, m, args.runs)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


def report(out: Path, m: dict, runs: int) -> None:
    """Sizes and parity from the manifest; ONNX Runtime CPU timings of the image graphs."""
    import numpy as np
    from qks.export.verify import ort_session

    print("\ngraphs:")
    for name, g in m["graphs"].items():
        print(f"  {name:<20} {g['file']:<26} {g['bytes'] / 1e6:8.1f} MB  precision {g['precision']}")
        for kind in ("random", "calibration", "prompts", "default_bank"):
            if kind not in g["verification"]:
                continue
            (out_name, met), = g["verification"][kind].items()
            extra = f", top-5 agreement {met['top5_agreement']:.1%}" if "top5_agreement" in met else ""
            print(f"      {kind:<12} {out_name:<17} max|err| {met['max_abs_err']:.3g} "
                  f"(rel {met['rel_err']:.3g}, scale {met['scale']:.3g}), cosine min {met['cosine_min']:.7f}"
                  f"{extra}  [{met['samples']} samples, vs {g['verification']['reference']}]")
    print(f"tokenizer.json: {m['tokenizer']['verification']}")
    for e in m["engines"]:
        size = (out / e["file"]).stat().st_size / 1e6
        print(f"engine: {e['file']} {size:.1f} MB ({e['trt_module']} {e['trt_version']}, SM{e['sm']}, "
              f"{e['precision']}, profile {e['profile']})")
    print("\nONNX Runtime CPU, image graph (median ms):")
    size = m["preprocess"]["size"]
    for name in [n for n in ("image_encoder", "image_encoder_fp16") if n in m["graphs"]]:
        sess = ort_session(out / m["graphs"][name]["file"])
        for b in (1, 8):
            x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
            sess.run(None, {"pixels": x})
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, {"pixels": x})
                times.append((time.perf_counter() - t) * 1e3)
            print(f"  {name:<20} batch {b}: {sorted(times)[len(times) // 2]:8.1f} ms ({runs} runs)")


if __name__ == "__main__":
    main()
