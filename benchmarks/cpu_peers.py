"""CPU peers side by side: every CPU path for a bundle's image graph, speed and parity in one run.

For one bundle (the paper's ViT-B-16 + QKS head from benchmarks/export_vitb16.py, or the lite
backbone's real-weight bundle) it builds every path this machine can run:

- PyTorch fp32 eager and bf16 autocast (`--ckpt`: the checkpoint the bundle was exported from);
- ONNX Runtime: the fp32 graph, the fused fp32 graph (`qks.export.fuse`), the INT8 graph without
  and with fusion (`qks.export.int8`, qks's own scope: the head's query path fp32);
- OpenVINO: the fp32 graph compiled f32 and bf16 (`qks.engines.openvino`), and NNCF INT8 (static,
  calibrated on separate photos; transformer model type; the same query path kept fp32);

and for each: ms per batch (median per round, rounds interleaved across paths so the shared
machine's drift falls on all of them), images/s, ratio to PyTorch fp32 in the same run, GOP/s
(the graph's own matrix-product FLOPs) and that as a fraction of the measured GEMM peak of the
row's precision, and parity on real photos against PyTorch fp32 (or ONNX Runtime fp32 without a
checkpoint): worst query-feature cosine, and top-5 agreement of max-over-queries scores against the
bundle's default bank, with the project's INT8 gate (cosine >= 0.99, top-5 >= 99 %).

    nice -n 10 .venv/bin/python -m benchmarks.cpu_peers --bundle /tmp/vitb16 --ckpt /tmp/qks-vitb16-*/best.pt \\
        --threads 1 --batch 8 --rounds 3 --out benchmarks/results/cpu_peers_vitb16.json

Real photos: scene photos of Tux Paint photo cut-outs (benchmarks/scenes.py, `make stamps`) plus
scikit-image's colour photos; calibration (NNCF) uses other scenes than the parity photos.
A benchmark, not a test; slow on a 2-core machine (minutes per path at batch 8).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GATE = {"cosine_min": 0.99, "top5_min": 0.99}  # qks.export.int8's gate
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "cat")


# -- photos ----------------------------------------------------------------------------------------


def photos(bundle, n: int, calibration: int, work: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(parity pixels [n], calibration pixels [calibration], description): scene photos + skimage."""
    from PIL import Image

    from benchmarks import scenes

    files: list[Path] = []
    note = []
    try:
        cfg = scenes.SceneConfig(train_scenes=calibration, test_scenes=n, seed=21)
        scenes.ensure(work / "scenes", cfg, log=lambda m: None, progress=False)
        files = sorted((work / "scenes" / "images" / "test").glob("*.jpg"))
        cal_files = sorted((work / "scenes" / "images" / "train").glob("*.jpg"))
        note.append(f"{len(files)} test / {len(cal_files)} calibration scenes of Tux Paint photo cut-outs "
                    "(benchmarks/scenes.py, seed 21)")
    except scenes.StampsUnavailable:
        cal_files = []
    import skimage
    from skimage import data

    sk = []
    for name in SKIMAGE_PHOTOS:
        path = work / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").save(path)
        sk.append(path)
    note.append(f"{len(sk)} scikit-image {skimage.__version__} photos")
    files = (sk + files)[:n]
    cal_files = cal_files[:calibration] or sk[:calibration]
    load = bundle.preprocess.load
    return np.stack([load(f) for f in files]), np.stack([load(f) for f in cal_files]), "; ".join(note)


# -- paths ---------------------------------------------------------------------------------------


def torch_path(ckpt: Path, threads: int, bf16: bool):
    import torch

    from qks.checkpoint import model_from_checkpoint

    torch.set_num_threads(threads)
    model = model_from_checkpoint(str(ckpt)).eval()

    def run(x):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model.query_features(torch.from_numpy(x)).float().numpy()

    return run


