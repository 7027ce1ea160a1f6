"""`qks-bench`: latency and throughput of a bundle's image path, per backend and batch size.

For every backend (and ONNX image graph precision) and batch size, two stages are measured:

- "engine": the image graph alone on random pixels [B, 3, S, S] float32: `warmup` untimed runs,
  then `iters` timed runs (host wall clock around `engine.run`, which includes any host<->device
  copies). Where there is a GPU the device time is measured too (CUDA events around the run:
  torch.cuda events for the torch baseline, cuda-python events on the TensorRT engine's stream),
  as `device_p50_ms` etc.
- "end_to_end": `qks-infer`'s own folder runner (`qks.runtime.infer.run_folder`: decode and
  preprocess in worker threads, batches to the engine, scoring against the label bank, JSONL
  written to a temporary file) over a folder of JPEGs. Latency percentiles are of the per-batch
  period in steady state (the time between consecutive batch completions; the first batch, which
  waits for the decode pipeline to fill, is left out); `images_per_s` is images / wall time of the
  whole run, as `qks-infer` reports it. `stages` gives the mean milliseconds per image spent in
  decode, preprocess (both in worker threads, overlapped with the engine), engine and score.

`--ckpt best.pt` adds the baseline "torch": the checkpoint's `QKSModel.query_features`, fp32,
eager, `torch.no_grad()`, as the training code runs it (on CUDA when torch sees a GPU), through the
same two stages. Every record then carries `ratio_to_torch` (its images/s over the baseline's at
the same batch and stage). torch is imported only when that backend runs: the runtime stays
torch-free.

Backends come from the registry (`qks.runtime.backend.REGISTRY`) plus "torch"; `--precision all`
runs every precision each backend declares, and torch in fp32 and bf16 autocast. Parity (default on):
every engine's query features on up to 64 of the images (`--images`, else the synthetic JPEGs)
against PyTorch fp32 (or ONNX Runtime CPU fp32): worst cosine, top-5 agreement against the label
bank, and the INT8 export gate's verdict. `--peak`: the fp32 graph's matrix-product FLOPs (from an
ONNX Runtime profile) x images/s as GOP/s, over the measured n^3 GEMM peak of the same engine and
precision (`gemm_peak`).

Output: a table on stdout, and with `--out` a JSON file {"machine", "method", "results",
"skipped", "command", "date"} (see `_record` for a result's fields). Numbers only, no verdicts.
With `--rounds R` every measurement is repeated R times, interleaved across backends, so the
noise of a shared machine shows in `rounds_images_per_s`.
"""

from __future__ import annotations

import contextlib
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

import click
import numpy as np

from ..engines.base import Engine, EngineError, TensorInfo
from . import infer as _infer
from .backend import PRECISIONS, REGISTRY, select_backend
from .bundle import Bundle
from .infer import InferOptions, find_images, run_folder
from .labels import LabelBank, LabelError, read_label_file
from .manifest import BundleError
from .preprocess import Preprocess, PreprocessError
from .scoring import logits as score_logits

BENCH_BACKENDS = (*(n for n, b in REGISTRY.items() if b.bench), "torch")  # the registry's, plus the baseline
TORCH_PRECISIONS = ("fp32", "bf16")  # eager fp32; bf16 under torch.autocast
PARITY_IMAGES = 64  # at most this many images of --images for parity
GATE = {"cosine_min": 0.99, "top5_agreement_min": 0.99}  # the INT8 export gate (qks.export.int8)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
GENERATED_SIZE = (640, 480)  # a typical photo's size


class BenchError(RuntimeError):
    """A benchmark that cannot run; one line."""


