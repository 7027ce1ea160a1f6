"""`qks-infer` and `qks-labels`: torch-free command lines over a bundle.

Errors are one line on stderr (`qks-infer: error: ...`) and a non-zero exit, never a traceback.
qks-infer exits 0 when every image was tagged, 1 when some images became error records, 2 when the
run could not start (bad bundle, labels, backend, arguments), 130 when interrupted.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from ..engines.base import EngineError
from .backend import BACKENDS, PRECISIONS, label_device, select_backend
from .bundle import Bundle
from .infer import InferError, InferOptions, run_folder
from .labels import LabelBank, LabelError, read_label_file, save_bank
from .manifest import BundleError, sha256_file
from .preprocess import PreprocessError
from .xmp import NAMINGS

_ERRORS = (BundleError, EngineError, LabelError, InferError, PreprocessError, OSError)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qks")
    except Exception:
        return "unknown"


def _fail(prog: str, msg: str, code: int = 2):
    click.echo(f"{prog}: error: {msg}", err=True)
    sys.exit(code)


def _one_line_warnings(prog: str):
    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"{prog}: warning: {message}", err=True)

    warnings.showwarning = show


def _bank(bundle: Bundle, labels: str | None, bank: str | None, threads: int | None, provider: str = "cpu",
          progress: bool = True) -> LabelBank:
    if labels and bank:
        raise LabelError("give --labels or --bank, not both")
    if labels:
        return LabelBank.for_labels(bundle, read_label_file(labels), threads=threads, provider=provider,
                                    progress=progress)
    return LabelBank.from_bundle(bundle, bank)


def options(*decorators):
    """Apply click option decorators in the order listed (as if stacked in that order)."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


# Options shared by qks-infer and qks-ray-infer (qks.runtime.ray_tagger): same names, same meaning.
LABELS = click.option("--labels", "labels", type=click.Path(dir_okay=False), help="Label file (UTF-8, one label a "
                      "line). New labels are encoded once and cached. Default: the bundle's default bank.")
BUNDLE = click.option("--bundle", "bundle_dir", default="./bundle", show_default=True, type=click.Path(path_type=Path),
                      help="Bundle folder written by qks-export.")
BANK = click.option("--bank", help="Name of a label bank stored in the bundle (qks-labels --name).")
BACKEND = click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                       help="Inference backend; auto picks the fastest that works and says why.")
PRECISION = click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                         help="Image graph precision; auto: int8 (if exported) on the CPU, fp16 on CUDA, else fp32 "
                              "(bf16: --backend openvino).")
BATCH_SIZE = click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
THREADS = click.option("--threads", type=click.IntRange(1), help="ONNX Runtime intra-op threads (default: all cores).")
TOP_K = click.option("--top-k", type=click.IntRange(1), help="Keep the k most probable labels per image.")
THRESHOLD = click.option("--threshold", type=click.FloatRange(0, 1), help="Keep labels with probability >= this, "
                         "one value for every label. Default: the bank's per-label thresholds (qks-calibrate) if it "
                         "has them, else 0.5 unless --top-k is given.")
ALL_SCORES = click.option("--all-scores", is_flag=True, help='Write every label\'s probability: {"image", "scores"}.')
FORMAT = click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), help="Output format (default: csv if "
                      "--out ends in .csv, else jsonl).")
OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
NO_PROGRESS = click.option("--no-progress", is_flag=True, help="No progress bar.")
NO_VERIFY = click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files.")


def output_format(fmt: str | None, out: Path | None) -> str:
    """--format, else csv for an --out ending in .csv, else jsonl."""
    if fmt is not None:
        return fmt
    return "csv" if out is not None and out.suffix.lower() == ".csv" else "jsonl"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", type=click.Path(exists=True, file_okay=False, path_type=Path))
@options(LABELS, BUNDLE, BANK, BACKEND, PRECISION, BATCH_SIZE)
@click.option("--workers", type=click.IntRange(1), help="Decode threads (default: min(4, CPUs)).")
@options(THREADS, TOP_K, THRESHOLD, ALL_SCORES, FORMAT)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Output file (default: stdout). "
              "Run metadata goes to OUT.meta.json.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run: skip images already in --out.")
@click.option("--update", is_flag=True, help="OUT holds an earlier run over IMAGES: tag only images that are new "
              "or changed (size, mtime), drop records of deleted ones. OUT is replaced whole at the end.")
@click.option("--checksum", is_flag=True, help="With --update: an image is unchanged when its content (sha256) is, "
              "whatever its mtime. Needs the earlier run to have used --checksum too.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip images whose relative path, file name or a "
              "folder above matches GLOB (repeatable): --exclude '*.tmp' --exclude .thumbnails")
@click.option("--embeddings", type=click.Path(dir_okay=False, path_type=Path), help="Also write each image's "
              "L2-normalised embedding to this .npy (row order in the .json beside it), for qks-similar and qks-dupes.")
@click.option("--xmp", is_flag=True, help="Write the selected labels into an XMP sidecar beside each image "
              "(dc:subject and lr:hierarchicalSubject; merged with an existing sidecar; the image is never touched).")
@click.option("--xmp-naming", type=click.Choice(NAMINGS), default="ext", show_default=True,
              help="Sidecar name: ext = IMG.jpg.xmp (darktable, digiKam), base = IMG.xmp (Lightroom).")
