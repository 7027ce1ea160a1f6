"""`qks-calibrate`: fit per-label thresholds for a label bank on a small labelled sample.

    qks-calibrate --bundle B --data labelled.jsonl [--bank NAME | --labels FILE --name NAME]
                  [--target f1|precision=0.9] [--min-positives 5]

The sample is a JSONL manifest as qks-train reads it (qks/data.py): `{"image": path, "labels": [...],
"negatives": [...], "unknown": [...], "unlisted": "negative" | "unknown"}` a line, a relative path
resolved against the manifest's folder. Its images are scored as qks-infer scores them (the
bundle's image graph through `select_backend`, runtime.scoring), the rule of runtime/thresholds.py
fits one threshold per label, and the result is stored beside the bank (labels/NAME.thresholds.json,
hashed in the manifest). With --labels FILE --name NAME the list is encoded (or found) and stored as
bank NAME first: a label list that is not a stored bank has no thresholds.

Bad manifest lines are one-line errors (the first few, with their line numbers), or dropped and
counted with --skip-bad; an image that cannot be decoded is skipped and reported. Exit 0 when the
thresholds were stored, 2 when the run could not start or finish, 130 when interrupted.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import click
import numpy as np

from qks.manifest_lines import Sample, parse_line

from ..engines.base import EngineError
from .backend import BACKENDS, PRECISIONS, select_backend
from .bundle import Bundle
from .cli import _fail, _main, _one_line_warnings
from .infer import RecordBuilder, _batches
from .labels import (
    LabelBank,
    LabelError,
    LabelWarning,
    _atomic_save,
    drop_thresholds,
    read_label_file,
    save_bank,
)
from .manifest import BundleError, file_record, read_manifest, sha256_file, write_manifest
from .preprocess import PreprocessError
from .thresholds import DEFAULT_MIN_POSITIVES, CalibrationError, StaleThresholds, Target, document, dumps, fit

PROG = "qks-calibrate"
MAX_SHOWN = 5  # problems or labels named in one message before "... and N more"
_ERRORS = (BundleError, EngineError, LabelError, CalibrationError, PreprocessError, OSError)


# -- the labelled sample -------------------------------------------------------------------------

def read_samples(path: Path, skip_bad: bool = False) -> tuple[list[Sample], list[str]]:
    """The manifest's samples and the problems of its bad lines (an error unless skip_bad)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CalibrationError(f"--data {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"--data {path}: cannot read it ({type(e).__name__})") from None
    root = os.path.normpath(os.path.abspath(path.parent))
    samples, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                samples.append(parse_line(line, root, None, n))
            except ValueError as e:
                problems.append(f"{path}:{n}: {e}")
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more bad line(s))" if len(problems) > 1 else ""
        raise CalibrationError(f"{problems[0]}{more}; fix the manifest or pass --skip-bad")
    if not samples:
        raise CalibrationError(f"--data {path}: no labelled images")
    return samples, problems


def target_matrix(samples: list[Sample], names: list[str]) -> tuple[np.ndarray, set[str]]:
    """int8 [N, L] targets over the bank's labels, and the data's labels that are not in the bank."""
    index = {n: j for j, n in enumerate(names)}
    out = np.stack([s.targets(index) for s in samples])
    unknown = {n for s in samples for n in s.positives + s.negatives + s.unknown if n not in index}
    return out, unknown


# -- scoring the sample --------------------------------------------------------------------------

def score_samples(engine, bank: LabelBank, bundle: Bundle, samples: list[Sample], batch_size: int, workers: int,
                  progress: bool) -> tuple[np.ndarray, list[int], list[str]]:
    """Probabilities [kept, L] as qks-infer computes them (its RecordBuilder, its decode-ahead batches), the
    kept samples' indices, and one problem a skipped image (undecodable, or a non-finite model output)."""
    build = RecordBuilder(engine, bank, bundle.scoring)
    batch_size = min(batch_size, getattr(engine, "max_batch", None) or batch_size)
    probs, kept, problems = [], [], []
    start = 0
    for items in _batches(None, [str(s.path) for s in samples], bundle.preprocess, batch_size, workers, progress):
        scored, errors = build.probabilities(items)
        probs += [scored[i] for i in sorted(scored)]
        kept += [start + i for i in sorted(scored)]
        problems += [f"{samples[start + i].image}: {err}" for i, err in sorted(errors.items())]
        start += len(items)
    if not kept:
        raise CalibrationError(f"none of the {len(samples)} images could be scored (first: {problems[0]})")
    return np.stack(probs).astype(np.float32), kept, problems


# -- storing -------------------------------------------------------------------------------------

def load_bundle(bundle_dir: Path, verify: bool, dry_run: bool) -> Bundle:
    """Bundle.load, after dropping, with a warning, thresholds fitted for another version of their bank (the
    refusal whose fix is rerunning qks-calibrate); with --dry-run, which changes nothing, that refusal stands."""
    while True:
        try:
            return Bundle.load(bundle_dir, verify=verify)
        except StaleThresholds as e:
            if dry_run:
                raise BundleError(f"{e} (--dry-run changes nothing: run without it to replace them)") from None
            manifest = read_manifest(bundle_dir)
            if not drop_thresholds(bundle_dir, manifest, e.bank):
                raise
            write_manifest(bundle_dir, manifest)
            warnings.warn(f"label bank {e.bank!r}: dropped the thresholds fitted for another version of it",
                          LabelWarning, stacklevel=2)


