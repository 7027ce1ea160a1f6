"""`Bundle.load(dir)`: a checked, read-only view of an exported bundle (see manifest.py).

Loading refuses, each with a one-line `BundleError`: a missing or unknown-schema manifest, any path
that is not a plain relative path inside the bundle (symlinks included), a file the manifest names
but does not list under `files`, a missing file, a size or sha256 mismatch, and label banks that are
not float32 [L, D] `.npy` files readable without pickle or whose names file has another length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import BundleError, read_manifest, resolve, sha256_file
from .preprocess import Preprocess
from .thresholds import read_thresholds

IMAGE_GRAPHS = ("image_encoder", "image_encoder_fp16")
LABEL_GRAPH = "label_encoder"


@dataclass(frozen=True)
class GraphRecord:
    name: str
    path: Path
    file: str
    sha256: str
    precision: str
    inputs: list
    outputs: list


@dataclass(frozen=True)
class BankRecord:
    name: str
    path: Path
    names_path: Path
    shape: tuple[int, int]
    key: str | None
    thresholds: np.ndarray | None = None  # float32 [L], per-label thresholds (qks-calibrate), if stored


class Bundle:
    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest

    # -- loading and checks ------------------------------------------------------------------------

    @classmethod
    def load(cls, bundle_dir: str | Path, verify: bool = True) -> Bundle:
        """Read and check a bundle. verify=False skips the sha256 of every file (sizes still checked)."""
        root = Path(bundle_dir)
        if not root.is_dir():
            raise BundleError(f"bundle folder not found: {root}")
        manifest = read_manifest(root)
        bundle = cls(root.resolve(), manifest)
        bundle._check_files(verify)
        bundle._check_sections()
        return bundle

    def _check_files(self, verify: bool) -> None:
        files = self.manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise BundleError(f"{self.root}: manifest lists no files")
        for rel, rec in files.items():
            path = resolve(self.root, rel)
            if not path.is_file():
                raise BundleError(f"bundle file missing: {rel}")
            if not isinstance(rec, dict) or "sha256" not in rec:
                raise BundleError(f"manifest entry for {rel} has no sha256")
            if "bytes" in rec and path.stat().st_size != rec["bytes"]:
                raise BundleError(f"bundle file {rel} is {path.stat().st_size} bytes, manifest says {rec['bytes']} "
                                  "(truncated or replaced)")
            if verify and sha256_file(path) != rec["sha256"]:
                raise BundleError(f"bundle file {rel} does not match its sha256 in the manifest (corrupt or modified)")

    def _listed(self, rel: str, what: str) -> Path:
        path = resolve(self.root, rel)
        if rel not in self.manifest["files"]:
            raise BundleError(f"{what} file {rel} is not listed (with its sha256) in the manifest's files")
        return path

    def _check_sections(self) -> None:
        m = self.manifest
        for key in ("model", "preprocess", "graphs"):
            if not isinstance(m.get(key), dict):
                raise BundleError(f"manifest has no {key!r} section")
        fixed = {"channels": "RGB", "layout": "NCHW", "crop": "center", "value_range": [0.0, 1.0]}
        for key, supported in fixed.items():  # fields this runtime implements one way only
            if key in m["preprocess"] and m["preprocess"][key] != supported:
                raise BundleError(f"manifest preprocess {key}={m['preprocess'][key]!r} is not supported "
                                  f"(this runtime does {supported!r})")
        try:
            self.preprocess = Preprocess.from_dict(m["preprocess"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise BundleError(f"manifest preprocess section is invalid ({e})") from None
        self.graphs: dict[str, GraphRecord] = {}
        for name, rec in m["graphs"].items():
            if not isinstance(rec, dict) or "file" not in rec:
                raise BundleError(f"graph {name!r} has no file")
            path = self._listed(rec["file"], f"graph {name!r}")
            self.graphs[name] = GraphRecord(name, path, rec["file"], m["files"][rec["file"]]["sha256"],
                                            rec.get("precision", "fp32"), rec.get("inputs", []), rec.get("outputs", []))
        if not any(g in self.graphs for g in IMAGE_GRAPHS):
            raise BundleError(f"bundle has no image encoder graph ({' or '.join(IMAGE_GRAPHS)})")
        for section in ("tokenizer", "prompts"):
            rec = m.get(section)
            if rec is not None:
                if not isinstance(rec, dict) or "file" not in rec:
                    raise BundleError(f"manifest {section} section has no file")
                self._listed(rec["file"], section)
        for key, kind in (("label_banks", dict), ("engines", list)):
            if m.get(key) is not None and not isinstance(m[key], kind):
                raise BundleError(f"manifest {key} must be {'an object' if kind is dict else 'a list'}")
        self.banks: dict[str, BankRecord] = {}
        for name, rec in (m.get("label_banks") or {}).items():
            self.banks[name] = self._check_bank(name, rec)
        self.engines: list[dict] = []
        for rec in m.get("engines") or []:
            if not isinstance(rec, dict) or "file" not in rec:
                raise BundleError("an engines entry has no file")
            self._listed(rec["file"], "TensorRT plan")
            if rec.get("sidecar"):
                self._listed(rec["sidecar"], "TensorRT plan sidecar")
            self.engines.append(dict(rec, path=resolve(self.root, rec["file"])))

    def _check_bank(self, name: str, rec: dict) -> BankRecord:
        if not isinstance(rec, dict) or "file" not in rec or "names_file" not in rec:
            raise BundleError(f"label bank {name!r}: needs 'file' and 'names_file'")
        path = self._listed(rec["file"], f"label bank {name!r}")
        names_path = self._listed(rec["names_file"], f"label bank {name!r} names")
        arr = load_npy(path, f"label bank {name!r}")
        if arr.ndim != 2 or arr.dtype != np.float32:
            raise BundleError(f"label bank {name!r} must be float32 [L, D], is {arr.dtype} {list(arr.shape)}")
        if "shape" in rec and rec["shape"] != list(arr.shape):
            raise BundleError(f"label bank {name!r} is {list(arr.shape)}, manifest says {rec['shape']!r}")
        d = self.embed_dim
        if d is not None and arr.shape[1] != d:
            raise BundleError(f"label bank {name!r} has dimension {arr.shape[1]}, the model's is {d}")
        names = read_names(names_path)
        if len(names) != arr.shape[0]:
            raise BundleError(f"label bank {name!r} has {arr.shape[0]} vectors but {len(names)} names")
        thresholds = None
        if rec.get("thresholds_file") is not None:  # hashed like the bank; fitted for this bank's key
            thresholds = read_thresholds(self._listed(rec["thresholds_file"], f"label bank {name!r} thresholds"),
                                         name, arr.shape[0], rec.get("key"))
        return BankRecord(name, path, names_path, tuple(arr.shape), rec.get("key"), thresholds)

    # -- accessors ---------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int | None:
        d = self.manifest["model"].get("embed_dim")
        try:
            return int(d) if d is not None else None
        except (TypeError, ValueError, OverflowError):
            raise BundleError(f"manifest model embed_dim {d!r} is not a number") from None

    @property
    def scoring(self) -> tuple[str, int]:
        s = self.manifest.get("scoring") or {}
        try:
            return s.get("mode", "max"), int(s.get("k", 1))
        except (AttributeError, TypeError, ValueError, OverflowError):
            raise BundleError(f"manifest scoring section is invalid ({s!r})") from None

    @property
    def embedding_output(self) -> str | None:
        """The image graphs' embedding output name ("embedding"), or None for a bundle exported before
        embeddings. Present only when the manifest's "embedding" record names it and every image graph
        lists it among its outputs (a graph without it would make the runtime's choice of precision
        decide whether embeddings work)."""
        rec = self.manifest.get("embedding")
        if not isinstance(rec, dict) or not isinstance(rec.get("output"), str):
            return None
        name = rec["output"]
        for g in self.graphs.values():
            if g.name.startswith("image_encoder") and name not in {o.get("name") for o in g.outputs if isinstance(o, dict)}:
                return None
        return name

    def require_embedding(self) -> str:
        """`embedding_output`, or a BundleError naming the bundle and the fix."""
        name = self.embedding_output
        if name is None:
            raise BundleError(f"{self.root}: this bundle has no image embedding output (exported before "
                              "embeddings); re-export it with qks-export")
        return name

    @property
    def embedding_dim(self) -> int | None:
        rec = self.manifest.get("embedding") if self.embedding_output else None
        try:
            return int(rec["dim"]) if rec else None
        except (KeyError, TypeError, ValueError, OverflowError):
            raise BundleError(f"manifest embedding record {rec!r} has no valid dim") from None

    def text_embedding_rule(self) -> tuple[int, bool]:
        """How the label graph's text_features give a text's embedding in the image embedding's space:
        (the number of leading values to keep, whether to L2-normalise them)."""
        self.require_embedding()
        text = self.manifest["embedding"].get("text")
        if not isinstance(text, dict) or text.get("output") != "text_features":
            raise BundleError(f"{self.root}: the manifest's embedding record says no text rule; re-export it with qks-export")
        try:
            return int(text["dims"]), bool(text.get("normalize", True))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise BundleError(f"manifest embedding text rule {text!r} is invalid") from None

    def file(self, rel: str) -> Path:
        return resolve(self.root, rel)

    def sha256(self, rel: str) -> str:
        return self.manifest["files"][rel]["sha256"]

    def graph(self, name: str) -> GraphRecord:
        if name not in self.graphs:
            raise BundleError(f"bundle has no {name!r} graph (it has: {', '.join(sorted(self.graphs))})")
        return self.graphs[name]

    @property
    def tokenizer_file(self) -> Path:
        rec = self.manifest.get("tokenizer")
        if not rec:
            raise BundleError("bundle has no tokenizer: it cannot encode new labels")
        return self.file(rec["file"])

    @property
    def context_length(self) -> int | None:
        rec = self.manifest.get("tokenizer") or {}
        return rec.get("context_length")

    @property
    def prompts_file(self) -> str:
        rec = self.manifest.get("prompts")
        if not rec:
            raise BundleError("bundle has no prompts file: it cannot encode new labels")
        return rec["file"]

    def prompts(self) -> list[str]:
        text = self.file(self.prompts_file).read_text(encoding="utf-8-sig")
        templates = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        bad = [t for t in templates if t.count("{}") != 1]
        if bad or not templates:
            raise BundleError(f"prompts file: every template needs exactly one '{{}}' ({bad[0]!r})" if bad
                              else "prompts file has no templates")
        return templates

    def default_bank(self) -> str:
        """The manifest's `default_bank`, else a bank named "default", else the only bank."""
        name = self.manifest.get("default_bank")
        if name:
            if not isinstance(name, str) or name not in self.banks:
                raise BundleError(f"manifest default_bank {name!r} is not one of its label banks")
            return name
        if "default" in self.banks:
            return "default"
        if len(self.banks) == 1:
            return next(iter(self.banks))
        if not self.banks:
            raise BundleError("bundle has no label bank: pass --labels labels.txt")
        raise BundleError(f"bundle has several label banks ({', '.join(sorted(self.banks))}): pick one with --bank")


def load_npy(path: Path, what: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise BundleError(f"{what}: {path.name} is not a valid .npy file (no NumPy header)")
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise BundleError(f"{what}: {path.name} needs pickle to load; refused (save a plain float32 array)") from None
        raise BundleError(f"{what}: {path.name} is not a valid .npy file ({_first_line(e)})") from None
    except OSError as e:
        raise BundleError(f"{what}: cannot read {path.name} ({e})") from None
    except Exception as e:  # numpy's header parser lets SyntaxError, tokenize.TokenError, ... escape
        raise BundleError(f"{what}: {path.name} is not a valid .npy file ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def read_names(path: Path) -> list[str]:
    """A bank's names file: UTF-8, one label a line, exactly as written (no dedup, no skipping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{path.name}: label names are not UTF-8") from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln.removesuffix("\r") for ln in lines]
