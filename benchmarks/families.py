"""Real-size open_clip models of every tower family, exported as zero-shot bundles and timed.

For each model (random weights, `pretrained=None`: no download): `qks-export --zero-shot` (the default
bank of 140 everyday labels, one prompt) with the FP16 graph, then the INT8 graph where it passes its
gate (both verified on real photos from scikit-image), the image tower's GFLOPs per image (torch's
FlopCounterMode: a multiply-add counts 2), `qks-infer` and `qks-tag` over the photos (do they agree),
and ONNX Runtime CPU speed of the fp32 and INT8 image graphs at batch 8 and one thread, through the
runtime's own engine (median of `--rounds` runs, the models interleaved so the shared machine's load
hits each alike).

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


def gflops(spec: str) -> float:
    """The image tower's FLOPs for one image. nn.MultiheadAttention's inference fast path is one fused
    op that the counter cannot see: it is switched off while counting."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from qks.backbones import create_backbone

    backbone = create_backbone(spec)
    size = backbone.preprocess.size
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            backbone.zero_shot_features(backbone.image_tokens(torch.zeros(1, 3, size, size)))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return round(counter.get_total_flops() / 1e9, 2)


def export(model: str, work: Path, images: Path) -> dict:
    """The zero-shot bundle with its FP16 graph, then the INT8 graph added where it passes its gate
    (a failed gate is recorded: `qks-export --int8` would stop there with that line)."""
    from qks.export.bundle import export_zero_shot_report
    from qks.export.errors import ExportError
    from qks.export.int8 import add_int8_graph

    spec = spec_for(model, work)
    prompts = work / "one_prompt.txt"
    prompts.write_text("a photo of a {}.\n")
    out = work / model
    log = lambda m: print(f"  {model}: {m}", flush=True)  # noqa: E731
    t = time.perf_counter()
    report = export_zero_shot_report(spec, out, prompts=prompts, fp16=True, calibration_images=images, log=log)
    # default bank: the 140 everyday labels
    row = {"model": model, "spec": spec, "bundle": str(out), "family": report.manifest["model"]["family"],
           "image_size": report.manifest["preprocess"]["size"], "token_dim": report.manifest["model"]["token_dim"],
           "embed_dim": report.manifest["model"]["embed_dim"] - 1,
           "labels": report.manifest["label_banks"]["default"]["count"]}
    ver = {name: g["verification"] for name, g in report.manifest["graphs"].items()}
    row["fp32_vs_pytorch_cos_min"] = min(v["query_features"]["cosine_min"] for k, v in ver["image_encoder"].items()
                                         if k in ("random", "calibration"))
    row["fp16_top5"] = ver["image_encoder_fp16"].get("top5_agreement")
    try:
        rec = add_int8_graph(out, images, log=log)
        row["int8_summary"] = {k: v for k, v in rec.get("int8", {}).items() if k != "ops"}
        row["int8_verification"] = {k: v for k, v in rec["verification"].items()
                                    if k in ("random", "calibration", "top5_agreement")}
    except ExportError as e:  # still timed: the same quantization, outside the bundle, marked as failing its gate
        row["int8_gate_failed"] = str(e)
        row["int8_ungated"] = ungated_int8(out, work / f"{model}.int8-ungated.onnx")
    row["export_s"] = round(time.perf_counter() - t, 1)
    return row


def ungated_int8(bundle: Path, out: Path) -> str:
    from qks.export.int8 import quantize_image_encoder

    if not out.is_file():
        quantize_image_encoder(bundle / "image_encoder.onnx", out, fuse=False)
    return str(out)


