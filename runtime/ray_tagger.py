"""Tag images through Ray Data: `QksTagger` for `ds.map_batches`, and the `qks-ray-infer` command.

`QksTagger` is a callable class for Ray Data's actor pools:

    import ray
    from qks.runtime.ray_tagger import QksTagger

    ds = ray.data.from_items([{"path": p} for p in paths])
    ds = ds.map_batches(QksTagger, fn_constructor_kwargs={"bundle": "/models/bundle", "labels": "labels.txt",
                                                          "top_k": 5},
                        compute=ray.data.ActorPoolStrategy(size=4), batch_size=16)   # or concurrency=4

Each worker loads the bundle, the engine (`select_backend`) and the label bank once, in the
constructor; each call takes a batch with a `path` column (str, or bytes for file names that are not
UTF-8; relative to `root` when given) and returns one row per input row: the input columns, plus

    image          the name as qks-infer writes it (the path as given, valid UTF-8)
    labels         list of label names: the selected ones, most probable first (all of them, in
                   bank order, with all_scores)
    probabilities  list of their probabilities, rounded as qks-infer rounds them
    error          None, or why the image has no labels (unreadable, missing, non-finite output)
    record         qks-infer's JSONL record for this image, as one line of JSON text

Records are made by the same code as qks-infer's (`qks.runtime.infer.RecordBuilder`), so the
same images in the same batches give the same records, byte for byte; a broken image becomes an
error row, never a failed batch. Plain columns instead of per-row dicts because Arrow blocks
cannot hold a dict whose keys change from row to row (they would become a struct with every label
and nulls); the `record` column carries the exact qks-infer form.

`qks-ray-infer IMAGES` (IMAGES: a folder, found and named as qks-infer does, or a text file of
image paths, one a line) runs the same over Ray and writes the file qks-infer writes (JSONL or
CSV), in the same order; see `qks-ray-infer --help`. Results equal qks-infer's when the batches
are the same, which the command arranges: it cuts the images into blocks of --batch-size in
qks-infer's order, so each Ray batch is one of qks-infer's (int8 graphs quantize activations per
batch, so there the batch is part of the result).

Torch-free, and importable without Ray: `ray` is imported only by the command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

from . import cli
from .backend import select_backend
from .bundle import Bundle
from .infer import (
    InferError,
    RecordBuilder,
    _Writer,
    decode_image,
    display_name,
    find_images,
    jsonl_line,
    public_record,
)
from .labels import LabelBank, LabelError, read_label_file

PROG = "qks-ray-infer"
OUTPUT_COLUMNS = ("image", "labels", "probabilities", "error", "record")


class QksTagger:
    """Ray Data batch tagger: `ds.map_batches(QksTagger, fn_constructor_kwargs={...}, ...)`.

    bundle: the bundle folder. labels: None (the bundle's bank, or `bank`), a list of label names,
    or a label file path; new labels are encoded once and cached (or pass a computed `LabelBank`
    as `bank` so workers encode nothing). bank: a bank name stored in the bundle, or a `LabelBank`.
    top_k / threshold / all_scores: as qks-infer's options. backend / precision / threads: as
    qks-infer's (threads: ONNX Runtime intra-op threads per worker). root: folder that relative
    paths are taken from (default: the worker's current folder). decode_threads: images decoded
    in parallel within a batch (default min(4, CPUs)). verify: check the bundle's sha256s.
    """

    def __init__(self, bundle: str | os.PathLike, labels=None, bank=None, top_k: int | None = None,
                 threshold: float | None = None, all_scores: bool = False, precision: str = "auto",
                 threads: int | None = None, root: str | os.PathLike | None = None, backend: str = "auto",
                 decode_threads: int | None = None, verify: bool = True):
        self.bundle = Bundle.load(bundle, verify=verify)
        self.root = Path(root) if root is not None else None
        label_bank = load_bank(self.bundle, labels, bank, threads)
        self.engine, self.backend_reason = select_backend(self.bundle, backend, threads=threads, precision=precision)
        self.build = RecordBuilder(self.engine, label_bank, self.bundle.scoring, top_k=top_k, threshold=threshold,
                                   all_scores=all_scores)
        self.label_bank = label_bank
        self._pool = ThreadPoolExecutor(max_workers=decode_threads or min(4, os.cpu_count() or 1),
                                        thread_name_prefix="qks-decode")

    def tag(self, paths) -> list[dict]:
        """qks-infer records (before `public_record`) for these paths, in order."""
        rels = [os.fsdecode(p) if isinstance(p, bytes | bytearray) else str(p) for p in paths]
        pp = self.bundle.preprocess
        items = list(self._pool.map(lambda rel: decode_image(self.root, rel, pp), rels))
        return self.build(items)

    def __call__(self, batch) -> dict:
        if not isinstance(batch, Mapping):  # a pandas DataFrame (batch_format="pandas")
            batch = {c: batch[c].to_numpy() for c in batch.columns}
        if "path" not in batch:
            raise KeyError(f"QksTagger needs a 'path' column; the batch has {sorted(batch)}")
        records = [public_record(r) for r in self.tag(batch["path"])]
        out = dict(batch)
        rows = {c: [] for c in OUTPUT_COLUMNS}
        for r in records:
            chosen = r.get("scores", r.get("labels", {}))
            rows["image"].append(r["image"])
            rows["labels"].append(list(chosen))
            rows["probabilities"].append(list(chosen.values()))
            rows["error"].append(r.get("error"))
            rows["record"].append(jsonl_line(r))
        for c in OUTPUT_COLUMNS:
            col = np.empty(len(records), dtype=object)
            col[:] = rows[c]
            out[c] = col
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.engine.close()


def load_bank(bundle: Bundle, labels=None, bank=None, threads: int | None = None, progress: bool = False) -> LabelBank:
    """The label bank a QksTagger or qks-ray-infer uses (see QksTagger)."""
    if isinstance(bank, LabelBank):
        if labels is not None:
            raise LabelError("give labels or bank, not both")
        return bank
    if labels is not None and bank is not None:
        raise LabelError("give --labels or --bank, not both")
    if labels is None:
        return LabelBank.from_bundle(bundle, bank)
    names = read_label_file(labels) if isinstance(labels, str | os.PathLike) else list(labels)
    return LabelBank.for_labels(bundle, names, threads=threads, progress=progress)


# -- the command ------------------------------------------------------------------------------------

def read_image_list(path: Path) -> list[str]:
    """A text file of image paths, one a line, kept as written and in the file's order (blank lines
    skipped, surrounding spaces cut off). UTF-8; other bytes are taken as file-name bytes."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InferError(f"cannot read image list {path}: {e.strerror or e}") from None
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    return [line.strip() for line in text.splitlines() if line.strip()]


def list_inputs(images: Path, root: Path | None) -> tuple[list[str], Path]:
    """(image names as records carry them, the folder they are relative to)."""
    if images.is_dir():
        if root is not None:
            raise InferError("--root is for an image list; a folder's images are named relative to it")
        names, base = find_images(images), images
        what = f"no images under {display_name(str(images))}"
    elif images.is_file():
        names, base = read_image_list(images), (root or Path.cwd())
        what = f"no image paths in {display_name(str(images))}"
    else:
        raise InferError(f"image folder or list not found: {display_name(str(images))}")
    if not names:
        raise InferError(what)
    return names, base.resolve()


def cli_error(e: BaseException) -> str:
    """One line for an error, also one raised in a Ray worker: the first qks error among its causes
    ("" if none is)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, cli._ERRORS):
            return str(e) or type(e).__name__
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return ""


def last_line(e: BaseException) -> str:
    """The gist of a Ray error whose text is a worker's traceback: its last line, without the
    exception's class name when that is one of qks's own errors."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    name, sep, rest = lines[-1].partition(": ")
    known = {t.__name__ for t in cli._ERRORS}
    return rest if sep and name.rsplit(".", 1)[-1] in known else lines[-1]


def check_backend(bundle: Bundle, backend: str, precision: str, threads: int | None, local: bool) -> None:
    """Fail here, before Ray starts, for a backend or precision the workers could not use. A local
    run opens the engine once (its workers are on this machine) and says which backend it picked,
    as qks-infer does; a cluster's workers may have what this machine lacks (GPUs, TensorRT), so
    there only the precision is checked against the bundle."""
    if local:
        engine, reason = select_backend(bundle, backend, threads=threads, precision=precision)
        engine.close()
        click.echo(f"{PROG}: backend {reason}", err=True)
    else:
        from .backend import check_precision

        check_precision(bundle, backend, precision)


def image_dataset(ray, names: list[str], batch_size: int):
    """A Ray dataset of `{"path": bytes, "qks_index": int}` rows whose blocks are qks-infer's batches:
    blocks of exactly `batch_size` rows, the last one padded with empty paths (index >= len(names);
    each becomes a cheap "is a directory" error that the caller drops), so every Ray batch of
    `batch_size` holds the images of one qks-infer batch and the engine sees the same inputs."""
    n_blocks = -(-len(names) // batch_size)
    rows = [{"path": os.fsencode(n), "qks_index": i} for i, n in enumerate(names)]
    rows += [{"path": b"", "qks_index": i} for i in range(len(names), n_blocks * batch_size)]
    return ray.data.from_items(rows, override_num_blocks=n_blocks)


def _start_ray(address: str, num_cpus: int | None, run: _Run):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data  # noqa: F401 - ray.data is a subpackage
    except ImportError:
        raise InferError("Ray Data is not installed: pip install 'qks[ray]'") from None
    run.ray = ray
    if ray.is_initialized():  # a caller's Ray (ray.init before main()): used, and left running
        return ray
    run.started_ray = True
    # Workers' output stays in Ray's session logs: a failing worker's traceback (and Ray's retries of
    # it) would otherwise bury the one-line error this command gives for it.
    if address == "local":
        # a cluster of this process only: its notice that it enabled token authentication is noise
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    else:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    return ray


def _command():
    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("images", type=click.Path(path_type=Path))
    @cli.options(cli.LABELS, cli.BUNDLE, cli.BANK, cli.BACKEND, cli.PRECISION, cli.BATCH_SIZE, cli.THREADS, cli.TOP_K,
                 cli.THRESHOLD, cli.ALL_SCORES, cli.FORMAT)
    @click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path),
                  help="Output file (default: stdout); written as OUT.partial and renamed when complete.")
    @cli.options(cli.OVERWRITE, cli.NO_PROGRESS, cli.NO_VERIFY)
    @click.option("--concurrency", type=click.IntRange(1), default=1, show_default=True,
                  help="Tagger workers (Ray actors), each with its own engine.")
    @click.option("--num-gpus", type=click.FloatRange(0), default=0, show_default=True,
                  help="GPUs Ray reserves per worker (1 to run each worker on its own GPU).")
    @click.option("--root", type=click.Path(file_okay=False, path_type=Path),
                  help="Folder that relative paths in an image list are taken from (default: the current folder).")
    @click.option("--address", default=lambda: os.environ.get("RAY_ADDRESS") or "local",
                  show_default="$RAY_ADDRESS, else local",
                  help="Ray cluster to use: auto (the running one), local (start one here), or HOST:PORT.")
    @click.option("--num-cpus", type=click.IntRange(1), help="CPUs of a local Ray (default: all).")
    def command(images, labels, bundle_dir, bank, backend, precision, batch_size, threads, top_k, threshold,
                all_scores, fmt, out, overwrite, no_progress, no_verify, concurrency, num_gpus, root, address, num_cpus):
        """Tag the images under IMAGES (a folder, as qks-infer does) or listed in IMAGES (a text file, one
        path a line) through Ray Data, and write what qks-infer writes."""
        run_command(images, labels=labels, bundle_dir=bundle_dir, bank=bank, backend=backend, precision=precision,
                    batch_size=batch_size, threads=threads, top_k=top_k, threshold=threshold, all_scores=all_scores,
                    fmt=fmt, out=out, overwrite=overwrite, progress=not no_progress, verify=not no_verify,
                    concurrency=concurrency, num_gpus=num_gpus, root=root, address=address, num_cpus=num_cpus)

    return command


