"""The folder runner behind `qks-infer`: images -> label probabilities, JSONL or CSV.

- Finds images under a folder recursively (by extension, case-insensitive), in sorted order of
  their POSIX paths relative to the folder. Symlinked folders are followed once (a folder already
  visited through another path is skipped, so link cycles end); a link to a missing file is listed
  and becomes an error record; FIFOs and devices are skipped.
- Decodes and preprocesses in worker threads while the engine runs (a bounded window of pending
  images keeps memory flat), batches, scores, writes. Records keep the input order.
- JSONL, one record per image:
    {"image": "a/b.jpg", "labels": {"cat": 0.93, "dog": 0.61}}     # selected labels, most likely first
    {"image": "a/b.jpg", "scores": {"cat": 0.93, ...}}              # --all-scores: every label
    {"image": "a/c.jpg", "error": "not a readable image (unidentified format)"}
  CSV: `image,label,probability,error`, one row per selected label (one row with empty label if
  none, or with the error); with --all-scores `image,<label 1>,...,<label L>,error`.
- Non-finite model outputs become error records; they are never written as scores.
- A file name that is not valid UTF-8 (Linux names are bytes) is written with each undecodable
  byte as a backslash escape, `caf\\xe9.jpg` for the bytes `caf\xe9.jpg` (Python's
  `os.fsencode(name).decode("utf-8", "backslashreplace")`), so the output stays valid UTF-8 that any
  JSON or CSV reader takes; `--resume` compares names the same way.
- A folder without images gives an empty output and a warning, not an error.
- Output is flushed after every batch, so an interrupted run leaves whole records plus at most a
  partial last line, which `resume` cuts off before continuing; records already there are skipped.
- `<out>.meta.json` beside the output records the bundle, the backend and why it was chosen, the
  label bank, the options and the counts (written at the start, updated at the end).
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .preprocess import Preprocess, PreprocessError
from .scoring import logits as score_logits
from .scoring import select, sigmoid

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico"})
META_SUFFIX = ".meta.json"


class InferError(RuntimeError):
    """A run that cannot start or continue; one line."""


def find_images(root: str | Path) -> list[str]:
    """Image files under `root`, as sorted POSIX paths relative to it."""
    root = Path(root)
    if not root.is_dir():
        raise InferError(f"image folder not found: {root}")
    found, seen_dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:  # a link back into a visited folder: do not walk it again
            dirnames[:] = []
            continue
        seen_dirs.add(ident)
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                if not stat.S_ISREG(os.stat(os.path.join(dirpath, name)).st_mode):
                    continue  # a FIFO or device named like an image would block or mislead the decoder
            except OSError:
                pass  # a broken link: listed, and reported as that image's error
            found.append((rel_dir / name).as_posix())
    return sorted(found)


@dataclass
class InferOptions:
    batch_size: int = 16
    workers: int | None = None  # decode threads (None: min(4, CPUs))
    top_k: int | None = None
    threshold: float | None = None  # None with top_k None means 0.5
    all_scores: bool = False
    fmt: str = "jsonl"  # "jsonl" | "csv"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


@dataclass
class RunSummary:
    total: int = 0  # images found
    skipped: int = 0  # already in the output (--resume)
    written: int = 0  # records written this run
    errors: int = 0  # error records written this run
    seconds: float = 0.0
    images_per_s: float = 0.0
    meta: dict = field(default_factory=dict)


def display_name(name: str) -> str:
    """A path as written in records: valid UTF-8, undecodable file-name bytes as `\\xNN` escapes."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def _fmt(p: float) -> float:
    return float(f"{p:.7g}")


def effective_threshold(top_k: int | None, threshold: float | None) -> float | None:
    """The threshold a run applies: the given one, else 0.5 unless --top-k is given."""
    return threshold if (threshold is not None or top_k is not None) else 0.5


def public_record(record: dict) -> dict:
    """A record as written: its image name and error text as valid UTF-8 (see `display_name`)."""
    return dict(record, image=display_name(record["image"]),
                **({"error": display_name(record["error"])} if "error" in record else {}))


def jsonl_line(record: dict) -> str:
    """One JSONL line (without the newline) of a record that went through `public_record`."""
    return json.dumps(record, ensure_ascii=False)


