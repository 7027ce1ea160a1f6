"""Checkpoint (or backbone alone) -> bundle: the two ONNX graphs, tokenizer, prompts, label banks,
verification, FP16, INT8 and TensorRT engines, described by `manifest.json` (the contract in
`qks.runtime.manifest`). The steps are in `qks.export.steps`; what is exported from, in
`qks.export.sources`; this module owns the API and the folder.

Everything is written into a temporary folder next to `out`; the manifest is written last
(atomically), and only then is the folder renamed to `out`. A killed export leaves at most a
`.<name>.tmp-<host>-<pid>-*` folder behind, never a bundle that looks complete; the next export to the
same `out` on that host deletes it once its process is gone.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ExportError
from .graphs import DEFAULT_OPSET
from .sources import ExportSource, checkpoint_source, zero_shot_source
from .steps import ExportJob, run_steps

BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class ExportOptions:
    """What an export does besides its source and output folder; `qks-export`'s options, one to one."""

    labels: dict[str, list[str]] = field(default_factory=dict)  # extra label banks: name -> label texts
    fp16: bool = False  # also write image_encoder.fp16.onnx
    int8: bool = False  # also write image_encoder.int8.onnx (INT8 products for CPUs, qks.export.int8)
    tensorrt: bool = False  # build TensorRT plans under engines/ (profile batch 1..max_batch)
    max_batch: int = 32
    calibration_images: str | Path | None = None  # real images to verify on, besides random ones
    opset: int = DEFAULT_OPSET
    overwrite: bool = True  # replace a bundle at `out` (a non-empty folder that is not one: never)
    seed: int = 0
    trt_compute_capability: str | None = None  # TensorRT for RTX's target without a GPU ("86")
    # qks.prompts.LabelEmbedder's cache folder; default: label_cache/ beside the checkpoint when it exists
    # and is writable (what qks-train fills), so a run's labels are not embedded again
    label_cache: str | Path | None = None
    prompts: str | Path | None = None  # zero-shot: a prompt-pool file instead of the family's default

    def check(self) -> None:
        if self.max_batch < 1:
            raise ExportError(f"--max-batch must be >= 1 (got {self.max_batch})")
        self.labels = _check_banks(self.labels)


@dataclass
class ExportReport:
    """What an export did (returned by `export_bundle_report`, printed by the CLI)."""

    path: Path
    manifest: dict
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _options(options: ExportOptions | None, kwargs: dict) -> ExportOptions:
    options = dataclasses.replace(options or ExportOptions(), **kwargs)
    options.check()
    return options


def export_bundle(ckpt: str | Path, out: str | Path, options: ExportOptions | None = None, log=None,
                  **kwargs) -> Path:
    """Export checkpoint `ckpt` to the bundle folder `out`; returns `out`. `options` (or its fields as
    keyword arguments): see `ExportOptions`. The checkpoint's seen + unseen labels always form the bank
    "default". Raises `ExportError` (one-line message) for anything the user can fix."""
    return export_bundle_report(ckpt, out, options, log, **kwargs).path


def export_bundle_report(ckpt, out, options: ExportOptions | None = None, log=None, **kwargs) -> ExportReport:
    options = _options(options, kwargs)
    if options.prompts is not None:
        raise ExportError("prompts go with a zero-shot export: a checkpoint names the prompt pool it was trained with")
    return _export(lambda: checkpoint_source(ckpt, options.labels), Path(out), options,
                   _label_cache(ckpt, options.label_cache), log)


def export_zero_shot(backbone: str, out: str | Path, options: ExportOptions | None = None, log=None,
                     **kwargs) -> Path:
    """Export backbone `backbone` (a registry spec) alone to the bundle folder `out`, no head and no
    checkpoint; returns `out`. The image graph gives the model's own image embedding, scored by the
    model family's own rule (`qks.export.sources`). The first `labels` bank is the default (without
    one, a shipped everyday vocabulary); `prompts`: a prompt-pool file (default: one prompt)."""
    return export_zero_shot_report(backbone, out, options, log, **kwargs).path


def export_zero_shot_report(backbone: str, out, options: ExportOptions | None = None, log=None,
                            **kwargs) -> ExportReport:
    options = _options(options, kwargs)
    prompts = _read_prompts(options.prompts) if options.prompts is not None else None
    cache = _label_cache(None, options.label_cache)
    return _export(lambda: zero_shot_source(backbone, options.labels, prompts), Path(out), options, cache, log)


def _export(load_source, out: Path, options: ExportOptions, label_cache: Path | None, log) -> ExportReport:
    log = log or (lambda msg: None)
    _check_dependencies(options.fp16)
    _check_out(out, options.overwrite)
    if options.tensorrt:  # fail before minutes of building the model and exporting it, not after
        from .tensorrt_build import import_tensorrt

        import_tensorrt()
    source: ExportSource = load_source()
    _remove_stale_temps(out, log)
    tmp = _make_temp(out)
    try:
        job = ExportJob(d=tmp, source=source, options=options, label_cache=label_cache, log=log)
        run_steps(job)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(path=out, manifest=job.manifest, seconds=job.seconds, notes=source.notes)


