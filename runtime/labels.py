"""Label lists and label banks.

A label file is UTF-8 (a BOM is stripped), one label a line, LF or CRLF; surrounding whitespace is
trimmed, blank lines are skipped, and a repeated label is kept once (with a warning). Bytes that
are not UTF-8 are an error that says where.

A `LabelBank` is the label names and their embeddings, float32 [L, D]. Banks come from the bundle
(`labels/<name>.npy`), or are computed for any new label list with the bundle's tokenizer
(`tokenizer.json`), prompt pool and label-encoder graph: every label goes through every template
(`template.format(label)`), and its embedding is the unnormalised mean of the prompts' text
features. So adding labels never needs a re-export. A computed bank is cached by
`manifest.bank_key(label encoder sha256, prompts sha256, names)` under the bundle's
`labels/cache/` when the bundle is writable, else under `$QKS_CACHE_DIR`, `$XDG_CACHE_HOME/qks` or
`~/.cache/qks` (`banks/`), and is found again by that key.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import LABEL_GRAPH, Bundle, load_npy, read_names
from .manifest import BundleError, bank_key, file_record, resolve, write_manifest

BANK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")


class LabelError(ValueError):
    """A label file or list that cannot be used; one line."""


class LabelWarning(UserWarning):
    pass


def parse_labels(text: str, source: str = "labels") -> list[str]:
    names, seen, dups = [], set(), []
    for line in text.removeprefix("\ufeff").splitlines():
        label = line.strip()
        if not label:
            continue
        if label in seen:
            dups.append(label)
            continue
        seen.add(label)
        names.append(label)
    if dups:
        warnings.warn(f"{source}: {len(dups)} duplicate label(s) kept once: {', '.join(repr(d) for d in dups[:5])}"
                      + (" ..." if len(dups) > 5 else ""), LabelWarning, stacklevel=2)
    if not names:
        raise LabelError(f"{source}: no labels (the file is empty or blank)")
    return names


def read_label_file(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LabelError(f"label file not found: {path}") from None
    except IsADirectoryError:
        raise LabelError(f"label file is a directory: {path}") from None
    except OSError as e:
        raise LabelError(f"cannot read label file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise LabelError(f"{path}: not UTF-8 (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8") from None
    return parse_labels(text, str(path))


@dataclass
class LabelBank:
    names: list[str]
    embeddings: np.ndarray  # float32 [L, D]
    key: str | None = None
    source: str = ""  # "bundle:<name>", "cache:<path>", "computed"
    # float32 [L], bank order: per-label thresholds fitted by qks-calibrate for a stored bank (a cached
    # or computed bank has none), None when there are none
    thresholds: np.ndarray | None = None

    def __post_init__(self):
        if self.embeddings.ndim != 2 or len(self.names) != self.embeddings.shape[0]:
            raise LabelError(f"label bank: {len(self.names)} names for embeddings {list(self.embeddings.shape)}")
        if self.thresholds is not None and np.shape(self.thresholds) != (len(self.names),):
            raise LabelError(f"label bank: {len(self.names)} names for thresholds {list(np.shape(self.thresholds))}")

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_bundle(cls, bundle: Bundle, name: str | None = None) -> LabelBank:
        name = name or bundle.default_bank()
        if name not in bundle.banks:
            raise BundleError(f"bundle has no label bank {name!r} (it has: {', '.join(sorted(bundle.banks)) or 'none'})")
        rec = bundle.banks[name]
        emb = load_npy(rec.path, f"label bank {name!r}")
        return cls(read_names(rec.names_path), emb, rec.key, f"bundle:{name}", rec.thresholds)

    @classmethod
    def for_labels(cls, bundle: Bundle, names: list[str], *, cache: bool = True, cache_dir: str | Path | None = None,
                   batch_size: int = 64, threads: int | None = None, engine=None, provider: str = "cpu",
                   progress: bool = False) -> LabelBank:
        """The bank for `names`: a bundle bank or cached bank with the same key, else encode and cache."""
        names = list(names)
        if not names:
            raise LabelError("no labels to encode")
        key = bank_key_for(bundle, names)
        for name, rec in bundle.banks.items():
            if rec.key == key:
                bank = cls.from_bundle(bundle, name)
                if bank.names == names:
                    return bank
        dirs = cache_dirs(bundle, cache_dir)
        if cache:
            for d in dirs:
                bank = _read_cached(d, key, names)
                if bank is not None:
                    return bank
        emb = encode_labels(bundle, names, batch_size=batch_size, threads=threads, engine=engine, provider=provider,
                            progress=progress)
        bank = cls(names, emb, key, "computed")
        if cache:
            for d in dirs:
                if _write_cached(d, key, bank):
                    break
        return bank


def bank_key_for(bundle: Bundle, names: list[str]) -> str:
    label_graph = bundle.graph(LABEL_GRAPH)
    return bank_key(label_graph.sha256, bundle.sha256(bundle.prompts_file), names)


def user_cache_dir() -> Path:
    if os.environ.get("QKS_CACHE_DIR"):
        return Path(os.environ["QKS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qks"


def cache_dirs(bundle: Bundle, cache_dir: str | Path | None = None) -> list[Path]:
    """Where computed banks are looked up and stored, in order."""
    if cache_dir is not None:
        return [Path(cache_dir)]
    return [bundle.root / "labels" / "cache", user_cache_dir() / "banks"]


def _read_cached(d: Path, key: str, names: list[str]) -> LabelBank | None:
    npy, txt = d / f"{key}.npy", d / f"{key}.txt"
    if not (npy.is_file() and txt.is_file()):
        return None
    try:
        emb = load_npy(npy, "cached label bank")  # numpy raises more than ValueError (EOFError, SyntaxError)
        cached_names = read_names(txt)
    except (OSError, ValueError, BundleError):
        return None  # a damaged cache entry is recomputed, never trusted
    if cached_names != names or emb.dtype != np.float32 or emb.shape[:1] != (len(names),) or emb.ndim != 2:
        return None
    return LabelBank(names, emb, key, f"cache:{npy}")


def _write_cached(d: Path, key: str, bank: LabelBank) -> bool:
    """Write `<key>.npy` and `<key>.txt` atomically; False if the folder is not writable."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        _atomic_save(d / f"{key}.txt", "".join(n + "\n" for n in bank.names).encode("utf-8"))
        _atomic_save(d / f"{key}.npy", _npy_bytes(bank.embeddings))
    except OSError:
        return False
    return True


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _atomic_save(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tokenizer(bundle: Bundle):
    """The bundle's tokenizer.json as a `tokenizers.Tokenizer` (BundleError if it cannot load)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(bundle.tokenizer_file))
    except Exception as e:
        raise BundleError(f"tokenizer.json cannot be loaded ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def tokenize(bundle: Bundle, texts: list[str], tokenizer=None, truncated: list[int] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, int64 [N, T], from the bundle's tokenizer.json (which pads and
    truncates to T). `truncated`, when given, receives the indices of texts cut to fit T."""
    tok = tokenizer if tokenizer is not None else load_tokenizer(bundle)
    encs = tok.encode_batch(texts)
    t = bundle.context_length
    lengths = {len(e.ids) for e in encs}
    if len(lengths) > 1 or (t is not None and lengths != {t}):
        raise BundleError(f"tokenizer.json does not pad/truncate to the context length {t} (got lengths {sorted(lengths)})")
    if truncated is not None:
        truncated.extend(i for i, e in enumerate(encs) if e.overflowing)
    return (np.asarray([e.ids for e in encs], dtype=np.int64),
            np.asarray([e.attention_mask for e in encs], dtype=np.int64))


def label_engine(bundle: Bundle, provider: str = "cpu", threads: int | None = None):
    """An OrtEngine for the label encoder; provider "cuda" falls back to the CPU if CUDA cannot load."""
    from ..engines.base import EngineError
    from ..engines.ort import OrtEngine

    path = bundle.graph(LABEL_GRAPH).path
    if provider == "cuda":
        try:
            return OrtEngine(path, "cuda")
        except EngineError:
            pass
    return OrtEngine(path, "cpu", intra_op_threads=threads)


def encode_labels(bundle: Bundle, names: list[str], *, batch_size: int = 64, threads: int | None = None,
                  engine=None, provider: str = "cpu", progress: bool = False) -> np.ndarray:
    """[L, D] float32: per label, the mean over the prompt pool of the label encoder's text features.

    Streams: labels are tokenized and encoded a batch of prompts at a time and reduced to their mean
    at once, so memory holds the [L, D] result plus one batch, whatever L is (100,000 labels are
    fine). A label whose prompt is longer than the text context is truncated by the tokenizer, as
    in training; a LabelWarning names how many were and the first."""
    templates = bundle.prompts()
    tok = load_tokenizer(bundle)
    per = max(1, batch_size // len(templates))  # labels per engine run
    own = engine is None
    if own:
        engine = label_engine(bundle, provider, threads)
    emb = None
    truncated: list[str] = []
    try:
        from tqdm import tqdm

        in_names = [i.name for i in engine.inputs]
        out_name = engine.outputs[0].name
        starts = range(0, len(names), per)
        for i in tqdm(starts, desc="encoding labels", unit="batch", file=sys.stderr,
                      disable=not progress or len(starts) < 2, leave=False):
            chunk = names[i:i + per]
            cut: list[int] = []
            ids, mask = tokenize(bundle, [t.format(label) for label in chunk for t in templates], tok, cut)
            truncated.extend(dict.fromkeys(chunk[j // len(templates)] for j in cut))
            feats = []
            for j in range(0, len(ids), batch_size):
                feeds = {"token_ids": ids[j:j + batch_size]}
                if "attention_mask" in in_names:
                    feeds["attention_mask"] = mask[j:j + batch_size]
                feats.append(engine.run(feeds)[out_name])
            mean = np.concatenate(feats).astype(np.float64).reshape(len(chunk), len(templates), -1).mean(axis=1)
            if emb is None:
                emb = np.empty((len(names), mean.shape[1]), dtype=np.float32)
            emb[i:i + len(chunk)] = mean
    finally:
        if own:
            engine.close()
    if truncated:
        warnings.warn(f"{len(truncated)} label(s) make prompts longer than the text context of {bundle.context_length} "
                      f"tokens and were truncated (as in training), e.g. {truncated[0][:60]!r}"
                      + ("..." if len(truncated[0]) > 60 else ""), LabelWarning, stacklevel=2)
    if emb is None or not np.isfinite(emb).all():
        raise BundleError("the label encoder produced non-finite embeddings")
    return emb


def save_bank(bundle: Bundle, name: str, bank: LabelBank) -> Path:
    """Add (or replace) `labels/<name>.npy` + `labels/<name>.txt` in the bundle and its manifest."""
    if not BANK_NAME.fullmatch(name):
        raise LabelError(f"bank name {name!r}: use letters, digits, '_', '-', '.' (not first), at most 100 characters")
    labels_dir = bundle.root / "labels"
    try:
        labels_dir.mkdir(exist_ok=True)
        rel_npy, rel_txt = f"labels/{name}.npy", f"labels/{name}.txt"
        _atomic_save(bundle.root / rel_txt, "".join(n + "\n" for n in bank.names).encode("utf-8"))
        _atomic_save(bundle.root / rel_npy, _npy_bytes(bank.embeddings))
        m = bundle.manifest
        m.setdefault("files", {})[rel_npy] = file_record(bundle.root, rel_npy)
        m["files"][rel_txt] = file_record(bundle.root, rel_txt)
        key = bank.key or bank_key_for(bundle, bank.names)
        rec = {"file": rel_npy, "names_file": rel_txt, "shape": list(bank.embeddings.shape), "dtype": "float32",
               "key": key}
        rec.update(_kept_thresholds(bundle, m.get("label_banks", {}).get(name), key, name))
        m.setdefault("label_banks", {})[name] = rec
        write_manifest(bundle.root, m)
    except OSError as e:
        raise BundleError(f"cannot write to the bundle {bundle.root}: {e.strerror or e}") from None
    bundle.banks[name] = bundle._check_bank(name, m["label_banks"][name])
    return bundle.root / rel_npy


def drop_thresholds(root: Path, manifest: dict, name: str) -> bool:
    """Remove bank `name`'s thresholds from `manifest` (its record's entry and the hashed file) and the
    file itself; whether it had any. The caller writes the manifest."""
    rel = (manifest.get("label_banks", {}).get(name) or {}).pop("thresholds_file", None)
    if rel is None:
        return False
    manifest.get("files", {}).pop(rel, None)
    resolve(root, rel).unlink(missing_ok=True)
    return True


def _kept_thresholds(bundle: Bundle, old: dict | None, key: str, name: str) -> dict:
    """A replaced bank keeps its thresholds (qks-calibrate) only if its key is the same: new labels or a
    new label encoder make them stale, so they are dropped (file and manifest entry) with a warning."""
    rel = (old or {}).get("thresholds_file")
    if rel is None:
        return {}
    if old.get("key") == key:
        return {"thresholds_file": rel}
    drop_thresholds(bundle.root, bundle.manifest, name)
    warnings.warn(f"label bank {name!r} changed: its per-label thresholds were fitted for the old bank and are "
                  "dropped; rerun qks-calibrate", LabelWarning, stacklevel=3)
    return {}