def tag_with_both(row: dict, images: Path) -> None:
    """qks-infer and qks-tag (C++) over the photo folder with the bundle: do they tag it, and alike?"""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    qks_tag = root / "cpp" / "build" / "qks-tag"
    common = [str(images), "--bundle", row["bundle"], "--all-scores", "--threads", "1", "--no-progress"]
    infer = subprocess.run([str(Path(sys.executable).parent / "qks-infer"), *common], capture_output=True, text=True)
    row["qks_infer_exit"] = infer.returncode
    if not qks_tag.is_file():
        row["qks_tag"] = "not built (make cpp)"
        return
    import onnxruntime

    lib = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.1.*"))[-1]
    tag = subprocess.run([str(qks_tag), *common], capture_output=True, text=True,
                         env={**os.environ, "QKS_ORT_LIBRARY": str(lib)})
    row["qks_tag_exit"] = tag.returncode
    py = {r["image"]: r["scores"] for r in map(json.loads, infer.stdout.splitlines())}
    cpp = {r["image"]: r["scores"] for r in map(json.loads, tag.stdout.splitlines())}
    row["tagged_images"] = len(py)
    row["qks_tag_vs_qks_infer_max_abs"] = max((abs(cpp[i][k] - v) for i in py for k, v in py[i].items()),
                                              default=None) if set(cpp) == set(py) else "different images"


def time_graphs(rows: list[dict], rounds: int) -> None:
    """Median ms per batch of each bundle's fp32 and INT8 image graphs (ONNX Runtime CPU, 1 thread)."""
    import numpy as np
    from qks.engines.ort import OrtEngine

    engines = {}
    for row in rows:
        size = row["image_size"]
        pixels = np.random.default_rng(0).standard_normal((BATCH, 3, size, size), dtype=np.float32)
        int8 = row.get("int8_ungated") or Path(row["bundle"]) / "image_encoder.int8.onnx"
        for precision, path in (("fp32", Path(row["bundle"]) / "image_encoder.onnx"), ("int8", int8)):
            engine = OrtEngine(path, "cpu", intra_op_threads=1)
            engine.run({"pixels": pixels})  # warm-up
            engines[row["model"], precision] = (engine, pixels)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for key, (engine, pixels) in engines.items():
            t = time.perf_counter()
            engine.run({"pixels": pixels})
            times[key].append(time.perf_counter() - t)
    by_model = {row["model"]: row for row in rows}
    for (model, precision), runs in times.items():
        ms = statistics.median(runs) * 1000
        by_model[model][precision] = {"ms_per_batch": round(ms, 1), "images_per_s": round(BATCH / ms * 1000, 2),
                                      "runs_ms": [round(t * 1000, 1) for t in runs]}
    for engine, _ in engines.values():
        engine.close()


def markdown(rows: list[dict], machine: dict) -> str:
    base = next((r for r in rows if r["model"] == "ViT-B-16"), rows[0])
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} vCPUs, load {machine['load_1min']:.1f}; ONNX Runtime "
             f"{machine['onnxruntime']}, 1 thread, batch {BATCH}, median of {machine['rounds']} interleaved runs; "
             "random weights (speed does not depend on them).",
             "",
             "| model | family | input | GFLOP/image | fp32 images/s | INT8 images/s | INT8 / fp32 | fp32 / ViT-B-16's "
             "| INT8 gate (top-5) | qks-tag vs qks-infer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fp32, int8 = r["fp32"]["images_per_s"], r["int8"]["images_per_s"]
        if "int8_gate_failed" in r:
            gate = "fail: " + r["int8_gate_failed"].split(" is ")[-1].split(" on ")[0] + " (graph timed, not shipped)"
        else:
            gate = f"pass ({r['int8_verification']['top5_agreement']:.1%})"
        tag = r.get("qks_tag_vs_qks_infer_max_abs")
        tag = f"{tag:.1e} max diff" if isinstance(tag, float) else str(tag or r.get("qks_tag", "-"))
        lines.append(f"| {r['model']} | {r['family']} | {r['image_size']} | {r['gflop_per_image']:.1f} | {fp32:.2f} | "
                     f"{int8:.2f} | {int8 / fp32:.2f}x | {fp32 / base['fp32']['images_per_s']:.2f}x | {gate} | {tag} |")
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
    for row in rows:
        if "int8_gate_failed" in row and "int8_ungated" not in row:  # a row saved before ungated timing
            row["int8_ungated"] = ungated_int8(Path(row["bundle"]), args.work / f"{row['model']}.int8-ungated.onnx")
        row["gflop_per_image"] = gflops(row["spec"])
        tag_with_both(row, images)
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
