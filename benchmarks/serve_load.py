"""Load test of qks-serve against the Triton Python-backend server and plain qks-infer (issue 23).

    make venv serve-venv
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.serve_load --lite-bundle /tmp/qks-lite [--requests 400]

Same bundle, same images, same machine, one after another (nothing runs beside a measurement but
the measured server and its clients):
1. the bundle and the images as in benchmarks/triton_load.py (the lite backbone's real weights with
   a seeded untrained head; scikit-image photos as 640x480 JPEGs, cycled to `--requests` files);
2. qks-infer over that folder (`--backend ort-cpu`, batch 16): images/s from its own summary;
3. qks-serve (`--max-batch`, `--max-wait-ms`; a child process on 127.0.0.1): every client is a
   thread with its own HTTP connection (httpx), posting one JPEG per request as a multipart file;
4. the Triton Python-backend server (`qks-triton --backend python`, nvidia-pytriton's tritonserver
   from `.venv-serve`), HTTP, one JPEG per request as encoded bytes (input `image`).
For each server and client count (1, 4, 16): throughput, p50/p95/p99 latency, failed requests, and
the mean engine batch (qks-serve: its qks_batch_images metric; Triton: inference/execution counts).
Prints a Markdown table and the machine; `--out FILE` writes the JSON.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.triton_load import (
    PHOTOS,
    ROOT,
    common_args,
    drive,
    finish,
    load_level,
    machine,
    make_images,
    run_qks_infer,
    serve_versions,
    table,
    the_bundle,
)


class QksServe:
    """qks-serve in a child process on a free port; stopped (SIGTERM, drained) on exit."""

    def __init__(self, bundle: Path, workdir: Path, *args: str):
        import httpx
        from qks.serving.triton_server import free_ports

        self.url = f"http://127.0.0.1:{free_ports(1)[0]}"
        self.log = workdir / "qks-serve.log"
        cmd = [str(ROOT / ".venv" / "bin" / "qks-serve"), "--bundle", str(bundle), "--port", self.url.rsplit(":", 1)[1],
               "--log-level", "warning", *args]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit(f"qks-serve did not start: {self.log.read_text()[-1000:]}")

    def counters(self) -> tuple[float, float]:
        import httpx

        values = {}
        for ln in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            name = ln.split(" ")[0]
            if name in ("qks_batch_images_sum", "qks_batch_images_count"):
                values[name] = float(ln.split()[-1])
        return values["qks_batch_images_sum"], values["qks_batch_images_count"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def serve_level(server: QksServe, blobs: list[bytes], clients: int, requests: int, timeout: float) -> dict:
    import httpx

    def send(client, blob: bytes) -> None:
        r = client.post("/v1/tag", files=[("images", ("image.jpg", blob, "image/jpeg"))])
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")

    return drive(lambda: httpx.Client(base_url=server.url, timeout=120), send, blobs, clients, requests, timeout,
                 server.counters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--servers", default="qks-serve,triton")
    ap.add_argument("--max-wait-ms", type=float, default=2.0, help="qks-serve's batching wait")
    args = ap.parse_args()

    bundle = the_bundle(args)
    work = Path(tempfile.mkdtemp(prefix="qks-serve-load-"))
    clients = [int(c) for c in args.clients.split(",")]
    servers = args.servers.split(",")
    try:
        images = make_images(work / "images", args.requests)
        blobs = [p.read_bytes() for p in images[:len(PHOTOS)]]
        result = {"machine": machine(), "bundle": str(bundle), "requests": args.requests, "levels": [],
                  "settings": {"max_batch": args.max_batch, "qks_serve_max_wait_ms": args.max_wait_ms}}
        print("== qks-infer over the same images", flush=True)
        result["qks_infer"] = run_qks_infer(bundle, work / "images", work / "qks-infer.jsonl")
        if "qks-serve" in servers:
            server = QksServe(bundle, work, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                              "--max-queue", "1024")
            try:
                for n in clients:
                    print(f"== qks-serve, {n} clients", flush=True)
                    level = serve_level(server, blobs, n, args.requests, args.level_timeout)
                    result["levels"].append({"server": "qks-serve (HTTP, multipart)", **level})
            finally:
                server.stop()
        if "triton" in servers:
            import tritonclient.http as http
            from qks.export.triton import write_python_repository
            from qks.serving.triton_server import TritonServer

            result["serve_versions"] = serve_versions(args.serve_venv / "bin" / "python")
            write_python_repository(bundle, work / "repo", max_batch=args.max_batch)
            with TritonServer(work / "repo", python=args.serve_venv / "bin" / "python") as triton:
                for n in clients:
                    print(f"== Triton python backend, {n} clients", flush=True)
                    level = load_level(http, triton.url, triton.url, blobs, n, args.requests, args.level_timeout)
                    result["levels"].append({"server": "Triton python backend (HTTP)", **level})
        finish(result, table(result, ("server",), lambda lv: [lv["server"]]), args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