def run_command(images: Path, *, labels, bundle_dir, bank, backend, precision, batch_size, threads, top_k, threshold,
                all_scores, fmt, out, overwrite, progress, verify, concurrency, num_gpus, root, address, num_cpus):
    cli._one_line_warnings(PROG)
    fmt = cli.output_format(fmt, out)
    if out is not None and str(out) == "-":
        out = None
    if out is not None and out.is_file() and out.stat().st_size > 0 and not overwrite:
        cli._fail(PROG, f"{out} exists: pass --overwrite to replace it")
    if address != "local" and num_cpus is not None:
        cli._fail(PROG, "--num-cpus is for a local Ray (--address local); a cluster has its own")
    partial = out.with_name(out.name + ".partial") if out is not None else None
    run = _Run()
    start = time.perf_counter()
    try:
        names, base = list_inputs(images, root)
        bundle = Bundle.load(bundle_dir, verify=verify)
        check_backend(bundle, backend, precision, threads, local=address == "local")
        # the bank is encoded (or found in the cache) once, here, and shipped to every worker
        label_bank = cli._bank(bundle, labels, bank, threads, "cpu", progress)
        tagger_kwargs = dict(bundle=str(bundle.root), bank=label_bank, top_k=top_k, threshold=threshold,
                             all_scores=all_scores, precision=precision, threads=threads, root=str(base),
                             backend=backend, verify=verify)
        writer = _Writer(partial, fmt, label_bank.names, all_scores, append=False)
        run.output = partial
        # Ray prints its messages (a failing worker's traceback and its retries among them) to the
        # driver's stdout, where the records may go: they go to a log, shown or named at the end
        run.ray_log = tempfile.NamedTemporaryFile("w+", prefix="qks-ray-infer-", suffix=".log", encoding="utf-8",
                                                  delete=False)
        with contextlib.redirect_stdout(run.ray_log):
            try:
                ray = _start_ray(address, num_cpus, run)
                _tag(ray, names, batch_size, concurrency, num_gpus, tagger_kwargs, writer, run, progress)
            finally:
                writer.close()
                if run.started_ray:
                    ray_shutdown(run.ray)
        if run.written != len(names):
            raise InferError(f"Ray returned {run.written} of {len(names)} records")
        if partial is not None:
            os.replace(partial, out)
        run.show_ray_log()
    except KeyboardInterrupt:
        cli._fail(PROG, "interrupted" + run.kept(), 130)
    except Exception as e:
        msg = cli_error(e)
        if not msg:
            if run.ray is None or not isinstance(e, run.ray.exceptions.RayError):
                raise
            msg = last_line(e)
        cli._fail(PROG, msg + run.kept())
    seconds = time.perf_counter() - start
    click.echo(f"{PROG}: {run.written} images tagged ({run.errors} errors) in {seconds:.1f} s, "
               f"{run.written / seconds if seconds > 0 else 0.0:.1f} images/s -> {out or 'stdout'}", err=True)
    sys.exit(1 if run.errors else 0)