# ---------------------------------------------------------------------------------------------
# the machine


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            model = m.group(1).strip()
        f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        if f:
            flags = set(f.group(1).split())
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    out = {"model": model, "arch": platform.machine(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
           "isa": {f: f in flags for f in ISA_FLAGS}}
    out["isa_summary"] = {"AVX-512": "avx512f" in flags, "VNNI": bool({"avx512_vnni", "avx_vnni"} & flags),
                          "AVX512-BF16": "avx512_bf16" in flags, "AMX-INT8": "amx_int8" in flags,
                          "AMX-BF16": "amx_bf16" in flags}
    try:
        mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        if mem:
            out["memory_gib"] = round(int(mem.group(1)) / 2**20, 1)
    except OSError:
        pass
    return out


def gpu_info() -> list[dict]:
    """GPUs as nvidia-smi lists them (no CUDA library is loaded for this); [] without one."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        res = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in res.stdout.strip().splitlines() if res.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 1 and parts[0]:
            gpus.append(dict(zip(("name", "memory", "driver", "compute_capability"), parts, strict=False)))
    return gpus


def versions() -> dict:
    """Installed versions (package metadata only: nothing is imported, torch included)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("qks", "numpy", "onnxruntime", "onnxruntime-gpu", "pillow", "tensorrt", "tensorrt-rtx",
                 "tensorrt_rtx", "cuda-python", "torch", "open_clip_torch"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def model_info(bundle: Bundle, labels: int) -> dict:
    m = bundle.manifest["model"]
    head = (m.get("config") or {}).get("head") or {}
    return {"backbone": m.get("backbone"), "queries": m.get("queries"), "layers": m.get("layers"),
            "embed_dim": m.get("embed_dim"), "token_dim": m.get("token_dim"), "head_width": head.get("width"),
            "head_heads": head.get("heads"), "head_ffn": head.get("ffn"), "image_size": bundle.preprocess.size,
            "labels": labels,
            "graphs": {n: {"file": g.file, "precision": g.precision,
                           "bytes": bundle.manifest["files"][g.file].get("bytes")} for n, g in bundle.graphs.items()}}


# ---------------------------------------------------------------------------------------------
# work and peak: the graph's matrix-product FLOPs, this machine's GEMM peak per engine and precision


def profile_nodes(path: str | Path, batch: int = 1, threads: int = 1, runs: int = 1) -> list[dict]:
    """ONNX Runtime's own profile of a CPU run of the graph on random pixels: one dict per node run,
    {"op", "name", "us", "inputs": [shape, ...], "outputs": [shape, ...]} (the last `runs` runs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    work = Path(tempfile.mkdtemp(prefix="qks-profile-"))
    try:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(work / "p")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal((batch, *inp.shape[1:])).astype(np.float32)
        for _ in range(runs + 1):  # the first run (allocations) is left out below
            sess.run(None, {inp.name: x})
        events = json.loads(Path(sess.end_profiling()).read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def shapes(args, key):
        return [next(iter(d.values())) for d in args.get(key, [])]

    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_run = len(nodes) // (runs + 1) if runs + 1 else len(nodes)
    return [{"op": e["args"].get("op_name", "?"), "name": e["name"][:-len("_kernel_time")], "us": float(e["dur"]),
             "inputs": shapes(e["args"], "input_type_shape"), "outputs": shapes(e["args"], "output_type_shape")}
            for e in nodes[per_run:]]


def node_flops(node: dict) -> float:
    """Matrix-product FLOPs (2 x multiply-adds) of one profiled node; 0 for everything else."""
    ins, outs, op = node["inputs"], node["outputs"], node["op"]
    if not ins or not outs:
        return 0.0
    out = float(np.prod(outs[0])) if outs[0] else 0.0
    if op in ("MatMul", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
              "QLinearMatMul") and ins[0]:
        return 2.0 * out * ins[0][-1]
    if op in ("Gemm", "QGemm") and ins[0]:
        return 2.0 * out * ins[0][-1]
    if op in ("Conv", "FusedConv", "ConvInteger", "QLinearConv") and len(ins) > 1:
        w = ins[1] if op != "QLinearConv" else ins[3]
        return 2.0 * out * float(np.prod(w[1:]))
    if op in ("Attention", "QAttention") and len(ins[0]) == 3:
        b, n, c = ins[0]
        return 2.0 * b * n * c * (3 * c) + 4.0 * b * n * n * c  # packed QKV product + QK^T and AV
    if op == "MultiHeadAttention" and len(ins) > 1 and len(ins[0]) == 3 and len(ins[1]) == 3:
        b, n, c = ins[0]
        return 4.0 * b * n * ins[1][1] * c  # QK^T and AV
    return 0.0


def graph_flops(path: str | Path, batch: int = 1) -> float:
    """Matrix-product FLOPs per image of an image graph, counted from a profiled ONNX Runtime run
    (so every shape is the real one, dynamic axes included)."""
    return sum(node_flops(n) for n in profile_nodes(path, batch=batch)) / batch


def _gemm_timer(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _matmul_graph(kind: str, n: int):
    """One n x n x n product as an ONNX model: "fp32" MatMul, "int8" MatMulInteger (u8 x s8), or
    "qdq" (QuantizeLinear/DequantizeLinear around a MatMul: what OpenVINO runs as an INT8 product)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    if kind == "int8":
        b = numpy_helper.from_array(rng.integers(-127, 127, (n, n), dtype=np.int8), "B")
        nodes = [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])]
        io = (TensorProto.UINT8, TensorProto.INT32)
        inits = [b]
    else:
        w = rng.standard_normal((n, n)).astype(np.float32)
        io = (f32, f32)
        if kind == "fp32":
            nodes, inits = [helper.make_node("MatMul", ["A", "B"], ["Y"])], [numpy_helper.from_array(w, "B")]
        else:
            s = numpy_helper.from_array(np.array(0.05, np.float32), "s")
            z8 = numpy_helper.from_array(np.array(0, np.int8), "z")
            ws = numpy_helper.from_array(np.full(n, 0.02, np.float32), "ws")
            wz = numpy_helper.from_array(np.zeros(n, np.int8), "wz")
            wq = numpy_helper.from_array(np.clip(w * 50, -127, 127).astype(np.int8), "Wq")
            nodes = [helper.make_node("QuantizeLinear", ["A", "s", "z"], ["Aq"]),
                     helper.make_node("DequantizeLinear", ["Aq", "s", "z"], ["Ad"]),
                     helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["Wd"], axis=1),
                     helper.make_node("MatMul", ["Ad", "Wd"], ["Y"])]
            inits = [s, z8, ws, wz, wq]
    g = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("A", io[0], [n, n])],
                          [helper.make_tensor_value_info("Y", io[1], [n, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def gemm_peak(n: int = 2048, reps: int = 5, threads: int | None = 1) -> dict:
    """Measured GOP/s of one n^3 product per engine and precision that can run here:
    ort_fp32, ort_int8 (MatMulInteger u8 x s8), openvino_fp32 / _bf16 / _int8 (when installed),
    torch_fp32 / _bf16 (only when torch is already imported: the runtime never imports it), and
    best_<precision> over engines. What a row's fraction of peak divides by."""
    ops = 2.0 * n ** 3
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n)).astype(np.float32)
    a8 = rng.integers(0, 255, (n, n), dtype=np.uint8)
    out: dict = {"n": n, "threads": threads}
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        for kind, x in (("fp32", a), ("int8", a8)):
            s = ort.InferenceSession(_matmul_graph(kind, n).SerializeToString(), opts, providers=["CPUExecutionProvider"])
            out[f"ort_{kind}"] = ops / _gemm_timer(lambda s=s, x=x: s.run(None, {"A": x}), reps) / 1e9
    except ImportError:  # onnx is an export dependency; the runtime alone measures no peak
        return out
    try:
        import openvino as ov

        core = ov.Core()
        for key, kind, hint in (("fp32", "fp32", "f32"), ("bf16", "fp32", "bf16"), ("int8", "qdq", "f32")):
            cfg = {"INFERENCE_PRECISION_HINT": hint, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
            m = core.read_model(_matmul_graph(kind, n).SerializeToString(), b"")
            req = core.compile_model(m, "CPU", cfg).create_infer_request()
            out[f"openvino_{key}"] = ops / _gemm_timer(lambda req=req: req.infer({0: a}), reps) / 1e9
    except Exception:  # not installed, or this CPU lacks the precision
        pass
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if threads:
            torch.set_num_threads(threads)
        ta = torch.from_numpy(a)
        out["torch_fp32"] = ops / _gemm_timer(lambda: ta @ ta, reps) / 1e9
        tb = ta.bfloat16()
        out["torch_bf16"] = ops / _gemm_timer(lambda: tb @ tb, reps) / 1e9
    for prec in ("fp32", "bf16", "int8"):
        vals = [v for k, v in out.items() if k.endswith(f"_{prec}") and not k.startswith("best")]
        if vals:
            out[f"best_{prec}"] = max(vals)
    return out


# ---------------------------------------------------------------------------------------------
# images


def generate_images(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = GENERATED_SIZE) -> Path:
    """n synthetic JPEGs (quality 90) of photo size: smooth colour gradients, a few shapes and mild
    noise, so that decoding costs about what a photo costs (pure noise would decode slower)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        c0, c1, c2 = rng.uniform(0, 255, (3, 3))
        fx, fy = rng.uniform(0.2, 1.0, 2)
        t = (xx / w * fx + yy / h * fy) / (fx + fy)
        s = 0.5 + 0.5 * np.sin(xx / rng.uniform(20, 80) + yy / rng.uniform(20, 80))
        img = c0 * (1 - t)[..., None] + c1 * t[..., None] + (c2 - 128) * (s[..., None] - 0.5)
        img += rng.normal(0, 6, img.shape)
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(pil)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            box = (x0, y0, x0 + int(rng.integers(20, w // 3)), y0 + int(rng.integers(20, h // 3)))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        pil.save(folder / f"img_{i:05d}.jpg", quality=90)
    return folder


def _link_folder(src_files: list[Path], dst: Path, n: int) -> Path:
    """A folder of n symlinks cycling over src_files (run_folder takes a folder)."""
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        f = src_files[i % len(src_files)]
        os.symlink(f.resolve(), dst / f"{i:05d}_{f.name}")
    return dst


# ---------------------------------------------------------------------------------------------
# engines: the torch baseline as an Engine, and timing wrappers


class TorchEngine(Engine):
    """The PyTorch baseline: `QKSModel.query_features` of a checkpoint, eager, no_grad; fp32, or
    bf16 under `torch.autocast` (`bf16=True`)."""

    def __init__(self, ckpt: str | Path, device: str = "auto", threads: int | None = None, bf16: bool = False):
        try:
            import torch
        except ImportError as e:
            raise EngineError(f"torch is not importable ({e})") from None
        try:
            from qks.checkpoint import model_from_checkpoint
        except ImportError as e:
            raise EngineError(f"the training package cannot be imported ({e}); pip install 'qks[train]'") from None
        self.torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        try:
            self.model = model_from_checkpoint(str(ckpt)).eval().to(self.device)
        except Exception as e:
            raise EngineError(f"cannot build the model of {ckpt}: {type(e).__name__}: {str(e)[:200]}") from None
        size = int(self.model.backbone.preprocess.size)
        with torch.no_grad():  # Nq, or the token count of a projection-only head
            nq = int(self.model.query_features(torch.zeros(1, 3, size, size, device=self.device)).shape[1])
        d = int(self.model.backbone.embed_dim)
        self.backend = "torch"
        self.precision = "bf16" if bf16 else "fp32"
        self.graph_name = f"QKSModel.query_features ({self.device.type}, eager{', bf16 autocast' if bf16 else ''})"
        self.inputs = [TensorInfo("pixels", "float32", ("batch", 3, size, size))]
        self.outputs = [TensorInfo("query_features", "float32", ("batch", nq, d))]
        self.threads = torch.get_num_threads()

    def _run(self, feeds):
        torch = self.torch
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            x = torch.from_numpy(feeds["pixels"]).to(self.device)
            qf = self.model.query_features(x)
            return {"query_features": qf.float().cpu().numpy()}

    def device_timer(self):
        if self.device.type != "cuda":
            return None
        torch = self.torch

        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end)

        return timed

    def close(self):
        self.model = None


def _cuda_event_timer(engine):
    """Device time of a TensorRT engine's run via cuda-python events on its stream (None if n/a)."""
    stream = getattr(engine, "_stream", None)
    if stream is None:
        return None
    try:
        from ..engines.trt import import_cudart

        cudart = import_cudart()
    except Exception:
        return None

    def timed(fn):
        _e, start = cudart.cudaEventCreate()
        _e, end = cudart.cudaEventCreate()
        try:
            cudart.cudaEventRecord(start, stream)
            out = fn()
            cudart.cudaEventRecord(end, stream)
            cudart.cudaEventSynchronize(end)
            _e, ms = cudart.cudaEventElapsedTime(start, end)
            return out, float(ms)
        finally:
            cudart.cudaEventDestroy(start)
            cudart.cudaEventDestroy(end)

    return timed


class _TimedEngine:
    """Delegates to an engine and records the host time (and end time) of every run."""

    def __init__(self, engine):
        self._engine = engine
        self.times: list[float] = []
        self.ends: list[float] = []
        self.images = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def run(self, feeds):
        t = time.perf_counter()
        out = self._engine.run(feeds)
        end = time.perf_counter()
        self.times.append(end - t)
        self.ends.append(end)
        self.images += len(next(iter(feeds.values())))
        return out


class _TimedPreprocess(Preprocess):
    """The bundle's Preprocess, timing decode (Image.open + load) and preprocess per image.
    `load` is Preprocess.load unchanged; its call of `self(img)` is timed separately."""

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "_local", threading.local())
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_totals", {"decode": 0.0, "preprocess": 0.0, "images": 0})

    def __call__(self, img):
        t = time.perf_counter()
        try:
            return super().__call__(img)
        finally:
            self._local.pre = time.perf_counter() - t

    def load(self, path):
        self._local.pre = 0.0
        t = time.perf_counter()
        try:
            return super().load(path)
        finally:
            total = time.perf_counter() - t
            with self._lock:
                self._totals["preprocess"] += self._local.pre
                self._totals["decode"] += total - self._local.pre
                self._totals["images"] += 1


@contextlib.contextmanager
def _timed_scoring(acc: dict):
    """Time the folder runner's scoring (logits, sigmoid, label selection) where it calls them."""
    names = ("score_logits", "sigmoid", "select")
    saved = {n: getattr(_infer, n) for n in names}

    def wrap(fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc["score"] += time.perf_counter() - t
        return timed

    for n in names:
        setattr(_infer, n, wrap(saved[n]))
    try:
        yield acc
    finally:
        for n, fn in saved.items():
            setattr(_infer, n, fn)


# ---------------------------------------------------------------------------------------------
# measuring


def _pct(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "min_ms": float(a.min())}


def measure_engine(engine, batch: int, size: int, warmup: int, iters: int, seed: int = 0) -> dict:
    x = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
    feeds = {engine.inputs[0].name: x}
    for _ in range(warmup):
        engine.run(feeds)
    timer = engine.device_timer() if hasattr(engine, "device_timer") else _cuda_event_timer(engine)
    host, device = [], []
    for _ in range(iters):
        t = time.perf_counter()
        if timer is not None:
            _out, dev_ms = timer(lambda: engine.run(feeds))
            device.append(dev_ms)
        else:
            engine.run(feeds)
        host.append((time.perf_counter() - t) * 1e3)
    return {"host_ms": host, "device_ms": device}


def measure_end_to_end(engine, bank, preprocess: Preprocess, scoring, folder: Path, batch: int,
                       workers: int | None, work: Path) -> dict:
    timed_pp = _TimedPreprocess(**{f: getattr(preprocess, f) for f in preprocess.__dataclass_fields__})
    timed_engine = _TimedEngine(engine)
    out = work / "pred.jsonl"
    acc = {"score": 0.0}
    with _timed_scoring(acc):
        t = time.perf_counter()
        summary = run_folder(folder, timed_engine, bank, timed_pp, out,
                             InferOptions(batch_size=batch, workers=workers, progress=False, overwrite=True,
                                          top_k=5), scoring)
        wall = time.perf_counter() - t
    out.unlink(missing_ok=True)
    out.with_name(out.name + _infer.META_SUFFIX).unlink(missing_ok=True)
    periods = list(np.diff(timed_engine.ends) * 1e3)
    n = max(summary.written, 1)
    return {"periods_ms": periods or [wall * 1e3], "wall_s": wall, "images": summary.written,
            "errors": summary.errors, "batches": len(timed_engine.times),
            "first_batch_ms": (timed_engine.ends[0] - t) * 1e3 if timed_engine.ends else None,
            "stages": {"decode": timed_pp._totals["decode"] * 1e3 / n,
                       "preprocess": timed_pp._totals["preprocess"] * 1e3 / n,
                       "engine": sum(timed_engine.times) * 1e3 / n,
                       "score": acc["score"] * 1e3 / n,
                       "wall": wall * 1e3 / n},
            "runner_images_per_s": summary.images_per_s,
            "workers": workers or min(4, os.cpu_count() or 1)}


def _record(backend: str, precision: str, graph: str, batch: int, stage: str, ms: list[float], images_per_s: float,
            rounds: list[float], stages: dict, **extra) -> dict:
    rec = {"backend": backend, "precision": precision, "graph": graph, "batch": batch, "stage": stage,
           **_pct(ms), "images_per_s": images_per_s, "ratio_to_torch": None,
           "rounds_images_per_s": rounds, "samples": len(ms), "stages": stages}
    rec.update(extra)
    return rec


# ---------------------------------------------------------------------------------------------
# parity and peak beside every speed


def _query_features(engine, pixels: np.ndarray, batch: int) -> np.ndarray:
    step = min(batch, getattr(engine, "max_batch", None) or batch)
    name = engine.inputs[0].name
    return np.concatenate([engine.run({name: pixels[i:i + step]})[engine.outputs[0].name]
                           for i in range(0, len(pixels), step)])


def parity_metrics(qf: np.ndarray, ref: np.ndarray, embeddings: np.ndarray, k: int = 5) -> dict:
    """Worst cosine per image and per query vector of `qf` against `ref` [B, Nq, D], and the mean
    top-k label agreement of max-over-queries scores against `embeddings`; `gate`: the INT8 gate."""
    def cos(a, b):
        a, b = a.astype(np.float64), b.astype(np.float64)
        return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)

    k = min(k, len(embeddings))
    top = [np.argsort(-score_logits(x, embeddings), axis=1, kind="stable")[:, :k] for x in (qf, ref)]
    agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(*top, strict=True)]))
    image_cos = float(cos(qf.reshape(len(qf), -1), ref.reshape(len(ref), -1)).min())
    out = {"cosine_min": image_cos, "query_cosine_min": float(cos(qf, ref).min()), f"top{k}_agreement": agree,
           "finite": bool(np.isfinite(qf).all())}
    out["gate"] = out["finite"] and image_cos >= GATE["cosine_min"] and agree >= GATE["top5_agreement_min"]
    return out