@click.option("--xmp-root", default="qks|label", show_default=True, help="Root of the hierarchical keywords.")
@options(OVERWRITE, NO_PROGRESS, NO_VERIFY)
@click.option("--cuda-graph", is_flag=True, help="TensorRT: replay full batches as a captured CUDA graph.")
def _infer(images, labels, bundle_dir, bank, backend, precision, batch_size, workers, threads, top_k, threshold, all_scores,
           fmt, out, resume, update, checksum, exclude, embeddings, xmp, xmp_naming, xmp_root, overwrite, no_progress,
           no_verify, cuda_graph):
    """Tag every image under IMAGES (recursively) with label probabilities."""
    prog = "qks-infer"
    _one_line_warnings(prog)
    fmt = output_format(fmt, out)
    for flag, given in (("--resume", resume), ("--update", update)):
        if given and out is None:
            _fail(prog, f"{flag} needs --out FILE")
    if checksum and not update:
        _fail(prog, "--checksum goes with --update")
    if xmp and all_scores:
        _fail(prog, "--xmp writes the selected labels as keywords; it cannot be combined with --all-scores")
    if out is not None and out.is_file() and out.stat().st_size > 0 and not (resume or overwrite or update):
        _fail(prog, f"{out} exists: pass --resume to continue it, --update to tag what changed, "
                    "or --overwrite to replace it")
    try:
        bundle = Bundle.load(bundle_dir, verify=not no_verify)
        embedding_output = bundle.require_embedding() if embeddings is not None else None
        engine, reason = select_backend(bundle, backend, threads=threads, cuda_graph=cuda_graph,
                                        precision=precision)
        click.echo(f"{prog}: backend {reason}", err=True)
        try:  # new labels are encoded on the GPU when the images run on one
            label_bank = _bank(bundle, labels, bank, threads, label_device(engine),
                               not no_progress)
        except BaseException:
            engine.close()
            raise
        meta = {"qks": _version(), "bundle": str(bundle.root), "bundle_sha256": sha256_file(bundle.root / "manifest.json"),
                "model": bundle.manifest["model"].get("backbone"), "backend": engine.backend, "backend_reason": reason,
                "bank": label_bank.source, "bank_key": label_bank.key, "labels": len(label_bank)}
        if embeddings is not None:
            from .embeddings import embeddings_meta

            meta.update(embedding_output=embedding_output, embeddings=str(embeddings),
                        embeddings_meta=embeddings_meta(bundle, root=str(images)))
        opts = InferOptions(batch_size=batch_size, workers=workers, top_k=top_k, threshold=threshold,
                            all_scores=all_scores, fmt=fmt, resume=resume, overwrite=overwrite,
                            progress=not no_progress, exclude=tuple(exclude), update=update, checksum=checksum,
                            embeddings=embeddings, xmp=xmp_naming if xmp else None, xmp_root=xmp_root)
        with engine:
            summary = run_folder(images, engine, label_bank, bundle.preprocess, out, opts, bundle.scoring, meta)
    except KeyboardInterrupt:
        _fail(prog, "interrupted (the output holds every finished batch; continue with --resume)", 130)
    except _ERRORS as e:
        _fail(prog, str(e) or type(e).__name__)
    dest = str(out) if out else "stdout"
    done = f"{summary.skipped} unchanged, {summary.removed} removed" if update else f"{summary.skipped} already done"
    click.echo(f"{prog}: {summary.written} images tagged ({summary.errors} errors, {done}) "
               f"in {summary.seconds:.1f} s, {summary.images_per_s:.1f} images/s -> {dest}", err=True)
    sys.exit(1 if summary.errors else 0)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_dir", default="./bundle", show_default=True, type=click.Path(path_type=Path))
@click.option("--labels", "labels", required=True, type=click.Path(dir_okay=False),
              help="Label file (UTF-8, one label a line).")
@click.option("--name", required=True, help="Bank name: stored as labels/NAME.npy in the bundle.")
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime intra-op threads.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Prompts per run.")
@click.option("--device", "provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Run the label encoder on ONNX Runtime CPU or CUDA (falls back to the CPU).")
def _labels(bundle_dir, labels, name, threads, batch_size, provider):
    """Encode a label list into a label bank stored in the bundle (no re-export needed)."""
    prog = "qks-labels"
    _one_line_warnings(prog)
    try:
        bundle = Bundle.load(bundle_dir)
        names = read_label_file(labels)
        bank = LabelBank.for_labels(bundle, names, threads=threads, batch_size=batch_size, provider=provider,
                                    progress=True)
        path = save_bank(bundle, name, bank)
    except KeyboardInterrupt:
        _fail(prog, "interrupted", 130)
    except _ERRORS as e:
        _fail(prog, str(e) or type(e).__name__)
    n, d = bank.embeddings.shape
    click.echo(f"{prog}: bank {name!r}: {n} labels x {d} ({bank.source}) -> {path} (key {bank.key[:12]})", err=True)


def _main(command: click.Command, prog: str, argv: list[str] | None) -> None:
    """Run a click command with usage errors as one line (`prog: error: ...`, exit 2)."""
    try:
        command.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        _fail(prog, "interrupted", 130)
    except click.ClickException as e:
        _fail(prog, f"{e.format_message()} (see {prog} --help)", 2)


def infer_main(argv: list[str] | None = None) -> None:
    _main(_infer, "qks-infer", argv)


def labels_main(argv: list[str] | None = None) -> None:
    _main(_labels, "qks-labels", argv)