class _Run:
    """What a qks-ray-infer run has done so far."""

    def __init__(self):
        self.ray = None
        self.started_ray = False
        self.output: Path | None = None  # the .partial file this run writes
        self.written = self.errors = 0
        self.ray_log = None  # what Ray printed to stdout during the run

    def kept(self) -> str:
        """On a failed run: keep OUT.partial when it holds records, and Ray's messages when there are
        any, and say where; remove what is empty."""
        notes = []
        if self.output is not None and self.output.exists():
            if self.written:
                notes.append(f"the {self.written} finished records are in {self.output}")
            else:
                self.output.unlink(missing_ok=True)
        if self.ray_log is not None:
            self.ray_log.close()
            path = Path(self.ray_log.name)
            if path.stat().st_size:
                notes.append(f"Ray's messages are in {path}")
            else:
                path.unlink(missing_ok=True)
        return f" ({'; '.join(notes)})" if notes else ""

    def show_ray_log(self) -> None:
        """After a run that worked: Ray's messages (warnings, if any) to stderr; the log removed."""
        if self.ray_log is None:
            return
        self.ray_log.seek(0)
        text = self.ray_log.read()
        self.ray_log.close()
        Path(self.ray_log.name).unlink(missing_ok=True)
        if text.strip():
            sys.stderr.write(text if text.endswith("\n") else text + "\n")