def ort_path(path: Path, threads: int):
    from qks.engines.ort import OrtEngine

    eng = OrtEngine(path, "cpu", intra_op_threads=threads, inter_op_threads=1)
    return lambda x: eng.run({"pixels": x})["query_features"]


def ov_path(path: Path, threads: int, precision: str):
    from qks.engines.openvino import OpenVinoEngine

    eng = OpenVinoEngine(path, precision=precision, threads=threads, cache_dirs=[])
    return lambda x: eng.run({"pixels": x})["query_features"]


def nncf_int8(src: Path, out: Path, calibration: np.ndarray, *, scope: str = "tokens") -> Path:
    """NNCF post-training INT8 (ONNX backend: QDQ graph) of the fp32 graph, the head's query path
    (scope "tokens") or whole head ("trunk") and the products around a non-attention Softmax
    ignored, as qks's own INT8 graph keeps them fp32."""
    import nncf
    import onnx
    from qks.export.int8 import _head_matmuls, _query_path_matmuls, _softmax_matmuls

    model = onnx.load(str(src))
    ignored = (_query_path_matmuls(model) if scope == "tokens" else _head_matmuls(model)) + _softmax_matmuls(model)
    name = model.graph.input[0].name
    ds = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))], lambda x: {name: x})
    q = nncf.quantize(model, ds, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
                      ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    onnx.save(q, str(out))
    return out


def build_graphs(bundle, work: Path, calibration: np.ndarray, log) -> dict[str, Path]:
    """The derived graphs: fused fp32, INT8 unfused and fused (qks's scope), NNCF INT8."""
    import onnx
    from qks.export.fuse import fuse_image_graph
    from qks.export.int8 import _quiet, quantize_image_encoder

    src = bundle.graphs["image_encoder"].path
    out = {"fp32": src}
    log("fusing the fp32 graph")
    with _quiet():
        model, stats = fuse_image_graph(onnx.load(str(src)))
    out["fp32_fused"] = work / "fused.onnx"
    onnx.save(model, str(out["fp32_fused"]))
    log(f"fused: {stats}")
    del model
    for key, fuse in (("int8", False), ("int8_fused", True)):
        log(f"quantizing ({key})")
        out[key] = quantize_image_encoder(src, work / f"{key}.onnx", fuse=fuse)
    try:
        log("NNCF INT8 (calibrating)")
        with _quiet():
            out["nncf_int8"] = nncf_int8(src, work / "nncf_int8.onnx", calibration)
    except ImportError:
        log("nncf is not installed: NNCF rows skipped")
    return out


def paths(bundle, graphs: dict, ckpt: Path | None, threads: int) -> list[tuple[str, str, str, object]]:
    """(name, engine, precision of the products, factory) per path, in table order."""
    p: list = []
    if ckpt:
        p += [("PyTorch fp32 eager", "torch", "fp32", lambda: torch_path(ckpt, threads, False)),
              ("PyTorch bf16 autocast", "torch", "bf16", lambda: torch_path(ckpt, threads, True))]
    p += [("ONNX Runtime fp32", "ort", "fp32", lambda: ort_path(graphs["fp32"], threads)),
          ("ONNX Runtime fp32, fused graph", "ort", "fp32", lambda: ort_path(graphs["fp32_fused"], threads)),
          ("ONNX Runtime INT8, unfused graph (qks before)", "ort", "int8", lambda: ort_path(graphs["int8"], threads)),
          ("ONNX Runtime INT8, fused graph (qks now)", "ort", "int8", lambda: ort_path(graphs["int8_fused"], threads))]
    try:
        import openvino  # noqa: F401
    except ImportError:
        return p
    p += [("OpenVINO fp32", "openvino", "fp32", lambda: ov_path(graphs["fp32"], threads, "fp32")),
          ("OpenVINO bf16 hint", "openvino", "bf16", lambda: ov_path(graphs["fp32"], threads, "bf16"))]
    if "nncf_int8" in graphs:
        p += [("OpenVINO + NNCF INT8 (qks scope), f32 rest", "openvino", "int8",
               lambda: ov_path(graphs["nncf_int8"], threads, "fp32")),
              ("OpenVINO + NNCF INT8 (qks scope), bf16 rest", "openvino", "int8",
               lambda: ov_path(graphs["nncf_int8"], threads, "bf16"))]
    return p


# -- measuring -------------------------------------------------------------------------------------


def run_batched(fn, pixels: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([fn(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def parity(qf: np.ndarray, ref: np.ndarray, bank: np.ndarray) -> dict:
    from qks.export import verify as V

    m = V.compare(qf, ref, queries=True)
    top5 = V.topk_agreement(V.scores(qf, bank), V.scores(ref, bank))
    return {"cosine_min": m["cosine_min"], "query_cosine_min": m["query_cosine_min"], "top5_agreement": top5,
            "gate": bool(m["finite"] and m["cosine_min"] >= GATE["cosine_min"] and top5 >= GATE["top5_min"])}


def graph_gflop(path: Path) -> float | None:
    """Matrix-product GFLOP per image of an fp32 ONNX graph (its value_info shapes at batch 1)."""
    from qks.runtime.bench import graph_flops

    try:
        return graph_flops(path) / 1e9
    except Exception:
        return None


def op_profile(path: Path, batch: int, threads: int) -> dict:
    """ONNX Runtime's profile of one batch, by operator type: ms, share of the total, GFLOP/s of its products."""
    from qks.runtime.bench import node_flops, profile_nodes

    by_op: dict[str, dict] = {}
    for n in profile_nodes(path, batch=batch, threads=threads):
        d = by_op.setdefault(n["op"], {"ms": 0.0, "nodes": 0, "gflop": 0.0})
        d["ms"] += n["us"] / 1e3
        d["nodes"] += 1
        d["gflop"] += node_flops(n) / 1e9
    total = sum(d["ms"] for d in by_op.values())
    for d in by_op.values():
        d["share"] = d["ms"] / total if total else 0.0
        d["gops"] = d["gflop"] / (d["ms"] / 1e3) if d["ms"] and d["gflop"] else None
    return {"total_ms": total, "ops": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["ms"]))}


def profile_table(prof: dict) -> str:
    lines = ["| operator | nodes | ms | share | GOP/s |", "|---|---|---|---|---|"]
    for op, d in prof["ops"].items():
        if d["share"] >= 0.005:
            g = f"{d['gops']:.0f}" if d["gops"] else ""
            lines.append(f"| {op} | {d['nodes']} | {d['ms']:.0f} | {d['share']:.1%} | {g} |")
    lines.append(f"| total | | {prof['total_ms']:.0f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--ckpt", type=Path, help="the checkpoint the bundle came from (PyTorch rows, reference)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=2, help="timed runs per path per round")
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--calibration", type=int, default=32)
    ap.add_argument("--only", help="comma-separated substrings: run only the paths whose name has one")
    ap.add_argument("--no-peak", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also ONNX Runtime's per-operator profile of the INT8 "
                    "graphs (fused and unfused) at the same batch and threads")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from qks.runtime.bench import cpu_info, gemm_peak, versions
    from qks.runtime.bundle import Bundle

    def log(m):
        print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)

    bundle = Bundle.load(args.bundle)
    bank = np.load(bundle.banks[bundle.default_bank()].path)
    work = Path(tempfile.mkdtemp(prefix="qks-peers-"))
    load = [os.getloadavg()]
    try:
        pixels, cal, photo_note = photos(bundle, args.photos, args.calibration, work)
        log(f"photos: {photo_note}")
        graphs = build_graphs(bundle, work, cal, log)
        gflop = graph_gflop(graphs["fp32"])
        todo = paths(bundle, graphs, args.ckpt, args.threads)
        if args.only:
            keys = [k.strip().lower() for k in args.only.split(",")]
            todo = [t for t in todo if any(k in t[0].lower() for k in keys) or t[0] == "PyTorch fp32 eager"]
        runners, rows = {}, {}
        for name, engine, prec, factory in todo:
            log(f"building: {name}")
            runners[name] = factory()
            rows[name] = {"path": name, "engine": engine, "precision": prec, "ms": []}
        ref_name = "PyTorch fp32 eager" if "PyTorch fp32 eager" in runners else "ONNX Runtime fp32"
        log(f"parity on {len(pixels)} photos against {ref_name}")
        ref = run_batched(runners[ref_name], pixels, args.batch)
        for name, fn in runners.items():
            rows[name]["parity"] = parity(run_batched(fn, pixels, args.batch), ref, bank)
        x = pixels[:args.batch] if len(pixels) >= args.batch else np.resize(pixels, (args.batch, *pixels.shape[1:]))
        for r in range(args.rounds):
            for name, fn in runners.items():
                fn(x)  # warm-up
                times = []
                for _ in range(args.iters):
                    t = time.perf_counter()
                    fn(x)
                    times.append((time.perf_counter() - t) * 1e3)
                rows[name]["ms"].append(statistics.median(times))
                log(f"round {r + 1}: {name}: {rows[name]['ms'][-1]:.0f} ms")
        load.append(os.getloadavg())
        peak = None if args.no_peak else gemm_peak(threads=args.threads)
        base = statistics.median(rows[ref_name]["ms"]) if ref_name in rows else None
        for row in rows.values():
            ms = statistics.median(row["ms"])
            row.update(ms_per_batch=ms, images_per_s=args.batch * 1e3 / ms,
                       x_torch_fp32=(base / ms) if base and ref_name.startswith("PyTorch") else None)
            if gflop:
                row["gops"] = gflop * row["images_per_s"]
                p = (peak or {}).get(f"{row['engine'] if row['engine'] != 'torch' else 'torch'}_{row['precision']}") \
                    or (peak or {}).get(f"best_{row['precision']}")
                row["fraction_of_peak"] = row["gops"] / p if p else None
        profiles = {}
        if args.profile:
            for key in ("int8_fused", "int8"):
                log(f"ONNX Runtime profile: {key}")
                profiles[key] = op_profile(graphs[key], args.batch, args.threads)
        report = {"machine": {"cpu": cpu_info(), "versions": versions(), "load_average": load},
                  "bundle": str(args.bundle), "model": bundle.manifest["model"].get("backbone"),
                  "graph_gflop_per_image": gflop, "photos": photo_note, "reference": ref_name, "gate": GATE,
                  "method": {"threads": args.threads, "batch": args.batch, "rounds": args.rounds, "iters": args.iters,
                             "timing": "median of iters runs per round (after one warm-up run), rounds interleaved "
                                       "across paths; ms_per_batch = median over rounds"},
                  "peak": peak, "rows": list(rows.values()), "ort_profiles": profiles,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)}
        print(table(report))
        for key, prof in profiles.items():
            print(f"\nONNX Runtime profile, {key}, batch {args.batch}, {args.threads} thread(s):\n" + profile_table(prof))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            log(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def table(report: dict) -> str:
    lines = ["| path | ms / batch | images/s | x torch fp32 | GOP/s | of peak | query cosine min | top-5 | gate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        p = r["parity"]
        x = f"{r['x_torch_fp32']:.2f}" if r.get("x_torch_fp32") else "-"
        gops = f"{r['gops']:.0f}" if r.get("gops") else "-"
        frac = f"{r['fraction_of_peak']:.0%}" if r.get("fraction_of_peak") else "-"
        lines.append(f"| {r['path']} | {r['ms_per_batch']:.0f} | {r['images_per_s']:.2f} | {x} | {gops} | {frac} | "
                     f"{p['query_cosine_min']:.6f} | {p['top5_agreement']:.1%} | {'pass' if p['gate'] else 'FAIL'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