class RecordBuilder:
    """Decoded images (or their decode errors) -> qks-infer records, through the engine and a label bank.

    The one place records are made: `run_folder` (qks-infer) and the Ray tagger
    (`qks.runtime.ray_tagger.QksTagger`) both call it, so their records are the same for the same
    batches. `items` are `decode_image` results, `(name, pixels or None, error or None)`; each
    gives one record, in order: `{"image", "labels"}` (selected labels, most likely first),
    `{"image", "scores"}` (`all_scores`: every label, bank order) or `{"image", "error"}`.
    Probabilities are rounded to 7 significant digits; non-finite model outputs become errors."""

    def __init__(self, engine, bank, scoring: tuple[str, int] = ("max", 1), *, top_k: int | None = None,
                 threshold: float | None = None, all_scores: bool = False):
        self.engine = engine
        self.names = list(bank.names)
        self.embeddings = np.ascontiguousarray(bank.embeddings, dtype=np.float32)
        self.mode, self.k = scoring
        self.top_k, self.threshold, self.all_scores = top_k, effective_threshold(top_k, threshold), all_scores
        self.in_name = engine.inputs[0].name
        self.out_name = engine.outputs[0].name
        self.max_batch = getattr(engine, "max_batch", None)

    def _query_features(self, pixels: np.ndarray) -> np.ndarray:
        step = self.max_batch or len(pixels)
        outs = [self.engine.run({self.in_name: pixels[i:i + step]})[self.out_name] for i in range(0, len(pixels), step)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def __call__(self, items: list[tuple]) -> list[dict]:
        pixels = [arr for _rel, arr, _err in items if arr is not None]
        return self.records(items, self._query_features(np.stack(pixels)) if pixels else None)

    def records(self, items: list[tuple], qf: np.ndarray | None) -> list[dict]:
        """The records of `items` from the query features of their decoded images (in order; None when
        none decoded), computed elsewhere: qks-serve runs one engine batch for many requests."""
        ok = [i for i, (_rel, arr, _err) in enumerate(items) if arr is not None]
        probs, bad = {}, set()
        if ok:
            lg = score_logits(qf, self.embeddings, self.mode, self.k)
            # inf logits would become probabilities 0/1: test the raw outputs, not the sigmoid
            finite = np.isfinite(qf.reshape(len(ok), -1)).all(axis=1) & np.isfinite(lg).all(axis=1)
            probs = dict(zip(ok, sigmoid(lg), strict=True))
            bad = {ok[j] for j in np.flatnonzero(~finite)}
        records = []
        for i, (rel, _arr, err) in enumerate(items):
            if err is None and i in bad:
                err = "model output is not finite (NaN or inf)"
            if err is not None:
                records.append({"image": rel, "error": err})
            elif self.all_scores:
                scores = {n: _fmt(v) for n, v in zip(self.names, probs[i].tolist(), strict=True)}
                records.append({"image": rel, "scores": scores})
            else:
                chosen = select(probs[i], self.names, self.top_k, self.threshold)
                records.append({"image": rel, "labels": {n: _fmt(v) for n, v in chosen}})
        return records


class _Writer:
    """Appends records to a file (or stdout) in JSONL or CSV, flushed per batch."""

    def __init__(self, out: Path | None, fmt: str, names: list[str], all_scores: bool, append: bool):
        self.fmt, self.names, self.all_scores = fmt, names, all_scores
        self.header = (["image", *names, "error"] if all_scores else ["image", "label", "probability", "error"])
        if out is None:
            self.f = sys.stdout
            self._close = False
        else:
            self.f = open(out, "a" if append else "w", encoding="utf-8", newline="")
            self._close = True
        if fmt == "csv" and (not append or self.f.tell() == 0):
            self._csv_rows([self.header])

    def _csv_rows(self, rows):
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        self.f.write(buf.getvalue())

    def write(self, records: list[dict]) -> None:
        records = [public_record(r) for r in records]
        if self.fmt == "jsonl":
            self.f.write("".join(jsonl_line(r) + "\n" for r in records))
        else:
            rows = []
            for r in records:
                if "error" in r:
                    rows.append([r["image"], *([""] * (len(self.header) - 2)), r["error"]])
                elif self.all_scores:
                    rows.append([r["image"], *(r["scores"][n] for n in self.names), ""])
                elif r["labels"]:
                    rows.extend([r["image"], n, p, ""] for n, p in r["labels"].items())
                else:
                    rows.append([r["image"], "", "", ""])
            self._csv_rows(rows)
        self.f.flush()

    def close(self) -> None:
        if self._close:
            self.f.close()


def _repair_tail(path: Path) -> bytes:
    """Cut a partial last line (an interrupted write) off the file; return the whole lines."""
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut != len(data):
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    return data


def done_images(out: Path, fmt: str, header: list[str]) -> set[str]:
    """Images already recorded in `out` (repairing a partial last line first)."""
    data = _repair_tail(out)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InferError(f"{out}: not UTF-8; not resuming into it") from None
    done = set()
    if fmt == "jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                done.add(rec["image"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InferError(f"{out}: line {i} is not a qks-infer record; not resuming into it") from None
        return done
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise InferError(f"{out}: not a valid CSV ({e}); not resuming into it") from None
    if rows and rows[0] != header:
        raise InferError(f"{out}: its CSV columns differ from this run's (other labels or --all-scores?); "
                         "not resuming into it")
    return {r[0] for r in rows[1:] if r}


def _write_meta(path: Path | None, meta: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    meta = {k: display_name(v) if isinstance(v, str) else v for k, v in meta.items()}
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def decode_image(root: Path | None, rel: str, pp: Preprocess) -> tuple[str, np.ndarray | None, str | None]:
    """(rel, pixels, None) or (rel, None, short error): `root / rel` (or `rel` alone when `root` is None)
    decoded and preprocessed; never raises for a bad file."""
    try:
        return rel, pp.load(Path(rel) if root is None else Path(root) / rel), None
    except PreprocessError as e:
        return rel, None, str(e)
    except Exception as e:  # a decoder bug must not end a long run; it becomes that image's error
        return rel, None, f"cannot decode image: {type(e).__name__}: {str(e)[:150]}"


def run_folder(images: str | Path, engine, bank, preprocess: Preprocess, out: str | Path | None,
               options: InferOptions | None = None, scoring: tuple[str, int] = ("max", 1),
               meta: dict | None = None) -> RunSummary:
    """Tag every image under `images`; see the module docstring for the output."""
    from tqdm import tqdm

    opts = options or InferOptions()
    if opts.fmt not in ("jsonl", "csv"):
        raise InferError(f"unknown output format {opts.fmt!r} (jsonl or csv)")
    if opts.batch_size < 1:
        raise InferError("--batch-size must be at least 1")
    threshold = effective_threshold(opts.top_k, opts.threshold)
    root = Path(images)
    out = Path(out) if out is not None and str(out) != "-" else None
    meta_path = out.with_name(out.name + META_SUFFIX) if out else None
    all_images = find_images(root)
    summary = RunSummary(total=len(all_images))

    append = False
    done: set[str] = set()
    names = bank.names
    header_cols = (["image", *names, "error"] if opts.all_scores else ["image", "label", "probability", "error"])
    if out is not None and out.exists() and out.stat().st_size > 0:
        if opts.resume:
            if meta_path.is_file():
                try:
                    old = json.loads(meta_path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    old = {}
                now = {"format": opts.fmt, "all_scores": opts.all_scores, "bank_key": getattr(bank, "key", None),
                       "top_k": opts.top_k, "threshold": threshold}
                for k, v in now.items():
                    if k in old and (old[k] is not None or k in ("top_k", "threshold")) and old[k] != v:
                        raise InferError(f"{out}: was written with {k}={old[k]!r}, this run has {v!r}; "
                                         "not resuming into it")
            done = done_images(out, opts.fmt, header_cols)
            append = True
        elif not opts.overwrite:
            raise InferError(f"{out} exists: pass --resume to continue it or --overwrite to replace it")
    elif opts.resume and out is None:
        raise InferError("--resume needs --out FILE")
    if not all_images:
        import warnings

        warnings.warn(f"no images under {display_name(str(root))} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})",
                      stacklevel=2)
    todo = [p for p in all_images if display_name(p) not in done]
    summary.skipped = len(all_images) - len(todo)

    batch_size = min(opts.batch_size, engine.max_batch) if getattr(engine, "max_batch", None) else opts.batch_size
    workers = opts.workers or min(4, os.cpu_count() or 1)
    build = RecordBuilder(engine, bank, scoring, top_k=opts.top_k, threshold=opts.threshold,
                          all_scores=opts.all_scores)

    info = dict(meta or {})
    info.update(format=opts.fmt, all_scores=opts.all_scores, bank_key=getattr(bank, "key", None), top_k=opts.top_k,
                threshold=threshold, batch_size=batch_size, workers=workers, images=str(root), output=str(out) if out else "-",
                images_found=len(all_images), skipped_already_done=summary.skipped, status="running",
                started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_meta(meta_path, info)

    writer = _Writer(out, opts.fmt, names, opts.all_scores, append)
    start = time.perf_counter()
    status = "interrupted"
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qks-decode") as pool, \
                tqdm(total=len(todo), unit="img", disable=not opts.progress, file=sys.stderr,
                     dynamic_ncols=True) as bar:
            pending: deque = deque()
            it = iter(todo)
            window = 2 * batch_size + workers

            def fill():
                while len(pending) < window:
                    rel = next(it, None)
                    if rel is None:
                        return
                    pending.append(pool.submit(decode_image, root, rel, preprocess))

            fill()
            while pending:
                items = []
                while pending and len(items) < batch_size:
                    items.append(pending.popleft().result())
                    fill()
                records = build(items)
                summary.errors += sum("error" in r for r in records)
                writer.write(records)
                summary.written += len(records)
                bar.update(len(items))
        status = "complete"
    finally:
        writer.close()
        summary.seconds = time.perf_counter() - start
        summary.images_per_s = summary.written / summary.seconds if summary.seconds > 0 else 0.0
        info.update(status=status, written=summary.written, errors=summary.errors,
                    seconds=round(summary.seconds, 3), images_per_s=round(summary.images_per_s, 2),
                    finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        summary.meta = info
        _write_meta(meta_path, info)
    return summary


__all__ = ["IMAGE_EXTENSIONS", "display_name", "InferError", "InferOptions", "RecordBuilder", "RunSummary", "decode_image",
           "done_images", "effective_threshold", "find_images", "jsonl_line", "public_record", "run_folder"]
