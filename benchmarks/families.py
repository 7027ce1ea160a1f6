"""Real-size open_clip models of every tower family, exported as zero-shot bundles and timed.

For each model (random weights, `pretrained=None`: no download): `qks-export --zero-shot` with the
FP16 and INT8 graphs and their gates (verified on real photos from scikit-image), the image tower's
GFLOPs per image (torch's FlopCounterMode: a multiply-add counts 2), and ONNX Runtime CPU speed of the
fp32 and INT8 image graphs at batch 8 and one thread, through the runtime's own engine (median of
`--rounds` runs, the models interleaved so the shared machine's load hits each alike).

The SigLIP/SigLIP2 tokenizers are Hugging Face downloads; here the text side uses the tiny local
tokenizer of the tests (tests/data/tiny-siglip2-tokenizer) with a text vocabulary cut to its size.
That changes nothing on the image side that is timed.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.families --work /tmp/qks-families \\
        --json benchmarks/results/families.json --markdown benchmarks/results/families.md

Slow on a 2-core CPU (about 5 minutes a model); it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ["ViT-B-16", "ViT-B-16-SigLIP2", "MobileCLIP2-S0", "EVA02-B-16", "convnext_base", "RN50"]
LABELS = ["dog", "cat", "car", "tree", "beach", "person", "flower", "building"]
BATCH = 8
TINY_SIGLIP2_TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "data" / "tiny-siglip2-tokenizer"


def spec_for(model: str, work: Path) -> str:
    """`openclip:<model>:none`; for SigLIP models a copy of open_clip's config whose tokenizer is local."""
    if "siglip" not in model.lower():
        return f"openclip:{model}:none"
    import open_clip

    cfg = open_clip.get_model_config(model)
    vocab = len(json.loads((TINY_SIGLIP2_TOKENIZER / "tokenizer.json").read_text())["model"]["vocab"])
    cfg["text_cfg"].update(hf_tokenizer_name=str(TINY_SIGLIP2_TOKENIZER), vocab_size=vocab)
    path = work / f"{model.lower().replace('-', '_').replace('siglip', 'sl')}.json"  # no "siglip" in the
    path.write_text(json.dumps(cfg, indent=1))  # name: open_clip would pick its own SigLIP tokenizer by name
    return f"openclip:{path}:none"


def photos(work: Path) -> Path:
    """scikit-image's sample photos as files (real images for the verification gates)."""
    import numpy as np
    import skimage.data as data
    from PIL import Image

    folder = work / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"):
        img = np.asarray(getattr(data, name)())
        img = img[..., :3] if img.ndim == 3 else np.stack([img] * 3, axis=-1)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{name}.png")
    return folder


def gflops(backbone) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = backbone.preprocess.size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone.zero_shot_features(backbone.image_tokens(torch.zeros(1, 3, size, size)))
    return counter.get_total_flops() / 1e9


def export(model: str, work: Path, images: Path) -> dict:
    from qks.export.bundle import export_zero_shot

    from qks.backbones import create_backbone

    spec = spec_for(model, work)
    prompts = work / "one_prompt.txt"
    prompts.write_text("a photo of a {}.\n")
    out = work / model
    t = time.perf_counter()
    report = export_zero_shot(spec, out, labels={"labels": LABELS}, prompts=prompts, fp16=True, int8=True,
                              calibration_images=images, log=lambda m: print(f"  {model}: {m}", flush=True))
    seconds = time.perf_counter() - t
    m = report.manifest
    ver = {name: g["verification"] for name, g in m["graphs"].items()}
    int8 = ver["image_encoder_int8"]
    fp16 = ver["image_encoder_fp16"]
    return {"model": model, "spec": spec, "bundle": str(out), "family": m["model"]["family"],
            "image_size": m["preprocess"]["size"], "token_dim": m["model"]["token_dim"],
            "embed_dim": m["model"]["embed_dim"] - 1, "gflop_per_image": round(gflops(create_backbone(spec)), 2),
            "export_s": round(seconds, 1),
            "bytes": {name: g["bytes"] for name, g in m["graphs"].items()},
            "fp32_vs_pytorch_cos_min": min(v["query_features"]["cosine_min"] for k, v in ver["image_encoder"].items()
                                           if k in ("random", "calibration")),
            "fp16_top5": fp16.get("top5_agreement"), "int8_summary": m["graphs"]["image_encoder_int8"].get("int8", {}),
            "int8_verification": {k: v for k, v in int8.items() if k in ("random", "calibration", "top5_agreement")}}


def time_graphs(rows: list[dict], rounds: int) -> None:
    import numpy as np
    from qks.runtime.backend import select_backend
    from qks.runtime.bundle import Bundle

    engines = {}
    for row in rows:
        bundle = Bundle.load(row["bundle"])
        pixels = np.random.default_rng(0).standard_normal((BATCH, 3, row["image_size"], row["image_size"]),
                                                          dtype=np.float32)
        for precision in ("fp32", "int8"):
            engine, _ = select_backend(bundle, "ort-cpu", threads=1, precision=precision)
            engine.run({"pixels": pixels})  # warm-up
            engines[row["model"], precision] = (engine, pixels)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for key, (engine, pixels) in engines.items():
            t = time.perf_counter()
            engine.run({"pixels": pixels})
            times[key].append(time.perf_counter() - t)
    for row in rows:
        for precision in ("fp32", "int8"):
            ms = statistics.median(times[row["model"], precision]) * 1000
            row[precision] = {"ms_per_batch": round(ms, 1), "images_per_s": round(BATCH / ms * 1000, 2),
                              "runs_ms": [round(t * 1000, 1) for t in times[row["model"], precision]]}
    for engine, _ in engines.values():
        engine.close()


def markdown(rows: list[dict], machine: dict) -> str:
    base = next((r for r in rows if r["model"] == "ViT-B-16"), rows[0])
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} vCPUs; ONNX Runtime {machine['onnxruntime']}, 1 thread, "
             f"batch {BATCH}, median of {machine['rounds']} interleaved runs; random weights (speed does not depend on them).",
             "",
             "| model | family | input | GFLOP/image | fp32 images/s | INT8 images/s | INT8 / fp32 | fp32 vs ViT-B-16 | INT8 top-5 | export s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["int8"]["images_per_s"] / r["fp32"]["images_per_s"]
        vs = r["fp32"]["images_per_s"] / base["fp32"]["images_per_s"]
        top5 = r["int8_verification"].get("top5_agreement")
        lines.append(f"| {r['model']} | {r['family']} | {r['image_size']} | {r['gflop_per_image']:.1f} | "
                     f"{r['fp32']['images_per_s']:.2f} | {r['int8']['images_per_s']:.2f} | {ratio:.2f}x | {vs:.2f}x | "
                     f"{top5 if top5 is None else f'{top5:.0%}'} | {r['export_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the bundles (about 2 GB)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reuse", action="store_true", help="keep bundles already exported under --work")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    import onnxruntime

    args.work.mkdir(parents=True, exist_ok=True)
    images = photos(args.work)
    rows = []
    for model in args.models.split(","):
        saved = args.work / f"{model}.json"
        if args.reuse and saved.is_file():
            rows.append(json.loads(saved.read_text()))
            continue
        print(f"exporting {model}", flush=True)
        row = export(model, args.work, images)
        saved.write_text(json.dumps(row, indent=1))
        rows.append(row)
    time_graphs(rows, args.rounds)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    machine = {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "rounds": args.rounds,
               "load_1min": os.getloadavg()[0]}
    table = markdown(rows, machine)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "batch": BATCH, "threads": 1, "rows": rows}, indent=1))
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