def measure_parity(bundle: Bundle, engines: list, files: list[Path], bank, batch: int, log) -> dict[int, dict]:
    """{id(engine): parity against the fp32 reference} on the decoded `files`: PyTorch fp32 when it
    is among the engines, else ONNX Runtime CPU's fp32 graph."""
    if not files:
        return {}
    pixels = []
    for f in files:
        with contextlib.suppress(PreprocessError):
            pixels.append(bundle.preprocess.load(f))
    if not pixels:
        return {}
    pixels = np.stack(pixels)
    ref_engine = next((e for b, e in engines if b == "torch" and e.precision == "fp32"), None)
    opened = None
    if ref_engine is None:
        try:
            opened, _ = select_backend(bundle, "ort-cpu", precision="fp32")
        except EngineError as e:
            log(f"no parity: the fp32 reference cannot run ({e})")
            return {}
        ref_engine = opened
    reference = f"{ref_engine.backend} fp32"
    log(f"parity: {len(pixels)} images against {reference}")
    try:
        ref = _query_features(ref_engine, pixels, batch)
        out = {}
        for _backend, engine in engines:
            try:
                got = _query_features(engine, pixels, batch)
            except EngineError as e:
                out[id(engine)] = {"error": str(e)}
                continue
            out[id(engine)] = {**parity_metrics(got, ref, bank.embeddings), "reference": reference,
                               "images": len(pixels)}
        return out
    finally:
        if opened is not None:
            opened.close()


