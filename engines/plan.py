"""TensorRT plan compatibility, from the JSON sidecar `qks-export` writes beside each plan.

A serialized TensorRT plan runs only with the TensorRT version that built it and on GPUs of the
same compute capability (SM). Export writes `<plan>.json` (fields below); the runtime compares it
with the machine and refuses a mismatch with a message saying which one (export can rebuild).
Pure Python: no TensorRT or GPU needed to read or check a sidecar.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .base import EngineError

SIDECAR_FIELDS = ("graph", "graph_sha256", "trt_module", "trt_version", "sm", "gpu_name", "precision",
                  "profile", "inputs", "outputs", "built")


def sidecar_path(plan: str | Path) -> Path:
    """`engines/x.plan` -> `engines/x.json` (what qks-export writes) or `engines/x.plan.json`."""
    plan = Path(plan)
    first = plan.with_suffix(".json")
    if first.is_file():
        return first
    second = plan.with_name(plan.name + ".json")
    return second if second.is_file() else first


def read_sidecar(plan: str | Path, sidecar: str | Path | None = None) -> dict:
    path = Path(sidecar) if sidecar is not None else sidecar_path(plan)
    if not path.is_file():
        raise EngineError(f"TensorRT plan {Path(plan).name} has no sidecar {path.name}: cannot tell what it was "
                          "built for; re-export the bundle with --tensorrt")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path.name}: unreadable plan sidecar ({e})") from None
    if not isinstance(meta, dict):
        raise EngineError(f"{path.name}: plan sidecar is not a JSON object")
    return meta


def normalize_sm(sm) -> str:
    """89, "89", "8.9", "sm_89", "sm89", (8, 9) -> "89"."""
    if isinstance(sm, (tuple, list)) and len(sm) == 2:
        return f"{int(sm[0])}{int(sm[1])}"
    text = str(sm).strip().lower()
    m = re.fullmatch(r"(?:sm_?)?(\d+)(?:\.(\d+))?", text)
    if not m:
        raise EngineError(f"unrecognised GPU compute capability {sm!r}")
    return m.group(1) + (m.group(2) or "")


def check_compatible(meta: dict, trt_version: str, sm, *, trt_module: str | None = None,
                     plan_name: str = "plan") -> None:
    """Raise EngineError naming what differs: TensorRT module, version, or GPU SM."""
    built_mod = meta.get("trt_module")
    if trt_module and built_mod and built_mod != trt_module:
        raise EngineError(f"{plan_name} was built by {built_mod}, this machine has {trt_module}: "
                          "re-export with qks-export --tensorrt on this machine")
    missing = [k for k in ("trt_version", "sm") if meta.get(k) in (None, "")]
    if missing:
        raise EngineError(f"{plan_name}: its sidecar does not say which {' or '.join(missing)} it was built for; "
                          "re-export with qks-export --tensorrt on this machine")
    built_ver = meta.get("trt_version")
    if str(built_ver) != str(trt_version):
        raise EngineError(f"{plan_name} was built with TensorRT {built_ver}, this machine has TensorRT "
                          f"{trt_version}: re-export with qks-export --tensorrt on this machine")
    built_sm = meta.get("sm")
    if built_sm is None or normalize_sm(built_sm) != normalize_sm(sm):
        gpu = f" ({meta['gpu_name']})" if meta.get("gpu_name") else ""
        raise EngineError(f"{plan_name} was built for GPU sm_{normalize_sm(built_sm) if built_sm is not None else '?'}"
                          f"{gpu}, this GPU is sm_{normalize_sm(sm)}: re-export with qks-export --tensorrt on "
                          "this machine")
