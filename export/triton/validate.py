"""`validate_repository` (and `qks-triton --check`): every config.pbtxt parsed with tritonclient's
ModelConfig protobuf, names, version folders, model files, label files, ONNX I/O against the
config, a qks Python-backend model's own files, and ensembles wired the way Triton checks them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import one_line
from . import common
from .common import TritonError, external_locations


def _parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(encoding="utf-8"), cfg)
    return cfg


def _wild_eq(a, b) -> bool:
    """Triton's CompareDimsWithWildcard: same rank, each dim equal or -1 on either side."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


def _onnx_io_problems(rel: str, cfg, model_file: Path) -> list[str]:
    """The config's inputs/outputs against the ONNX graph's: names, element types, dims."""
    try:
        import onnx
        from onnx import TensorProto
    except ImportError:
        return []
    from tritonclient.grpc import model_config_pb2 as pb

    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception as e:
        return [f"{rel}: {model_file.name} is not a readable ONNX model ({one_line(e)})"]
    onnx_types = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.BFLOAT16: "TYPE_BF16",
                  TensorProto.DOUBLE: "TYPE_FP64", TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32",
                  TensorProto.INT16: "TYPE_INT16", TensorProto.INT8: "TYPE_INT8", TensorProto.UINT8: "TYPE_UINT8",
                  TensorProto.BOOL: "TYPE_BOOL"}
    inits = {t.name for t in model.graph.initializer}
    problems = []
    batching = cfg.max_batch_size > 0
    for kind, tensors, graph_values in (("input", cfg.input, [v for v in model.graph.input if v.name not in inits]),
                                        ("output", cfg.output, list(model.graph.output))):
        by_name = {v.name: v for v in graph_values}
        for t in tensors:
            v = by_name.get(t.name)
            if v is None:
                problems.append(f"{rel}: {kind} {t.name!r} is not in {model_file.name} "
                                f"(it has {', '.join(sorted(by_name)) or 'none'})")
                continue
            tt = v.type.tensor_type
            want = pb.DataType.Name(t.data_type)
            if onnx_types.get(tt.elem_type) != want:
                problems.append(f"{rel}: {kind} {t.name!r} is {want} in the config, "
                                f"{TensorProto.DataType.Name(tt.elem_type)} in {model_file.name}")
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            if batching:
                if not shape or shape[0] != -1:
                    problems.append(f"{rel}: {kind} {t.name!r} has no dynamic batch dimension in {model_file.name} "
                                    f"but max_batch_size is {cfg.max_batch_size}")
                    continue
                shape = shape[1:]
            if not _wild_eq(shape, t.dims):
                problems.append(f"{rel}: {kind} {t.name!r} has dims {list(t.dims)} in the config, "
                                f"{shape} in {model_file.name}")
        if kind == "input":
            missing = sorted(set(by_name) - {t.name for t in tensors})
            if missing:
                problems.append(f"{rel}: {model_file.name} input(s) {', '.join(missing)} are not in the config")
    for loc in external_locations(model):
        if not (model_file.parent / loc).is_file():
            problems.append(f"{rel}: {model_file.name}'s external data file {loc} is missing")
    return problems


DEFAULT_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan", "python": "model.py"}