def _work_per_image(bundle: Bundle, log) -> float | None:
    """Matrix-product FLOPs per image of the bundle's fp32 image graph (None without onnx/the graph)."""
    graph = bundle.graphs.get("image_encoder")
    try:
        return graph_flops(graph.path) if graph else None
    except Exception as e:  # a graph ONNX Runtime cannot profile: no fraction of peak, said once
        log(f"no FLOP count: {type(e).__name__}: {str(e)[:120]}")
        return None


def _peak_engine(backend: str) -> str:
    return {"ort-cpu": "ort", "openvino": "openvino", "torch": "torch"}.get(backend, backend)


# ---------------------------------------------------------------------------------------------
# the run


def _open_engines(bundle: Bundle, backends: list[str], precisions: list[str], ckpt, threads, device_id,
                  cuda_graph, torch_device, log) -> tuple[list[tuple[str, object]], list[dict]]:
    engines, skipped = [], []
    every = "all" in precisions
    for backend in backends:
        if backend == "torch":
            if ckpt is None:
                skipped.append({"backend": "torch", "reason": "no --ckpt given"})
                continue
            wanted = [p for p in TORCH_PRECISIONS if every or p in precisions] or ["fp32"]
            for precision in dict.fromkeys(["fp32", *wanted]):  # fp32: the baseline every ratio divides by
                try:
                    engines.append(("torch", TorchEngine(ckpt, torch_device, threads, bf16=precision == "bf16")))
                except EngineError as e:
                    skipped.append({"backend": "torch", "precision": precision, "reason": str(e)})
                    log(f"skipping torch {precision}: {e}")
                    break
            continue
        seen_graphs = set()
        spec = REGISTRY[backend]
        for precision in (("auto", *spec.precisions) if every else precisions) if backend != "tensorrt" else ["auto"]:
            try:
                engine, reason = select_backend(bundle, backend, threads=threads, device_id=device_id,
                                                cuda_graph=cuda_graph, precision=precision)
            except EngineError as e:
                if not any(x["backend"] == backend and x["reason"] == str(e) for x in skipped):  # once per cause
                    skipped.append({"backend": backend, "precision": precision, "reason": str(e)})
                    log(f"skipping {backend} {precision}: {e}")
                continue
            key = getattr(engine, "graph_name", None) or reason
            if key in seen_graphs:  # "auto" resolved to a precision already listed
                engine.close()
                continue
            seen_graphs.add(key)
            if not hasattr(engine, "precision"):
                engine.precision = "plan"
            engine.reason = reason
            engines.append((backend, engine))
    return engines, skipped