def _tag(ray, names, batch_size, concurrency, num_gpus, tagger_kwargs, writer, run: _Run, progress: bool) -> None:
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # this command draws its own (images, not blocks)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    # a worker that fails to start is reported as one line (run_command); not as Ray's stack traces too
    for name in ("ray.data.exceptions", "ray.data._internal.execution.operators.actor_pool_map_operator"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    ds = image_dataset(ray, names, batch_size)
    ds = ds.map_batches(QksTagger, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=min(concurrency, -(-len(names) // batch_size))),
                        num_gpus=num_gpus or None,
                        fn_constructor_kwargs=tagger_kwargs)
    waiting: dict[int, dict] = {}  # records that came early (Ray keeps the order; this does not rely on it)
    with tqdm(total=len(names), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, rec in zip(batch["qks_index"].tolist(), batch["record"], strict=True):
                if i < len(names):  # not padding
                    waiting[int(i)] = json.loads(rec)
            ready = []
            while run.written + len(ready) in waiting:
                ready.append(waiting.pop(run.written + len(ready)))
            if ready:
                writer.write(ready)
                run.written += len(ready)
                run.errors += sum("error" in r for r in ready)
                bar.update(len(ready))


def ray_shutdown(ray) -> None:
    with contextlib.suppress(Exception):
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    cli._main(_command(), PROG, argv)


__all__ = ["OUTPUT_COLUMNS", "QksTagger", "image_dataset", "list_inputs", "load_bank", "main", "read_image_list"]
