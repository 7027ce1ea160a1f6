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
from .scoring import select, sigmoid, thresholds_for
from .update import (
    UpdateError,
    excluded,
    file_states,
    read_chunks,
    read_states,
    state_path,
    unchanged,
    write_states,
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".heic", ".heif", ".avif"})
META_SUFFIX = ".meta.json"


class InferError(RuntimeError):
    """A run that cannot start or continue; one line."""


def find_images(root: str | Path, exclude: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Image files under `root`, as sorted POSIX paths relative to it, without those (or the folders)
    an `exclude` pattern matches (see `update.excluded`)."""
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
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not excluded((rel_dir / d).as_posix(), exclude))
        for name in filenames:
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS or excluded((rel_dir / name).as_posix(), exclude):
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
    exclude: tuple[str, ...] = ()  # --exclude patterns (see update.excluded)
    update: bool = False  # tag only new or changed images into an existing OUT (see update.py)
    checksum: bool = False  # an image is unchanged when its sha256 is (not its size and mtime)
    embeddings: Path | None = None  # write each image's embedding here (.npy, plus the .json index)
    xmp: str | None = None  # write XMP sidecars: "ext" (IMG.jpg.xmp) or "base" (IMG.xmp)
    xmp_root: str = "qks|label"  # root of the hierarchical keywords


@dataclass
class RunSummary:
    total: int = 0  # images found
    skipped: int = 0  # already in the output (--resume) or unchanged (--update)
    removed: int = 0  # records of images no longer there (--update)
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


def threshold_record(threshold) -> float | str | None:
    """The threshold as the run's metadata states it (per-label thresholds by their sha256)."""
    if isinstance(threshold, np.ndarray):
        import hashlib

        return "per-label:" + hashlib.sha256(np.ascontiguousarray(threshold, dtype=np.float32).tobytes()).hexdigest()[:16]
    return threshold


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
                 threshold: float | None = None, all_scores: bool = False, embedding_output: str | None = None):
        self.engine = engine
        self.names = list(bank.names)
        self.embeddings = np.ascontiguousarray(bank.embeddings, dtype=np.float32)
        self.mode, self.k = scoring
        self.top_k, self.all_scores = top_k, all_scores
        self.threshold = thresholds_for(bank, top_k, threshold)
        self.in_name = engine.inputs[0].name
        self.out_name = engine.outputs[0].name
        self.embedding_output = embedding_output  # also return this output (the image embedding) per image
        self.max_batch = getattr(engine, "max_batch", None)

    def _run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        names = [self.out_name] + ([self.embedding_output] if self.embedding_output else [])
        step = self.max_batch or len(pixels)
        outs = [self.engine.run({self.in_name: pixels[i:i + step]}) for i in range(0, len(pixels), step)]
        return {n: outs[0][n] if len(outs) == 1 else np.concatenate([o[n] for o in outs]) for n in names}

    def __call__(self, items: list[tuple]) -> list[dict]:
        return self.tag(items)[0]

    def tag(self, items: list[tuple]) -> tuple[list[dict], dict[int, np.ndarray]]:
        """The records of `items`, and {item index: its image embedding} for the images tagged
        (empty unless `embedding_output` was given)."""
        ok = [i for i, (_rel, arr, _err) in enumerate(items) if arr is not None]
        if not ok:
            return self.records(items, None), {}
        outs = self._run(np.stack([items[i][1] for i in ok]))
        records = self.records(items, outs[self.out_name])
        if not self.embedding_output:
            return records, {}
        vectors = {}
        for i, vec in zip(ok, outs[self.embedding_output], strict=True):
            if "error" in records[i]:
                continue
            if not np.isfinite(vec).all():
                records[i] = {"image": records[i]["image"], "error": "image embedding is not finite (NaN or inf)"}
            else:
                vectors[i] = np.asarray(vec, dtype=np.float32)
        return records, vectors

    def probabilities(self, items: list[tuple], qf: np.ndarray | None = None
                      ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """{item index: label probabilities} of the images that decoded and scored finite, and {item index:
        error} of the others; `qf`: the query features of the decoded images (in order), else computed here."""
        ok = [i for i, (_rel, arr, _err) in enumerate(items) if arr is not None]
        errors = {i: err for i, (_rel, arr, err) in enumerate(items) if arr is None}
        if not ok:
            return {}, errors
        if qf is None:
            qf = self._run(np.stack([items[i][1] for i in ok]))[self.out_name]
        lg = score_logits(qf, self.embeddings, self.mode, self.k)
        # inf logits would become probabilities 0/1: test the raw outputs, not the sigmoid
        finite = np.isfinite(qf.reshape(len(ok), -1)).all(axis=1) & np.isfinite(lg).all(axis=1)
        errors.update((ok[j], "model output is not finite (NaN or inf)") for j in np.flatnonzero(~finite))
        return {i: p for i, p, f in zip(ok, sigmoid(lg), finite, strict=True) if f}, errors

    def records(self, items: list[tuple], qf: np.ndarray | None) -> list[dict]:
        """The records of `items` from the query features of their decoded images (in order), computed
        elsewhere (qks-serve runs one engine batch for many requests), or here when None."""
        probs, errors = self.probabilities(items, qf)
        records = []
        for i, (rel, _arr, _err) in enumerate(items):
            if i in errors:
                records.append({"image": rel, "error": errors[i]})
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

    def text(self, records: list[dict]) -> str:
        """The records as written (JSONL lines or CSV rows). A record with labels and an error (its XMP
        sidecar failed) gives its label rows with the error in each."""
        records = [public_record(r) for r in records]
        if self.fmt == "jsonl":
            return "".join(jsonl_line(r) + "\n" for r in records)
        rows = []
        for r in records:
            if "labels" in r and r["labels"]:
                rows.extend([r["image"], n, p, r.get("error", "")] for n, p in r["labels"].items())
            elif "error" in r:
                rows.append([r["image"], *([""] * (len(self.header) - 2)), r["error"]])
            elif self.all_scores:
                rows.append([r["image"], *(r["scores"][n] for n in self.names), ""])
            else:
                rows.append([r["image"], "", "", ""])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        return buf.getvalue()

    def write(self, records: list[dict]) -> None:
        self.f.write(self.text(records))
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
    _repair_tail(out)
    try:
        return set(read_chunks(out, fmt, header, doing="resuming into")[0])
    except UpdateError as e:
        raise InferError(str(e)) from None


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


@dataclass
class _Plan:
    """What a run does: the images to tag, and for --update the records (and embeddings) it keeps."""
    todo: list[str]
    append: bool = False  # --resume: append to OUT
    kept: dict[str, str] | None = None  # --update: {display name: its record text in OUT}, unchanged images
    removed: int = 0  # --update: records of images no longer found
    old_vectors: dict[str, np.ndarray] = field(default_factory=dict)  # embeddings of the images not tagged again


def _check_options(opts: InferOptions, out: Path | None) -> None:
    if opts.fmt not in ("jsonl", "csv"):
        raise InferError(f"unknown output format {opts.fmt!r} (jsonl or csv)")
    if opts.batch_size < 1:
        raise InferError("--batch-size must be at least 1")
    if (opts.resume or opts.update) and out is None:
        raise InferError(f"{'--resume' if opts.resume else '--update'} needs --out FILE")
    if opts.resume and opts.update:
        raise InferError("give --resume or --update, not both")
    if opts.xmp is not None and opts.all_scores:
        raise InferError("--xmp writes the selected labels as keywords; it cannot be combined with --all-scores")
    if opts.xmp is not None:
        from .xmp import NAMINGS

        if opts.xmp not in NAMINGS:
            raise InferError(f"unknown XMP sidecar naming {opts.xmp!r} ({' or '.join(NAMINGS)})")


def _same_settings(out: Path, meta_path: Path, settings: dict, strict: bool) -> None:
    """Refuse to continue OUT (--resume) or update it (--update, `strict`: its metadata must exist) when
    it was written with other settings: the merged output would mix two runs."""
    what = "updating" if strict else "resuming into"
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        if strict:
            raise InferError(f"{out}: no readable {meta_path.name} says how it was written; not {what} it "
                             "(use --overwrite)") from None
        return
    for k, v in settings.items():
        if k in old and (old[k] is not None or k in ("top_k", "threshold")) and old[k] != v:
            raise InferError(f"{out}: was written with {k}={old[k]!r}, this run has {v!r}; not {what} it")
        if strict and k not in old and v is not None:
            raise InferError(f"{out}: was written without {k} (this run: {v!r}); not {what} it (use --overwrite)")


def _old_vectors(opts: InferOptions, names: set[str], meta: dict) -> dict[str, np.ndarray]:
    """The embeddings already written for `names` (--resume, --update); {} when there are none, or when
    they come from another image graph (rows of two graphs are never mixed)."""
    from .embeddings import EmbeddingsError, load_embeddings, pair_paths

    if opts.embeddings is None or not all(p.is_file() for p in pair_paths(opts.embeddings)):
        return {}
    try:
        old_names, vectors, index = load_embeddings(opts.embeddings)
    except EmbeddingsError as e:
        raise InferError(str(e)) from None
    if index.get("bundle_sha256") != meta.get("bundle_sha256"):
        return {}
    return {n: v for n, v in zip(old_names, vectors, strict=True) if n in names}


def _plan(out: Path | None, meta_path: Path | None, all_images: list[str], header: list[str], settings: dict,
          states: dict[str, dict] | None, emb_meta: dict, opts: InferOptions) -> _Plan:
    if out is None or not out.exists() or out.stat().st_size == 0:
        return _Plan(todo=all_images)
    if opts.resume:
        _same_settings(out, meta_path, settings, strict=False)
        done = done_images(out, opts.fmt, header)
        old_vectors = _old_vectors(opts, done, emb_meta)
        if opts.embeddings is not None and not done <= set(old_vectors):
            raise InferError(f"embeddings: {opts.embeddings} lacks images already in {out} (or comes from "
                             "another image graph); run again with --overwrite")
        return _Plan(todo=[p for p in all_images if display_name(p) not in done], append=True,
                     old_vectors=old_vectors)
    if opts.update:
        _same_settings(out, meta_path, settings, strict=True)
        return _update_plan(out, all_images, header, states, emb_meta, opts)
    if not opts.overwrite:
        raise InferError(f"{out} exists: pass --resume to continue it, --update to tag what changed, "
                         "or --overwrite to replace it")
    return _Plan(todo=all_images)


def _update_plan(out: Path, all_images: list[str], header: list[str], states: dict[str, dict], emb_meta: dict,
                 opts: InferOptions) -> _Plan:
    """--update: keep the records of unchanged images (and their embeddings); tag the rest."""
    try:
        chunks, errors = read_chunks(out, opts.fmt, header)
        old_states = read_states(out)
    except UpdateError as e:
        raise InferError(str(e)) from None
    if old_states is None:
        import warnings

        warnings.warn(f"{state_path(out).name} not found beside {out}: every image is tagged again", stacklevel=3)
        old_states = {}
    shown = {p: display_name(p) for p in all_images}
    keep = {shown[p] for p in all_images if shown[p] in chunks and shown[p] not in errors
            and unchanged(old_states.get(shown[p]), states[p], opts.checksum)}
    old_vectors = _old_vectors(opts, keep, emb_meta)
    if opts.embeddings is not None:
        keep &= set(old_vectors)  # an image without its embedding is tagged again
    return _Plan(todo=[p for p in all_images if shown[p] not in keep], kept={n: chunks[n] for n in keep},
                 removed=len(set(chunks) - set(shown.values())), old_vectors=old_vectors)


class _XmpSink:
    """--xmp: each tagged image's labels into its XMP sidecar; a failure becomes the record's error (the
    labels stay in the record)."""

    def __init__(self, root: Path, opts: InferOptions, meta: dict):
        from .xmp import XmpError, check_available, write_sidecar

        try:  # without pyexiv2 the run stops before the first image, not with an error in every record
            check_available()
        except XmpError as e:
            raise InferError(str(e)) from None
        self.write, self.error = write_sidecar, XmpError
        self.root, self.naming, self.hierarchy = root, opts.xmp, opts.xmp_root
        self.model, self.bundle_sha256 = str(meta.get("model") or ""), str(meta.get("bundle_sha256") or "")

    def __call__(self, records: list[dict]) -> None:
        for r in records:
            if "labels" not in r or "error" in r:
                continue
            try:
                self.write(self.root / r["image"], list(r["labels"]), model=self.model,
                           bundle_sha256=self.bundle_sha256, root=self.hierarchy, naming=self.naming)
            except self.error as e:
                r["error"] = f"XMP sidecar not written: {e}"


def _save_vectors(opts: InferOptions, order: list[str], vectors: dict[str, np.ndarray], meta: dict) -> None:
    """The embeddings of the images in `order` that have one, in that order."""
    from .embeddings import EmbeddingsError, save_embeddings

    names = [display_name(p) for p in order if display_name(p) in vectors]
    dim = next(iter(vectors.values())).shape[-1] if vectors else 0
    stacked = np.stack([vectors[n] for n in names]) if names else np.zeros((0, dim), np.float32)
    try:
        save_embeddings(opts.embeddings, names, stacked, meta)
    except EmbeddingsError as e:
        raise InferError(str(e)) from None


def _write_update(out: Path, fmt: str, header: list[str], all_images: list[str], kept: dict[str, str],
                  new: dict[str, dict], writer_args: tuple) -> None:
    """The updated OUT, in the order of a full run, written beside it and then swapped in whole."""
    tmp = out.with_name(out.name + ".update.tmp")
    writer = _Writer(tmp, *writer_args, append=False)
    try:
        for p in all_images:
            name = display_name(p)
            if name in kept:
                writer.f.write(kept[name])
            else:
                writer.f.write(writer.text([new[p]]))
        writer.f.flush()
        os.fsync(writer.f.fileno())
    finally:
        writer.close()
    os.replace(tmp, out)


def run_folder(images: str | Path, engine, bank, preprocess: Preprocess, out: str | Path | None,
               options: InferOptions | None = None, scoring: tuple[str, int] = ("max", 1),
               meta: dict | None = None) -> RunSummary:
    """Tag every image under `images`; see the module docstring for the output."""
    opts = options or InferOptions()
    out = Path(out) if out is not None and str(out) != "-" else None
    _check_options(opts, out)
    threshold = thresholds_for(bank, opts.top_k, opts.threshold)
    root = Path(images)
    meta_path = out.with_name(out.name + META_SUFFIX) if out else None
    all_images = find_images(root, opts.exclude)
    names = bank.names
    header = (["image", *names, "error"] if opts.all_scores else ["image", "label", "probability", "error"])
    info = dict(meta or {})
    if opts.embeddings is not None and not info.get("embedding_output"):
        raise InferError("--embeddings needs the image graph's embedding output: meta['embedding_output'] "
                         "(Bundle.require_embedding()) and meta['embeddings_meta'] (embeddings_meta(bundle))")
    settings = {"format": opts.fmt, "all_scores": opts.all_scores, "bank_key": getattr(bank, "key", None),
                "top_k": opts.top_k, "threshold": threshold_record(threshold),
                "bundle_sha256": info.get("bundle_sha256"), "xmp": opts.xmp}
    # the files' state as listed, before any is read: a file changed during the run is tagged again next time
    states = file_states(root, all_images, opts.checksum) if out is not None else None
    plan = _plan(out, meta_path, all_images, header, settings, states, info.get("embeddings_meta", {}), opts)
    if not all_images:
        import warnings

        warnings.warn(f"no images under {display_name(str(root))} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})",
                      stacklevel=2)
    summary = RunSummary(total=len(all_images), skipped=len(all_images) - len(plan.todo), removed=plan.removed)
    batch_size = min(opts.batch_size, engine.max_batch) if getattr(engine, "max_batch", None) else opts.batch_size
    workers = opts.workers or min(4, os.cpu_count() or 1)
    build = RecordBuilder(engine, bank, scoring, top_k=opts.top_k, threshold=opts.threshold,
                          all_scores=opts.all_scores,
                          embedding_output=info.get("embedding_output") if opts.embeddings is not None else None)
    info.update(settings, batch_size=batch_size, workers=workers, images=str(root), output=str(out) if out else "-",
                exclude=list(opts.exclude), images_found=len(all_images), skipped_already_done=summary.skipped,
                mode="update" if plan.kept is not None else ("resume" if plan.append else "full"),
                status="running", started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if plan.kept is None:  # an update leaves OUT and its metadata as they were until it is complete
        _write_meta(meta_path, info)

    writer_args = (opts.fmt, names, opts.all_scores)
    writer = _Writer(out, *writer_args, append=plan.append) if plan.kept is None else None
    new: dict[str, dict] = {}
    vectors = dict(plan.old_vectors)
    xmp = _XmpSink(root, opts, info) if opts.xmp is not None else None
    start = time.perf_counter()
    status = "interrupted"
    try:
        for items in _batches(root, plan.todo, preprocess, batch_size, workers, opts.progress):
            records, vecs = build.tag(items)
            if xmp is not None:
                xmp(records)
            vectors.update((display_name(items[i][0]), v) for i, v in vecs.items())
            summary.errors += sum("error" in r for r in records)
            summary.written += len(records)
            if writer is not None:
                writer.write(records)
            else:
                new.update((r["image"], r) for r in records)
        if plan.kept is not None:
            if opts.embeddings is not None:
                _save_vectors(opts, all_images, vectors, info.get("embeddings_meta", {}))
            _write_update(out, opts.fmt, header, all_images, plan.kept, new, writer_args)
        status = "complete"
    finally:
        if writer is not None:
            writer.close()
            if opts.embeddings is not None and (vectors or status == "complete"):
                _save_vectors(opts, all_images, vectors, info.get("embeddings_meta", {}))
        summary.seconds = time.perf_counter() - start
        summary.images_per_s = summary.written / summary.seconds if summary.seconds > 0 else 0.0
        if plan.kept is None or status == "complete":
            info.update(status=status, written=summary.written, errors=summary.errors, removed=summary.removed,
                        seconds=round(summary.seconds, 3), images_per_s=round(summary.images_per_s, 2),
                        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            _write_meta(meta_path, {k: v for k, v in info.items() if k != "embeddings_meta"})
        summary.meta = info
    if states is not None:  # last: a state older than OUT only makes the next update tag a few images again
        write_states(out, {display_name(p): st for p, st in states.items()})
    return summary


def _batches(root: Path, todo: list[str], preprocess: Preprocess, batch_size: int, workers: int, progress: bool):
    """Batches of `decode_image` results in `todo` order, decoded by worker threads ahead of the engine
    (a bounded window of pending images keeps memory flat)."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qks-decode") as pool, \
            tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
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
            yield items
            bar.update(len(items))


__all__ = ["IMAGE_EXTENSIONS", "display_name", "threshold_record", "InferError", "InferOptions", "RecordBuilder", "RunSummary", "decode_image",
           "done_images", "find_images", "jsonl_line", "public_record", "run_folder"]
