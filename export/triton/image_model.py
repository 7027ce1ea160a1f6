"""Which of a bundle's image graphs or TensorRT plans the ONNX repository serves (`--image-model`,
`--gpu-sm`, `--max-batch`), and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .common import DEFAULT_MAX_BATCH, TritonError, external_data

IMAGE_MODELS = ("auto", "onnx", "fp16", "int8", "plan")
ONNX_GRAPHS = {"onnx": "image_encoder", "fp16": "image_encoder_fp16", "int8": "image_encoder_int8"}


@dataclass
class ImageModel:
    kind: str  # "onnx" | "plan"
    graph: str  # the manifest graph it is (or was built from)
    source: Path  # the file in the bundle
    sha256: str  # of that file
    precision: str
    inputs: list[dict]  # [{"name", "dtype", "shape" (batch first)}]
    outputs: list[dict]
    max_batch: int
    reason: str
    extra_files: list[str] = field(default_factory=list)  # ONNX external data, relative to the graph
    sm: str | None = None
    trt_version: str | None = None

    @property
    def platform(self) -> str:
        return "tensorrt_plan" if self.kind == "plan" else "onnxruntime_onnx"

    @property
    def filename(self) -> str:
        return "model.plan" if self.kind == "plan" else "model.onnx"


def _plans(bundle) -> list[dict]:
    return [e for e in bundle.engines if str(e.get("graph", "")).startswith("image_encoder")]


def _sidecar(bundle, rec: dict) -> dict:
    from ...engines.base import EngineError
    from ...engines.plan import read_sidecar

    try:
        side = read_sidecar(rec["path"], bundle.file(rec["sidecar"]) if rec.get("sidecar") else None)
    except EngineError as e:
        raise TritonError(str(e)) from None
    return {**rec, **side}


def _is_triton_trt(side: dict) -> bool:
    """Built by NVIDIA TensorRT (what Triton's tensorrt backend loads), not TensorRT for RTX."""
    return side.get("trt_flavor", "tensorrt") == "tensorrt" and side.get("trt_module", "tensorrt") == "tensorrt"


def _plan_model(bundle, side: dict, max_batch: int | None, why: str) -> ImageModel:
    from ...engines.plan import normalize_sm

    name = Path(side["file"]).name
    inputs, outputs = side.get("inputs") or [], side.get("outputs") or []
    try:
        lo, hi = _profile_batch(side)
    except (KeyError, TypeError, ValueError, IndexError):
        lo = hi = None
    if not inputs or not outputs or hi is None:
        raise TritonError(f"{name}: its sidecar does not record the plan's inputs, outputs and profile")
    if lo != 1:
        raise TritonError(f"{name}: its optimisation profile's min batch is {lo}; Triton needs min batch 1 "
                          "(rebuild with qks-export --tensorrt)")
    if max_batch is not None and max_batch > hi:
        raise TritonError(f"--max-batch {max_batch} is larger than the plan's profile max batch {hi}")
    return ImageModel("plan", side.get("graph", "image_encoder"), side["path"], bundle.sha256(side["file"]),
                      side.get("precision", "fp32"), inputs, outputs, max_batch or hi, why,
                      sm=normalize_sm(side["sm"]) if side.get("sm") else None, trt_version=side.get("trt_version"))


def _profile_batch(side: dict) -> tuple[int, int]:
    """(min, max) batch of a plan's optimisation profile: {input: {"min", "opt", "max"}} (or
    [min, opt, max] shapes)."""
    profile = side["profile"]
    if not isinstance(profile, dict) or not profile:
        raise ValueError("no profile")
    shapes = [(p["min"], p["max"]) if isinstance(p, dict) else (p[0], p[2]) for p in profile.values()]
    return max(int(lo[0]) for lo, _ in shapes), min(int(hi[0]) for _, hi in shapes)


def _recorded_max_batch(bundle) -> int | None:
    """The image plans' profile max batch (what qks-export --max-batch recorded), if any."""
    best = None
    for rec in _plans(bundle):
        try:
            side = _sidecar(bundle, rec)
            best = max(best or 0, _profile_batch(side)[1])
        except (TritonError, KeyError, TypeError, ValueError, IndexError):
            continue
    return best


def choose_image_model(bundle, image_model: str = "auto", max_batch: int | None = None,
                       gpu_sm: str | None = None) -> ImageModel:
    """Which of the bundle's image graphs/plans the repository serves, and why."""
    from ...engines.base import EngineError
    from ...engines.plan import normalize_sm

    if image_model not in IMAGE_MODELS:
        raise TritonError(f"unknown --image-model {image_model!r} (one of {', '.join(IMAGE_MODELS)})")
    if gpu_sm is not None:
        try:
            gpu_sm = normalize_sm(gpu_sm)
        except EngineError as e:
            raise TritonError(str(e)) from None
    if image_model in ("auto", "plan"):
        sides = [_sidecar(bundle, rec) for rec in _plans(bundle)]
        usable = [s for s in sides if _is_triton_trt(s)]
        fitting = [s for s in usable if gpu_sm is None or (s.get("sm") and normalize_sm(s["sm"]) == gpu_sm)]
        # fp16 plans first, as qks-infer does
        fitting.sort(key=lambda s: 0 if "fp16" in (s.get("precision", "") + s.get("graph", "")) else 1)
        if image_model == "plan":
            if not sides:
                raise TritonError("the bundle has no TensorRT plan for the image encoder (qks-export --tensorrt on "
                                  "the serving GPU)")
            if not usable:
                raise TritonError(f"the bundle's plans ({', '.join(Path(s['file']).name for s in sides)}) were built "
                                  "by TensorRT for RTX; Triton's tensorrt backend loads NVIDIA TensorRT plans only "
                                  "(rebuild with qks-export --tensorrt on the serving GPU, or use --image-model onnx)")
            if not fitting:
                have = ", ".join(f"sm_{normalize_sm(s['sm'])} ({s.get('gpu_name', '?')})" for s in usable if s.get("sm"))
                raise TritonError(f"the bundle has no plan for GPU sm_{gpu_sm}; its plans are for {have}: rebuild "
                                  "with qks-export --tensorrt on that GPU, or use --image-model onnx")
            sms = {normalize_sm(s["sm"]) for s in fitting if s.get("sm")}
            if gpu_sm is None and len(sms) > 1:
                raise TritonError(f"the bundle has plans for several GPUs (sm_{', sm_'.join(sorted(sms))}): "
                                  "pick the serving GPU with --gpu-sm")
            s = fitting[0]
            return _plan_model(bundle, s, max_batch, f"TensorRT plan {Path(s['file']).name} (TensorRT "
                               f"{s.get('trt_version')}, sm_{s.get('sm')}): requested")
        if gpu_sm is not None and fitting:
            s = fitting[0]
            return _plan_model(bundle, s, max_batch, f"TensorRT plan {Path(s['file']).name} built for sm_{gpu_sm} "
                               f"with TensorRT {s.get('trt_version')}")
        why = ("the bundle has no TensorRT plan" if not sides else
               "its TensorRT plans are TensorRT for RTX plans, which Triton does not load" if not usable else
               "no --gpu-sm names the serving GPU (plans are GPU-specific)" if gpu_sm is None else
               f"no plan was built for sm_{gpu_sm}")
        graph_name = "image_encoder" if "image_encoder" in bundle.graphs else "image_encoder_fp16"
        reason = f"ONNX for Triton's onnxruntime backend because {why}"
    else:
        graph_name = ONNX_GRAPHS[image_model]
        if graph_name not in bundle.graphs:
            flag = {"fp16": " (qks-export --fp16)", "int8": " (qks-export --int8)"}.get(image_model, "")
            raise TritonError(f"the bundle has no {image_model} image graph{flag}")
        reason = "requested"
    g = bundle.graph(graph_name)
    recorded = _recorded_max_batch(bundle)
    mb = max_batch or recorded or DEFAULT_MAX_BATCH
    return ImageModel("onnx", g.name, g.path, g.sha256, g.precision, list(g.inputs), list(g.outputs), mb,
                      reason, extra_files=external_data(g.path))