def run_bench(bundle_dir: str | Path, backends: list[str], batch_sizes: list[int], *, precisions=("auto",),
              labels: str | None = None, iters: int = 20, warmup: int = 3, images: str | Path | None = None,
              threads: int | None = None, workers: int | None = None, ckpt: str | Path | None = None,
              e2e_batches: int | None = None, rounds: int = 1, end_to_end: bool = True, device_id: int = 0,
              cuda_graph: bool = False, torch_device: str = "auto", parity: bool = True, peak: bool = False,
              peak_size: int = 2048, log=None) -> dict:
    """Measure and return the report dict (see the module docstring)."""
    log = log or (lambda msg: None)
    bundle = Bundle.load(bundle_dir)
    bank = LabelBank.for_labels(bundle, read_label_file(labels), threads=threads, progress=False) if labels \
        else LabelBank.from_bundle(bundle)
    size = bundle.preprocess.size
    engines, skipped = _open_engines(bundle, backends, list(precisions), ckpt, threads, device_id, cuda_graph,
                                     torch_device, log)
    if not engines:
        raise BenchError("no backend can run: " + "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped))
    e2e_batches = e2e_batches or max(iters // 2, 3)
    work = Path(tempfile.mkdtemp(prefix="qks-bench-"))
    try:
        image_note = None
        folders: dict[int, Path] = {}
        files: list[Path] = []
        if end_to_end or parity:
            if images is not None:
                files = [Path(images) / p for p in find_images(images)]
                if not files:
                    raise BenchError(f"no images under {images}")
                image_note = f"{len(files)} images from {images}, cycled through symlinks to batch x {e2e_batches}"
            else:
                n = min(max(batch_sizes) * e2e_batches, 256)
                log(f"generating {n} synthetic {GENERATED_SIZE[0]}x{GENERATED_SIZE[1]} JPEGs")
                files = sorted(generate_images(work / "generated", n).iterdir())
                image_note = (f"{n} synthetic {GENERATED_SIZE[0]}x{GENERATED_SIZE[1]} JPEGs (quality 90; PIL-drawn "
                              "gradients, shapes and mild noise; not photos), cycled to batch x "
                              f"{e2e_batches} images")
            for b in batch_sizes if end_to_end else []:
                folders[b] = _link_folder(files, work / f"e2e_b{b}", b * e2e_batches)

        samples: dict[tuple, dict] = {}
        for r in range(rounds):
            for backend, engine in engines:
                for b in batch_sizes:
                    if getattr(engine, "max_batch", None) and b > engine.max_batch:
                        if r == 0:
                            skipped.append({"backend": backend, "precision": engine.precision, "batch": b,
                                            "reason": f"batch above the engine's maximum {engine.max_batch}"})
                        continue
                    log(f"round {r + 1}/{rounds}: {backend} {engine.precision} batch {b}: engine")
                    key = (backend, engine.precision, b)
                    s = samples.setdefault(key, {"engine": [], "device": [], "engine_rounds": [], "e2e": []})
                    m = measure_engine(engine, b, size, warmup, iters, seed=r)
                    s["engine"] += m["host_ms"]
                    s["device"] += m["device_ms"]
                    s["engine_rounds"].append(b * 1e3 / float(np.median(m["host_ms"])))
                    if end_to_end:
                        log(f"round {r + 1}/{rounds}: {backend} {engine.precision} batch {b}: end to end")
                        s["e2e"].append(measure_end_to_end(engine, bank, bundle.preprocess, bundle.scoring,
                                                           folders[b], b, workers, work))
        agreement = measure_parity(bundle, engines, files[:PARITY_IMAGES], bank, min(batch_sizes), log) if parity else {}
        work_per_image = _work_per_image(bundle, log) if peak else None
        peaks = gemm_peak(peak_size, threads=threads) if peak else {}
        results = []
        for backend, engine in engines:
            graph = getattr(engine, "graph_name", None) or getattr(engine, "reason", backend)
            speed_extra = {"parity": agreement.get(id(engine))}
            for b in batch_sizes:
                s = samples.get((backend, engine.precision, b))
                if s is None:
                    continue
                p = _pct(s["engine"])
                extra = {}
                if s["device"]:
                    dp = _pct(s["device"])
                    extra = {"device_p50_ms": dp["p50_ms"], "device_p95_ms": dp["p95_ms"], "device_p99_ms": dp["p99_ms"],
                             "device_images_per_s": b * 1e3 / dp["p50_ms"]}
                ips = b * 1e3 / p["p50_ms"]
                if work_per_image:
                    gops = work_per_image * ips / 1e9
                    top = peaks.get(f"{_peak_engine(backend)}_{engine.precision}") or peaks.get(f"best_{engine.precision}")
                    extra.update(gops=gops, fraction_of_peak=gops / top if top else None)
                results.append(_record(backend, engine.precision, graph, b, "engine", s["engine"], ips,
                                       s["engine_rounds"], {"engine": p["p50_ms"] / b},
                                       timing="host wall clock per run", **speed_extra, **extra))
                if s["e2e"]:
                    periods = [x for run in s["e2e"] for x in run["periods_ms"]]
                    wall = sum(run["wall_s"] for run in s["e2e"])
                    imgs = sum(run["images"] for run in s["e2e"])
                    stages = {k: float(np.mean([run["stages"][k] for run in s["e2e"]]))
                              for k in ("decode", "preprocess", "engine", "score", "wall")}
                    eng_ips = b * 1e3 / p["p50_ms"]
                    steady = b * 1e3 / float(np.median(periods))
                    results.append(_record(
                        backend, engine.precision, graph, b, "end_to_end", periods, imgs / wall,
                        [run["images"] / run["wall_s"] for run in s["e2e"]], stages,
                        steady_images_per_s=steady, fraction_of_engine=(imgs / wall) / eng_ips,
                        steady_fraction_of_engine=steady / eng_ips,
                        images=imgs, errors=sum(run["errors"] for run in s["e2e"]),
                        first_batch_ms=float(np.mean([run["first_batch_ms"] or 0 for run in s["e2e"]])),
                        workers=s["e2e"][0]["workers"], timing="per-batch period in run_folder", **speed_extra))
        base = {(r["batch"], r["stage"]): r["images_per_s"] for r in results
                if r["backend"] == "torch" and r["precision"] == "fp32"}
        for r in results:
            ref = base.get((r["batch"], r["stage"]))
            r["ratio_to_torch"] = r["images_per_s"] / ref if ref else None
    finally:
        for _b, engine in engines:
            with contextlib.suppress(Exception):
                engine.close()
        shutil.rmtree(work, ignore_errors=True)

    used = {f"{b} {getattr(e, 'precision', '')}".strip(): getattr(e, "reason", None) or getattr(e, "graph_name", "")
            for b, e in engines}
    return {
        "machine": {"cpu": cpu_info(), "gpus": gpu_info(), "versions": versions(), "model": model_info(bundle, len(bank)),
                    "platform": platform.platform()},
        "method": {
            "engine": (f"random pixels [B, 3, {size}, {size}] float32; {warmup} warm-up runs, then {iters} timed runs "
                       "per round (time.perf_counter around Engine.run, host<->device copies included); p50/p95/p99 "
                       "over all rounds' runs; images_per_s = B / p50. device_*: CUDA events around the run where "
                       "there is a GPU (torch.cuda events for torch, cuda-python events for TensorRT)."),
            "end_to_end": ("qks.runtime.infer.run_folder, the qks-infer folder runner: decode+preprocess in "
                           f"{workers or min(4, os.cpu_count() or 1)} worker threads, batches to the engine, "
                           "max-over-queries scoring, sigmoid, top-5 selection, JSONL to a temporary file; "
                           "percentiles: period between consecutive batch completions (first batch excluded); "
                           "images_per_s: images / wall time of the whole run (pipeline fill included); stages: mean "
                           "ms per image in each stage (decode and preprocess on worker threads, overlapped)."),
            "images": image_note,
            "torch": ("--ckpt: qks.checkpoint.model_from_checkpoint(...).query_features, fp32 eager, torch.no_grad(), "
                      "torch threads = " + (str(threads) if threads else "torch default")),
            "ratio_to_torch": "images_per_s / the torch fp32 record's images_per_s at the same batch and stage",
            "parity": (f"query features of up to {PARITY_IMAGES} of the images (decoded by the bundle's preprocessing) "
                       "against PyTorch fp32 (--ckpt) or else ONNX Runtime CPU's fp32 graph: worst cosine per image "
                       "and per query, top-5 agreement of max-over-queries scores against the label bank; gate: "
                       f"{GATE}") if parity else None,
            "peak": ("gops: the fp32 image graph's matrix-product FLOPs per image (counted from an ONNX Runtime "
                     "profile) x images_per_s; fraction_of_peak: gops / the measured n^3 GEMM peak of the same "
                     "engine and precision (gemm_peak), else the best engine's") if peak else None,
            "gemm_peak": peaks or None, "flops_per_image": work_per_image,
            "iters": iters, "warmup": warmup, "rounds": rounds, "e2e_batches": e2e_batches,
            "threads": threads, "labels": len(bank), "label_source": bank.source, "engines": used,
        },
        "results": results,
        "skipped": skipped,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "qks-bench " + " ".join(sys.argv[1:]),
    }


# ---------------------------------------------------------------------------------------------
# output


def format_table(report: dict) -> str:
    cpu = report["machine"]["cpu"]
    model = report["machine"]["model"]
    isa = ", ".join(k for k, v in cpu["isa_summary"].items() if v) or "none of AVX-512/VNNI/AMX"
    gpus = ", ".join(g["name"] for g in report["machine"]["gpus"]) or "none"
    lines = [f"machine: {cpu['model']} ({cpu['usable_cpus']} usable CPUs; {isa}); GPU: {gpus}",
             f"model: {model['backbone']}, Nq={model['queries']}, L={model['layers']}, D={model['embed_dim']}, "
             f"{model['labels']} labels, {model['image_size']}px",
             ""]
    head = (f"{'backend':<9} {'prec':<5} {'batch':>5} {'stage':<10} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
            f"{'img/s':>8} {'x torch':>7} {'cos min':>8} {'top-5':>6} {'gate':>4} {'peak':>5}  "
            "per-image ms: decode / preprocess / engine / score")
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        ratio = f"{r['ratio_to_torch']:.2f}" if r["ratio_to_torch"] else "-"
        par = r.get("parity") or {}
        cos = f"{par['cosine_min']:.5f}" if "cosine_min" in par else "-"
        top5 = f"{par['top5_agreement']:.1%}" if "top5_agreement" in par else "-"
        gate = ("pass" if par["gate"] else "FAIL") if "gate" in par else "-"
        peak = f"{r['fraction_of_peak']:.0%}" if r.get("fraction_of_peak") else "-"
        st = r["stages"]
        stages = (f"{st['decode']:.1f} / {st['preprocess']:.1f} / {st['engine']:.1f} / {st['score']:.2f}"
                  if r["stage"] == "end_to_end" else f"engine {st['engine']:.1f}")
        if r["stage"] == "end_to_end":
            stages += f"  ({r['fraction_of_engine']:.0%} of engine img/s)"
        if "device_p50_ms" in r:
            stages += f"  device p50 {r['device_p50_ms']:.2f} ms"
        lines.append(f"{r['backend']:<9} {r['precision']:<5} {r['batch']:>5} {r['stage']:<10} {r['p50_ms']:>9.2f} "
                     f"{r['p95_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['images_per_s']:>8.2f} {ratio:>7} {cos:>8} {top5:>6} "
                     f"{gate:>4} {peak:>5}  {stages}")
    for s in report["skipped"]:
        lines.append(f"skipped {s['backend']}{' ' + s['precision'] if s.get('precision') else ''}"
                     f"{' batch ' + str(s['batch']) if s.get('batch') else ''}: {s['reason']}")
    return "\n".join(lines)


def _csv_list(value: str, what: str, cast=str) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter(f"empty {what} list")
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise click.BadParameter(f"{what}: {value!r} is not a comma-separated list") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_dir", default="./bundle", show_default=True, type=click.Path(path_type=Path))
@click.option("--backends", default=",".join(BENCH_BACKENDS), show_default=True,
              help=f"Comma-separated: {', '.join(BENCH_BACKENDS)} (torch needs --ckpt). Those that cannot run here "
                   "are listed as skipped.")
@click.option("--precision", "precisions", default="auto", show_default=True,
              help="Image graph precision(s), comma-separated: auto (what qks-infer picks), fp32, fp16, int8, bf16, "
                   "or all (every precision each backend runs; torch: fp32 and bf16 autocast).")
@click.option("--batch-sizes", default="1,8,32", show_default=True)
@click.option("--labels", type=click.Path(dir_okay=False), help="Label file for scoring (default: the bundle's bank).")
@click.option("--iters", type=click.IntRange(1), default=20, show_default=True, help="Timed runs per round.")
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True,
              help="Repeat everything, interleaved across backends (shows the machine's noise).")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Image folder for the end-to-end path (default: synthetic JPEGs).")
@click.option("--e2e-batches", type=click.IntRange(2), help="Batches per end-to-end run (default: max(iters/2, 3)).")
@click.option("--no-end-to-end", is_flag=True, help="Time the engines only.")
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime intra-op threads and torch threads.")
@click.option("--workers", type=click.IntRange(1), help="Decode threads of the end-to-end path (default: min(4, CPUs)).")
@click.option("--ckpt", type=click.Path(dir_okay=False, path_type=Path),
              help="Training checkpoint: adds the PyTorch fp32 eager baseline (needs torch).")
@click.option("--torch-device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--cuda-graph", is_flag=True, help="TensorRT: replay full batches as a captured CUDA graph.")
@click.option("--no-parity", is_flag=True, help="Skip parity (cosine and top-5 agreement against fp32 on --images).")
@click.option("--peak", is_flag=True, help="Measure the GEMM peak per engine and precision and give every row's "
              "GOP/s as a fraction of it.")
@click.option("--peak-size", type=click.IntRange(64), default=2048, show_default=True, help="n of the n^3 peak GEMM.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON report here.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
def _bench(bundle_dir, backends, precisions, batch_sizes, labels, iters, warmup, rounds, images, e2e_batches,
           no_end_to_end, threads, workers, ckpt, torch_device, cuda_graph, no_parity, peak, peak_size, out, quiet):
    """Latency and throughput of a bundle per backend and batch size, against the PyTorch baseline."""
    backends = _csv_list(backends, "backend")
    bad = [b for b in backends if b not in BENCH_BACKENDS]
    if bad:
        raise click.BadParameter(f"unknown backend {bad[0]!r} (one of {', '.join(BENCH_BACKENDS)})")
    precisions = _csv_list(precisions, "precision")
    bad = [p for p in precisions if p not in (*PRECISIONS, "all")]
    if bad:
        raise click.BadParameter(f"unknown precision {bad[0]!r} (one of {', '.join(PRECISIONS)}, all)")
    sizes = _csv_list(batch_sizes, "batch size", int)
    if any(b < 1 for b in sizes):
        raise click.BadParameter("batch sizes must be >= 1")
    log = (lambda m: None) if quiet else (lambda m: click.echo(f"qks-bench: {m}", err=True))
    report = run_bench(bundle_dir, backends, sizes, precisions=precisions, labels=labels, iters=iters, warmup=warmup,
                       images=images, threads=threads, workers=workers, ckpt=ckpt, e2e_batches=e2e_batches,
                       rounds=rounds, end_to_end=not no_end_to_end, cuda_graph=cuda_graph,
                       torch_device=torch_device, parity=not no_parity, peak=peak,
                       peak_size=peak_size, log=log)
    click.echo(format_table(report))
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        click.echo(f"qks-bench: wrote {out}", err=True)


def main(argv: list[str] | None = None) -> None:
    prog = "qks-bench"
    try:
        _bench.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(f"{prog}: error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"{prog}: error: {e.format_message()} (see {prog} --help)", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(f"{prog}: error: interrupted", err=True)
        sys.exit(130)
    except (BenchError, BundleError, EngineError, LabelError, PreprocessError, OSError) as e:
        click.echo(f"{prog}: error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