def store(bundle: Bundle, name: str, doc: dict) -> Path:
    """Write labels/NAME.thresholds.json and name it in the bank's manifest record (hashed in "files")."""
    rel = f"labels/{name}.thresholds.json"
    try:
        _atomic_save(bundle.file(rel), dumps(doc))
        m = bundle.manifest
        m["files"][rel] = file_record(bundle.root, rel)
        m["label_banks"][name]["thresholds_file"] = rel
        write_manifest(bundle.root, m)
    except OSError as e:
        raise BundleError(f"cannot write to the bundle {bundle.root}: {e.strerror or e}") from None
    return bundle.file(rel)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_SHOWN])
    return shown + (f" ... and {len(items) - MAX_SHOWN} more" if len(items) > MAX_SHOWN else "")


def summary(fitted, doc: dict, kept: int, skipped: int, extra: set[str], path: Path | None) -> list[str]:
    fallback = fitted.fallback_labels
    lines = [f"{kept} images scored ({skipped} skipped), {len(fitted.thresholds)} labels, target {doc['rule']}"
             + (f"={doc['target']:g}" if doc["target"] is not None else "")
             + f": {len(fitted.thresholds) - len(fallback)} fitted per label, {len(fallback)} on the global threshold "
             f"{doc['global_threshold']:.4f}"]
    if fallback:
        whys = sorted({r["why"] for r in fitted.per_label if r["fallback"]})
        lines.append(f"global threshold for {len(fallback)} label(s) ({'; '.join(whys)}): {_listing(fallback)}")
    raised = [r["name"] for r in fitted.per_label if "raised_from" in r]
    if raised:
        lines.append(f"--floor-at-global raised {len(raised)} fitted threshold(s) to the global one: {_listing(raised)}")
    if extra:
        lines.append(f"{len(extra)} label(s) of the data are not in the bank and were ignored: {_listing(sorted(extra))}")
    lines.append(f"thresholds stored in {path}" if path else "--dry-run: nothing stored")
    return lines


# -- the command ---------------------------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_dir", default="./bundle", show_default=True, type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Labelled sample: a JSONL manifest (image + labels a line), as qks-train reads.")
@click.option("--bank", help="Stored label bank to calibrate (default: the bundle's default bank).")
@click.option("--labels", "labels", type=click.Path(dir_okay=False),
              help="Or a label file, stored as bank --name first (thresholds belong to a stored bank).")
@click.option("--name", help="With --labels: the bank name to store it as.")
@click.option("--target", "target_text", default="f1", show_default=True,
              help="f1: the F1-optimal threshold per label; precision=P: the lowest threshold reaching precision P.")
@click.option("--min-positives", type=click.IntRange(1), default=DEFAULT_MIN_POSITIVES, show_default=True,
              help="Labels with fewer positives in the sample use the global threshold (best for the whole sample).")
@click.option("--floor-at-global", is_flag=True,
              help="No label's threshold below the global one (labels the model cannot rank otherwise fit low "
                   "thresholds that tag nearly every image; see benchmarks/RESULTS.md).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Image graph precision; calibrate with the one you tag with.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=min(4, os.cpu_count() or 1), help="Decode threads.")
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--skip-bad", is_flag=True, help="Drop bad manifest lines (counted) instead of stopping.")
@click.option("--dry-run", is_flag=True, help="Fit and report, store nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files.")
def _calibrate(bundle_dir, data, bank, labels, name, target_text, min_positives, floor_at_global, backend, precision,
               batch_size, workers, threads, skip_bad, dry_run, no_progress, no_verify):
    """Fit one threshold per label of a label bank on a labelled sample and store them with the bank."""
    _one_line_warnings(PROG)
    try:
        target = Target.parse(target_text)
        if labels and bank:
            raise LabelError("give --labels or --bank, not both")
        if labels and not name:
            raise LabelError("--labels needs --name NAME: thresholds are stored with a named bank in the bundle")
        if name and not labels:
            raise LabelError("--name goes with --labels (to calibrate a stored bank, pass --bank NAME)")
        samples, bad_lines = read_samples(data, skip_bad)
        bundle = load_bundle(bundle_dir, not no_verify, dry_run)
        if labels:
            label_bank = LabelBank.for_labels(bundle, read_label_file(labels), threads=threads,
                                              progress=not no_progress)
            if not dry_run:
                save_bank(bundle, name, label_bank)
        else:
            name = bank or bundle.default_bank()
            label_bank = LabelBank.from_bundle(bundle, name)
        targets, extra = target_matrix(samples, label_bank.names)
        engine, reason = select_backend(bundle, backend, threads=threads, precision=precision)
        click.echo(f"{PROG}: backend {reason}", err=True)
        with engine:
            t0 = time.perf_counter()
            probs, kept, problems = score_samples(engine, label_bank, bundle, samples, batch_size, workers,
                                                  not no_progress)
        fitted = fit(probs, targets[kept], label_bank.names, target, min_positives, floor_at_global)
        doc = document(fitted, bank=name, bank_key=label_bank.key, target=target, min_positives=min_positives,
                       floor_at_global=floor_at_global,
                       data={"file": data.name, "sha256": sha256_file(data), "images": len(kept),
                             "skipped": len(problems) + len(bad_lines), "seconds": round(time.perf_counter() - t0, 1)},
                       created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        path = None if dry_run else store(bundle, name, doc)
    except KeyboardInterrupt:
        _fail(PROG, "interrupted (nothing stored)", 130)
    except _ERRORS as e:
        _fail(PROG, str(e) or type(e).__name__)
    for p in (bad_lines + problems)[:MAX_SHOWN]:
        click.echo(f"{PROG}: skipped {p}", err=True)
    for line in summary(fitted, doc, len(kept), len(problems) + len(bad_lines), extra, path):
        click.echo(f"{PROG}: {line}", err=True)


def main(argv: list[str] | None = None) -> None:
    _main(_calibrate, PROG, argv)