def _make_temp(out: Path) -> Path:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    except OSError as e:
        raise ExportError(f"cannot write the bundle next to {out}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a bundle is an ordinary folder
    return tmp


# ---------------------------------------------------------------------------------------------
# inputs


def _check_dependencies(fp16: bool) -> None:
    """The optional packages export needs, named with the extra that installs them."""
    import importlib.util

    needed = [("onnx", "export"), ("onnxscript", "export"), ("onnxruntime", "core"), ("tokenizers", "core"),
              ("open_clip", "train"), ("torchvision", "train")]
    if fp16:
        needed.append(("onnxconverter_common", "export"))
    missing = [(m, extra) for m, extra in needed if importlib.util.find_spec(m) is None]
    if missing:
        extras = sorted({extra for _, extra in missing if extra != "core"})
        hint = f"pip install 'qks[{','.join(extras)}]'" if extras else "pip install qks"
        raise ExportError(f"qks-export needs {', '.join(m for m, _ in missing)}: {hint}")


def _check_banks(labels: dict[str, list[str]]) -> dict[str, list[str]]:
    banks = {}
    for name, names in labels.items():
        if not BANK_NAME.match(name):
            raise ExportError(f"label bank name {name!r}: use letters, digits, '_', '-', '.' (it names files)")
        names = [str(n) for n in names]
        if not names:
            raise ExportError(f"label bank {name!r} has no labels")
        bad = [n for n in names if not n.strip() or "\n" in n or "\r" in n or n != n.strip()]
        if bad:
            raise ExportError(f"label bank {name!r}: label {bad[0]!r} is empty, spans lines or has surrounding spaces")
        seen = set()
        for n in names:
            if n in seen:
                raise ExportError(f"label bank {name!r}: duplicate label {n!r}")
            seen.add(n)
        banks[name] = names
    return banks


def read_labels_file(path: str | Path) -> tuple[str, list[str]]:
    """A labels file (UTF-8, one label a line; blank lines and `#` comments skipped) -> (bank name =
    file stem, labels)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"labels file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first label
    except UnicodeDecodeError:
        raise ExportError(f"labels file {path} is not UTF-8 text") from None
    names = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise ExportError(f"labels file {path} has no labels")
    return path.stem, names


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"output {out} exists and is not a folder")
        from qks.runtime.manifest import MANIFEST

        if any(out.iterdir()):
            if not (out / MANIFEST).is_file():
                raise ExportError(f"output {out} is a non-empty folder that is not a qks bundle; refusing to replace it")
            if not overwrite:
                raise ExportError(f"output {out} already holds a bundle (pass overwrite to replace it)")
    parent = out.parent
    if not parent.is_dir():
        raise ExportError(f"output folder's parent {parent} does not exist")


def _read_prompts(path) -> list[str]:
    from qks.prompts import load_prompts

    try:
        return load_prompts(str(path))
    except UnicodeDecodeError:
        raise ExportError(f"prompt pool {path} is not UTF-8 text") from None
    except OSError as e:
        raise ExportError(f"prompt pool {path}: {e.strerror or e}") from None
    except ValueError as e:  # load_prompts names the pool itself
        raise ExportError(str(e)) from None


def _label_cache(ckpt, label_cache) -> Path | None:
    if label_cache is not None:
        path = Path(label_cache)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExportError(f"label cache {path}: cannot create it ({e.strerror or e})") from None
        return path
    if ckpt is None:
        return None
    default = Path(ckpt).parent / "label_cache"
    return default if default.is_dir() and os.access(default, os.W_OK | os.X_OK) else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the C
    library, kernel or filesystem cannot."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", platform.node() or "host")


def _temp_prefix(out: Path) -> str:
    # The exporting host and process in the name: a later export can tell a folder left by a killed
    # export (its process is gone) from one that another export is still writing.
    return f".{out.name}.tmp-{_host()}-{os.getpid()}-"


_TEMP_OWNER = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, someone else's
        return True
    return True


def _remove_stale_temps(out: Path, log) -> None:
    """Delete the temp folders that killed exports to `out` left on this host (their process is gone).
    Folders of live exports, of other hosts, or named the old way (no owner) are left alone."""
    for t in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        m = _TEMP_OWNER.search(t.name)
        if m is None or m["host"] != _host() or _alive(int(m["pid"])) or not t.is_dir():
            continue
        shutil.rmtree(t, ignore_errors=True)
        log(f"removed {t.name}: left by an export that was killed (process {m['pid']} is gone)")


def _remove_bundle(path: Path) -> None:
    """Delete a replaced bundle, its manifest first: a delete cut short never leaves a folder that
    still looks like a bundle."""
    (path / "manifest.json").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place. An old bundle at `out` is swapped with the new one in
    one atomic step where the OS can (so `out` is at every instant the whole old or the whole new
    bundle), else moved aside first and removed only after the new one is in place."""
    if out.exists() and _exchange(tmp, out):
        _remove_bundle(tmp)  # now the old bundle
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time() * 1000)}")
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError as e:
        if old is not None:
            old.rename(out)
        raise ExportError(f"cannot move the bundle into {out}: {e.strerror or e}") from None
    if old is not None:
        _remove_bundle(old)