def _model_problems(repo: Path, folder: str, cfg, check_files: bool) -> list[str]:
    rel = f"{folder}/config.pbtxt"
    problems = []
    if cfg.name and cfg.name != folder:
        problems.append(f"{rel}: name {cfg.name!r} is not the folder's name {folder!r}")
    if not cfg.platform and not cfg.backend:
        problems.append(f"{rel}: neither platform nor backend is set")
    if cfg.max_batch_size < 0:
        problems.append(f"{rel}: max_batch_size {cfg.max_batch_size} is negative")
    if cfg.HasField("dynamic_batching") and cfg.max_batch_size == 0:
        problems.append(f"{rel}: dynamic_batching needs max_batch_size > 0")
    if not cfg.input or not cfg.output:
        problems.append(f"{rel}: a model needs at least one input and one output")
    from tritonclient.grpc import model_config_pb2 as pb

    for kind, tensors in (("input", cfg.input), ("output", cfg.output)):
        seen = set()
        for t in tensors:
            if not t.name:
                problems.append(f"{rel}: an {kind} has no name")
            if t.name in seen:
                problems.append(f"{rel}: {kind} {t.name!r} appears twice")
            seen.add(t.name)
            if t.data_type == pb.TYPE_INVALID:
                problems.append(f"{rel}: {kind} {t.name!r} has no data_type")
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                problems.append(f"{rel}: {kind} {t.name!r} has invalid dims {list(t.dims)}")
            if kind == "output" and t.label_filename:
                lf = repo / folder / t.label_filename
                if not lf.is_file():
                    problems.append(f"{rel}: output {t.name!r} names label file {t.label_filename}, which is missing")
                elif len(t.dims) == 1 and t.dims[0] > 0:
                    n = len(lf.read_text(encoding="utf-8").splitlines())
                    if n != t.dims[0]:
                        problems.append(f"{folder}/{t.label_filename} has {n} labels, output {t.name!r} has "
                                        f"{t.dims[0]}")
    versions = sorted(p.name for p in (repo / folder).iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        problems.append(f"{folder}: no version folder (1/)")
    if check_files and cfg.platform != "ensemble":
        filename = cfg.default_model_filename or DEFAULT_FILES.get(cfg.platform or cfg.backend)
        for v in versions:
            f = repo / folder / v / filename if filename else None
            if f is None or not f.is_file():
                problems.append(f"{folder}/{v}: model file {filename or '?'} is missing")
            elif cfg.platform == "onnxruntime_onnx":
                problems.extend(_onnx_io_problems(rel, cfg, f))
        if cfg.backend == "python":
            problems.extend(python_model_problems(repo / folder, cfg, versions))
    return problems


def _ensemble_problems(folder: str, cfg, configs: dict, unreadable: set[str] = frozenset()) -> list[str]:
    """Triton's ValidateEnsembleConfig, in Python: every step's model exists, batch sizes fit, every
    model input is mapped exactly once, every mapped output exists, and each ensemble tensor has one
    data type and consistent dims wherever it appears; the ensemble's outputs are produced."""
    rel = f"{folder}/config.pbtxt"
    problems = []
    steps = cfg.ensemble_scheduling.step
    if not steps:
        return [f"{rel}: an ensemble needs ensemble_scheduling steps"]
    batching = cfg.max_batch_size > 0
    tensors: dict[str, tuple[str, int, list, list]] = {}  # name -> (from, dtype, dims, full dims)

    def node(model, batch, dtype, dims):
        return (model, dtype, list(dims), ([-1] if batch else []) + list(dims))

    def consistent(tname, a, b):
        from tritonclient.grpc import model_config_pb2 as pb

        if a[1] != b[1]:
            problems.append(f"{rel}: ensemble tensor {tname!r} is {pb.DataType.Name(a[1])} from {a[0]} but "
                            f"{pb.DataType.Name(b[1])} from {b[0]}")
        elif not _wild_eq(a[2], b[2]) and not _wild_eq(a[3], b[3]):
            problems.append(f"{rel}: ensemble tensor {tname!r} has shape {a[3]} from {a[0]} but {b[3]} from {b[0]}")

    for t in cfg.input:
        tensors[t.name] = node(folder, batching, t.data_type, t.dims)
    outputs = {t.name: node(folder, batching, t.data_type, t.dims) for t in cfg.output}
    tensors.update(outputs)
    available = {t.name for t in cfg.input}
    produced = set()
    for i, step in enumerate(steps, 1):
        sub = configs.get(step.model_name)
        if step.model_name in unreadable:  # its config's own problem is reported; do not cascade
            return problems
        if sub is None:
            problems.append(f"{rel}: step {i} uses model {step.model_name!r}, which is not in the repository")
            continue
        if sub.max_batch_size != 0 and sub.max_batch_size < cfg.max_batch_size:
            problems.append(f"{rel}: max_batch_size {cfg.max_batch_size} is larger than {step.model_name}'s "
                            f"{sub.max_batch_size}")
        sub_batch = sub.max_batch_size > 0
        sub_in = {t.name: t for t in sub.input}
        sub_out = {t.name: t for t in sub.output}
        for key, value in step.input_map.items():
            if key not in sub_in:
                problems.append(f"{rel}: step {i} maps ensemble tensor {value!r} to {key!r}, which is not an input "
                                f"of {step.model_name} (it has {', '.join(sorted(sub_in))})")
            elif value not in available:
                problems.append(f"{rel}: step {i} reads {value!r}, which is neither an ensemble input nor an output "
                                "of an earlier step")
        for name, t in sub_in.items():
            mapped = [v for k, v in step.input_map.items() if k == name]
            if not mapped:
                problems.append(f"{rel}: input {name!r} of {step.model_name} is not mapped to any ensemble tensor")
                continue
            here = node(step.model_name, sub_batch, t.data_type, t.dims)
            if mapped[0] in tensors:
                consistent(mapped[0], tensors[mapped[0]], here)
            else:
                tensors[mapped[0]] = here
        targets = list(step.output_map.values())
        for key, value in step.output_map.items():
            if key not in sub_out:
                problems.append(f"{rel}: step {i} maps {key!r}, which is not an output of {step.model_name} "
                                f"(it has {', '.join(sorted(sub_out))})")
                continue
            if targets.count(value) > 1:
                problems.append(f"{rel}: several outputs of {step.model_name} map to ensemble tensor {value!r}")
            here = node(step.model_name, sub_batch, sub_out[key].data_type, sub_out[key].dims)
            if value in tensors:
                consistent(value, tensors[value], here)
            else:
                tensors[value] = here
            available.add(value)
            produced.add(value)
    for name in outputs:
        if name not in produced:
            problems.append(f"{rel}: ensemble output {name!r} is not produced by any step")
    return problems


def validate_repository(repo: str | Path, *, models: list[str] | None = None, check_files: bool = True) -> list[str]:
    """Problems found in a Triton model repository (empty: it validates). Every model folder's
    config.pbtxt is parsed with tritonclient's ModelConfig protobuf; see the module docstring for
    the rest. `models` limits the per-model checks to those folders (ensembles are always checked
    against everything present). TritonError if tritonclient is missing or REPO is not a folder."""
    repo = Path(repo)
    missing = common.tritonclient_missing()
    if missing:
        raise TritonError(f"validating a Triton repository needs tritonclient's model-config protobuf: {missing}")
    from google.protobuf import text_format

    if not repo.is_dir():
        raise TritonError(f"Triton repository not found: {repo}")
    folders = sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        return [f"{repo}: no model folders"]
    problems, configs, unreadable = [], {}, set()
    for folder in folders:
        path = repo / folder / "config.pbtxt"
        if not path.is_file():
            problems.append(f"{folder}: no config.pbtxt")
            continue
        try:
            configs[folder] = _parse_config(path)
        except text_format.ParseError as e:
            problems.append(f"{folder}/config.pbtxt: {one_line(e)}")
            unreadable.add(folder)
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{folder}/config.pbtxt: unreadable ({one_line(e)})")
            unreadable.add(folder)
    for folder, cfg in configs.items():
        if models is None or folder in models:
            problems.extend(_model_problems(repo, folder, cfg, check_files))
        if cfg.platform == "ensemble" or cfg.HasField("ensemble_scheduling"):
            problems.extend(_ensemble_problems(folder, cfg, configs, unreadable))
    return problems


def _tritonclient_available() -> bool:
    return common.tritonclient_missing() is None


def validate_or_raise(repo: Path, models: list[str] | None = None) -> bool:
    if not _tritonclient_available():
        return False
    problems = validate_repository(repo, models=models)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TritonError(f"the generated repository does not validate: {problems[0]}{more}")
    return True


def python_model_problems(model_dir: Path, cfg, versions: list[str]) -> list[str]:
    """A qks Python-backend model's own files, for validate_repository: the spec, the files it names,
    and the label count against the bank and the config's outputs."""
    from ...serving import triton_model as tm

    problems = []
    folder = model_dir.name
    for v in versions:
        try:
            spec = tm.read_spec(model_dir / v)
        except tm.ServingError as e:
            if (model_dir / v / tm.SPEC_FILE).exists():
                problems.append(f"{folder}/{v}: {e}")
            continue  # another Python model: not ours to check
        for key in ("graph", "bank"):
            rel = (spec.get(key) or {}).get("file")
            if not rel or not (model_dir / v / rel).is_file():
                problems.append(f"{folder}/{v}: {tm.SPEC_FILE} names {key} file {rel!r}, which is missing")
        bank = model_dir / v / tm.BANK_FILE
        labels = model_dir / tm.LABELS_FILE
        if bank.is_file() and labels.is_file():
            rows = np.load(bank, mmap_mode="r", allow_pickle=False).shape[0]
            n = len(labels.read_text(encoding="utf-8").splitlines())
            if rows != n:
                problems.append(f"{folder}: {tm.LABELS_FILE} has {n} labels, {v}/{tm.BANK_FILE} has {rows} rows")
    return problems
