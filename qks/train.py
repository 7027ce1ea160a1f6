"""Training the QKS head on seen labels (the paper's recipe by default), with exact resume.

A run directory holds:
    run.json        the options, label counts and split sizes (readable)
    metrics.jsonl   one record per finished epoch: train loss, lr, validation metrics and score
    best.pt         the head with the best validation score so far (qks checkpoint)
    last.pt         the head after the last finished epoch, with `train_state` for `--resume`
    label_cache/    label embeddings (one .npy per label, keyed by backbone, prompt pool and label)
    tokens.npy      with --cached-tokens: the backbone's image tokens (float16), computed once

Validation: a split carved from the training manifest (never the test set), scored on the seen
labels only (the only labels its images carry) over its images with at least one seen positive.
The validation score is mAP + the sum of F1@K over the recipe's K (fractions, so in [0, 1 + len(K)]);
ReduceLROnPlateau follows it and `best.pt` is the epoch that maximises it.

Exactness: every epoch draws its shuffle, augmentation, dropout and worker seeds from
(seed, epoch) alone, and `last.pt` holds the optimizer, scheduler and RNG states, so a run stopped
after epoch e and resumed ends with the same weights as one that never stopped. A run killed
mid-epoch loses only that epoch (checkpoints are written atomically).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbones import create_backbone, module_fingerprint
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import RECIPES, HeadConfig, ModelConfig
from .data import Manifest, ManifestDataset, read_label_lists, read_manifest
from .evaluate import DEFAULT_TOPK, autocast, json_safe, predict_parts, resolve_device
from .hashing import sha256_file
from .losses import LOSSES, get_loss
from .model import QKSModel
from .prompts import LabelEmbedder, load_prompts
from .transforms import eval_transform, train_transform
from .validation import hold_out_concepts, scale_weight, split_validation, transfer_rows, validate

DEFAULT_BACKBONE = "openclip:ViT-B-16:openai"
PLATEAU_FACTOR = 0.1
TOKENS_FILE = "tokens.npy"


class TrainError(Exception):
    """Bad input or state for a training run; the message is one line."""


@dataclass
class TrainOptions:
    data: str
    seen: str
    out: str
    unseen: str | None = None
    backbone: str = DEFAULT_BACKBONE
    recipe: str = "nuswide"
    layers: int | None = None  # None: the recipe's
    queries: int | None = None
    width: int | None = None  # None: the backbone's token width
    heads: int | None = None
    ffn: int | None = None
    dropout: float | None = None
    memory_norm: bool | None = None  # None: the recipe's (on)
    zero_shot: bool = True  # the backbone's own zero-shot scores added to the head's, weight fit on validation
    drop_cls: bool = False
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 1e-4
    loss: str = "asl"
    plateau_patience: int = 2
    val_fraction: float = 0.05
    val_concepts: float = 0.1  # share of the seen labels held out of training to validate transfer
    topk: tuple[int, ...] | None = None  # None: the recipe's K (3, 5 or 10, 20)
    seed: int = 0
    cached_tokens: bool = False
    prompts: str = "default"
    device: str = "auto"
    workers: int = 4
    threads: int | None = None  # torch CPU threads; None: 1 with cached tokens on a CPU, else torch's default
    label_cache: str | None = None  # None: RUNDIR/label_cache
    amp: bool = True
    skip_bad: bool = False

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["topk"] = list(self.topk) if self.topk is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainOptions:
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        # Runs from before these options existed had no token LayerNorm, zero-shot term or held-out concepts.
        d.setdefault("memory_norm", False)
        d.setdefault("zero_shot", False)
        d.setdefault("val_concepts", 0.0)
        if d.get("topk") is not None:
            d["topk"] = tuple(d["topk"])
        return cls(**d)


# Options a resumed run may change without breaking exactness (where the run executes, not what).
RESUME_OVERRIDABLE = ("epochs", "device", "workers", "threads", "label_cache")


def _check_options(o: TrainOptions) -> None:
    if o.recipe not in RECIPES:
        raise TrainError(f"unknown recipe {o.recipe!r}: one of {', '.join(RECIPES)}")
    if o.loss not in LOSSES:
        raise TrainError(f"unknown loss {o.loss!r}: one of {', '.join(LOSSES)}")
    if not 0.0 <= o.val_fraction < 1.0:
        raise TrainError(f"--val-fraction must be in [0, 1), got {o.val_fraction}")
    if not 0.0 <= o.val_concepts < 1.0:
        raise TrainError(f"--val-concepts must be in [0, 1), got {o.val_concepts}")
    if o.threads is not None and o.threads < 1:
        raise TrainError("--threads must be >= 1")
    for name in ("epochs", "batch_size"):
        if getattr(o, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1")
    if o.lr <= 0:
        raise TrainError("--lr must be > 0")
    if o.layers is not None and o.layers < 0:
        raise TrainError("--layers must be >= 0 (0 = projection-only)")


def model_config(o: TrainOptions) -> ModelConfig:
    head = dataclasses.replace(RECIPES[o.recipe], zero_shot=o.zero_shot)
    for name in ("layers", "queries", "width", "heads", "ffn", "dropout", "memory_norm"):
        v = getattr(o, name)
        if v is not None:
            setattr(head, name, v)
    return ModelConfig(backbone=o.backbone, head=HeadConfig(**dataclasses.asdict(head)), drop_cls=o.drop_cls,
                       prompts=o.prompts)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A seed for one random stream of one epoch, from (seed, epoch) alone: resume-independent."""
    h = hashlib.sha256(f"{seed}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# ---- RNG state as plain values (weights_only checkpoints hold no numpy arrays) -----------------

def rng_state() -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"key": npy[0], "state": torch.from_numpy(npy[1].astype(np.int64)), "pos": int(npy[2]),
                  "has_gauss": int(npy[3]), "cached_gaussian": float(npy[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- cached image tokens -------------------------------------------------------------------

class TokenDataset(torch.utils.data.Dataset):
    """(tokens [N, C] float32, targets [L] int8) from a memory-mapped token array."""

    def __init__(self, tokens: np.ndarray, rows: np.ndarray, manifest: Manifest, labels: list[str]):
        self.tokens, self.rows = tokens, rows
        self.inner = ManifestDataset([manifest.samples[i] for i in rows], labels, transform=None)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        t = torch.from_numpy(np.asarray(self.tokens[self.rows[i]], dtype=np.float32))
        return t, torch.from_numpy(self.inner.samples[i].targets(self.inner.index))


def cache_tokens(model: QKSModel, manifest: Manifest, out: Path, device: torch.device, batch_size: int,
                 workers: int, amp: bool, progress: bool) -> np.ndarray:
    """The image tokens of every manifest image (eval transform, no augmentation) as float16 in
    `out/tokens.npy`, reused when the manifest, backbone and preprocessing are unchanged."""
    from tqdm import tqdm

    path, meta_path = out / TOKENS_FILE, out / "tokens.json"
    key = hashlib.sha256(json.dumps({
        "manifest": sha256_file(manifest.path),
        "images": [s.path for s in manifest.samples],
        "backbone": model.config.backbone,
        "weights": module_fingerprint(model.backbone) if isinstance(model.backbone, torch.nn.Module) else "",
        "preprocess": model.backbone.preprocess.to_dict(),
        "tokens": "all, CLS included",
        "amp": amp and device.type == "cuda",
    }, sort_keys=True).encode()).hexdigest()
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and meta.get("complete"):
            return np.load(path, mmap_mode="r")
    meta_path.unlink(missing_ok=True)
    ds = ManifestDataset(manifest.samples, [], eval_transform(model.backbone.preprocess))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    arr = None
    row = 0
    with torch.no_grad():
        for pixels, _ in tqdm(loader, desc="caching image tokens", unit="batch", disable=not progress):
            with autocast(device, amp):
                tok = model.image_tokens(pixels.to(device)).float().cpu().numpy()
            if arr is None:
                arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                                shape=(len(ds), *tok.shape[1:]))
            arr[row:row + len(tok)] = tok
            row += len(tok)
    arr.flush()
    del arr
    meta_path.write_text(json.dumps({"key": key, "complete": True}))
    return np.load(path, mmap_mode="r")


# ---- the run ---------------------------------------------------------------------------------

def _loader(dataset, batch_size: int, order: list[int] | None, workers: int, seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)  # worker seeds derive from it
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, shuffle=False,
                                       num_workers=workers, generator=g, pin_memory=device.type == "cuda",
                                       persistent_workers=False)


@dataclass
class _Run:
    """Where a run stands: its options and folder, and what a resumed run carries over."""

    o: TrainOptions
    out: Path
    start_epoch: int = 0
    best_score: float = float("-inf")
    state: dict | None = None  # last.pt's train_state when resuming
    head: dict | None = None  # last.pt's head when resuming


def _open_run(options: TrainOptions | None, resume, overrides: dict | None) -> _Run:
    if resume is not None:
        out = Path(resume)
        try:
            last = load_checkpoint(out / "last.pt")
        except CheckpointError as e:
            raise TrainError(f"cannot resume {out}: {e}") from None
        state = last.get("train_state")
        if not state:
            raise TrainError(f"cannot resume {out}: last.pt has no training state")
        o = TrainOptions.from_dict(state["options"])
        o = dataclasses.replace(o, **{k: v for k, v in (overrides or {}).items() if k in RESUME_OVERRIDABLE})
        return _Run(o, out, int(state["epoch"]), float(state["best_score"]), state, last["head"])
    assert options is not None
    # Absolute paths, so that --resume works from any working directory.
    o = dataclasses.replace(options, **{
        k: os.path.abspath(getattr(options, k)) for k in ("data", "seen", "unseen", "out", "prompts", "label_cache")
        if getattr(options, k) and not (k == "prompts" and options.prompts == "default")})
    out = Path(o.out)
    if (out / "last.pt").exists():
        raise TrainError(f"{out} already holds a run (last.pt): pass --resume {out} or another --out")
    return _Run(o, out)


@dataclass
class _Data:
    """The run's labels and images: what is trained, what validates."""

    templates: list[str]
    seen: list[str]
    unseen: list[str]
    trained: list[str]  # seen labels in the loss
    held_out: list[str]  # seen labels held out of training to validate transfer (--val-concepts)
    manifest: Manifest
    manifest_sha: str
    train_rows: np.ndarray
    val_rows: np.ndarray
    transfer_rows: np.ndarray  # the images the held-out concepts are scored on (qks.validation)
    topk: tuple[int, ...]


def _read_data(run: _Run, progress: bool, log) -> _Data:
    """Inputs are validated before anything expensive happens."""
    o = run.o
    try:
        templates = load_prompts(o.prompts)
    except (OSError, ValueError) as e:
        raise TrainError(f"prompt pool: {_first_line(e)}") from None
    seen, unseen = read_label_lists(o.seen, o.unseen)
    manifest = read_manifest(o.data, seen + unseen, skip_bad=o.skip_bad, progress=progress)
    if manifest.skipped:
        log(f"warning: skipped {len(manifest.skipped)} bad line(s) of {o.data}")
    manifest_sha = sha256_file(o.data)
    if run.state is not None and run.state.get("manifest_sha256") != manifest_sha:
        raise TrainError(f"cannot resume {run.out}: {o.data} changed since the run started")
    trained, held_out = hold_out_concepts(seen, o.val_concepts, o.seed)
    train_rows, val_rows = split_validation(len(manifest.samples), o.val_fraction, o.seed)
    transfer = np.arange(0)
    if held_out and len(val_rows):
        index = {name: j for j, name in enumerate(held_out)}
        transfer = transfer_rows(np.array([(s.targets(index) > 0).any() for s in manifest.samples]), o.seed)
    topk = o.topk or DEFAULT_TOPK.get(o.recipe, (3, 5))
    return _Data(templates, seen, unseen, trained, held_out, manifest, manifest_sha, train_rows, val_rows,
                 transfer, topk)


def _build_model(o: TrainOptions, device: torch.device) -> QKSModel:
    try:
        backbone = create_backbone(o.backbone)
    except Exception as e:  # unknown arch, missing file, weights that cannot be fetched offline, ...
        raise TrainError(f"cannot build backbone {o.backbone!r}: {_first_line(e)}") from None
    torch.manual_seed(o.seed)  # the head's initialisation
    try:
        return QKSModel(model_config(o), backbone).to(device)
    except ValueError as e:
        raise TrainError(f"bad head configuration: {e}") from None


def _datasets(model: QKSModel, d: _Data, o: TrainOptions, out: Path, device: torch.device, progress: bool):
    """(training set over the trained labels, validation set over them, the held-out concepts' images
    over the held-out labels, workers)."""
    if o.cached_tokens:
        tokens = cache_tokens(model, d.manifest, out, device, o.batch_size, o.workers, o.amp, progress)

        def make(rows, labels):
            return TokenDataset(tokens, rows, d.manifest, labels)

        train_ds, workers = make(d.train_rows, d.trained), 0  # memory-mapped: no workers
    else:
        pp = model.backbone.preprocess

        def make(rows, labels, transform=eval_transform(pp)):
            return _images(d, rows, labels, transform)

        train_ds, workers = make(d.train_rows, d.trained, train_transform(pp)), o.workers
    return train_ds, make(d.val_rows, d.trained), make(d.transfer_rows, d.held_out), workers


def _images(d: _Data, rows, labels: list[str], transform) -> ManifestDataset:
    """These manifest rows as images, with targets over `labels`."""
    return ManifestDataset([d.manifest.samples[i] for i in rows], labels, transform)


def _train_epoch(model, loader, emb, loss_fn, optimizer, o: TrainOptions, device, epoch: int, progress: bool) -> float:
    """One epoch of the head alone on the trained labels; the mean loss."""
    from tqdm import tqdm

    model.train()
    total, batches = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{o.epochs}", unit="batch", disable=not progress)
    for inputs, targets in bar:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if o.cached_tokens:
            tokens = inputs
        else:
            with autocast(device, o.amp):
                tokens = model.image_tokens(inputs)
        head, _ = model.logit_parts(tokens, emb, lambda: autocast(device, o.amp), zero_shot=False)
        loss = loss_fn(head, targets)
        if not torch.isfinite(loss):
            raise TrainError(f"epoch {epoch + 1}: the loss is {loss.item()} (lower --lr?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        batches += 1
        bar.set_postfix(loss=f"{total / batches:.4f}")
    bar.close()
    return total / max(batches, 1)


OFFSET_IMAGES = 1024  # training images the zero-shot offset is measured on
# The head's small matrices on cached tokens run fastest on one thread: an epoch of the lite benchmark
# took 27 s with one and 175 s with PyTorch's default two on a shared 2-core machine.
CACHED_CPU_THREADS = 1


@torch.no_grad()
def _set_zero_shot_offset(model, train_ds, d: _Data, o: TrainOptions, emb, device, workers) -> None:
    """The zero-shot term's reference feature, from the training images (eval transform), before the
    first epoch: it depends on the images and the trained labels' embeddings only."""
    n = min(len(d.train_rows), OFFSET_IMAGES)
    if o.cached_tokens:
        ds = torch.utils.data.Subset(train_ds, range(n))
    else:
        ds = _images(d, d.train_rows[:n], d.trained, eval_transform(model.backbone.preprocess))
    feats = []
    for inputs, _ in _loader(ds, o.batch_size, None, workers, 0, device):
        inputs = inputs.to(device)
        if not o.cached_tokens:
            with autocast(device, o.amp):
                inputs = model.image_tokens(inputs)
        feats.append(model.zero_shot_features(inputs.float()).cpu())
    if feats:
        model.set_zero_shot_offset(torch.cat(feats), emb.cpu())


def _validate(model, val_ds, transfer_ds, train_ds, emb, d: _Data, o: TrainOptions, device, workers,
              progress) -> dict | None:
    """Score the validation split (and the held-out concepts), fit the zero-shot weight, and set it on
    the head; the record, or None without a validation split (then the weight is the scale-matching
    one, on training images)."""
    def parts(ds, labels_emb, desc):
        return predict_parts(model, _loader(ds, o.batch_size, None, workers, 0, device), labels_emb, device,
                             from_tokens=o.cached_tokens, amp=o.amp, progress=progress, desc=desc)

    if len(val_ds):
        trained = parts(val_ds, emb[:len(d.trained)], "validating")
        held_out = parts(transfer_ds, emb[len(d.trained):], "held-out concepts") if len(transfer_ds) else None
        val = validate(trained, held_out, d.topk)
        weight = val.get("zero_shot_weight")
    else:
        val, weight = None, None
        if model.zero_shot:
            sample = torch.utils.data.Subset(train_ds, range(min(len(train_ds), 512)))
            head, zs, _ = predict_parts(model, _loader(sample, o.batch_size, None, workers, 0, device),
                                        emb[:len(d.trained)], device, from_tokens=o.cached_tokens, amp=o.amp)
            weight = scale_weight(head, zs)
    if weight is not None:
        model.head.zero_shot_weight.fill_(weight)
    return val


def train(options: TrainOptions | None = None, resume: str | Path | None = None,
          overrides: dict | None = None, progress: bool = True, log=print) -> dict:
    """Run (or resume) a training run. Returns the final summary (also the last metrics record)."""
    run = _open_run(options, resume, overrides)
    _check_options(run.o)
    d = _read_data(run, progress, log)
    device = resolve_device(run.o.device)
    threads = run.o.threads or (CACHED_CPU_THREADS if device.type == "cpu" and run.o.cached_tokens else None)
    with _torch_threads(threads):
        return _run_epochs(run, d, device, progress, log)


@contextmanager
def _torch_threads(n: int | None):
    """torch's CPU threads set to n (when given) for the run, and given back after it."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_epochs(run: _Run, d: _Data, device: torch.device, progress: bool, log) -> dict:
    o, out = run.o, run.out
    model = _build_model(o, device)
    out.mkdir(parents=True, exist_ok=True)  # only now: bad input leaves no half-made run directory
    embedder = LabelEmbedder(model.backbone, d.templates, cache_dir=o.label_cache or out / "label_cache")
    emb = embedder(d.trained + d.held_out).to(device)  # rows [:len(trained)] are the trained labels
    train_ds, val_ds, transfer_ds, workers = _datasets(model, d, o, out, device, progress)
    loss_fn = get_loss(o.loss)

    optimizer = torch.optim.AdamW(model.head.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=PLATEAU_FACTOR,
                                                           patience=o.plateau_patience)
    metrics_path = out / "metrics.jsonl"
    if run.state is not None:
        model.head.load_state_dict(run.head)
        optimizer.load_state_dict(run.state["optimizer"])
        scheduler.load_state_dict(run.state["scheduler"])
        set_rng_state(run.state["rng"])
        # Records of an epoch that was running when the run stopped are dropped; it runs again. So is
        # a half-written line (a kill while the record was being appended).
        if metrics_path.is_file():
            kept = [ln for ln in metrics_path.read_text().splitlines() if _epoch_of(ln, run.start_epoch)]
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
        log(f"resuming {out} after epoch {run.start_epoch} (best validation score {run.best_score:.4f})")
    else:
        metrics_path.write_text("")
        if model.zero_shot:
            _set_zero_shot_offset(model, train_ds, d, o, emb[:len(d.trained)], device, workers)
    _write_run_json(out, o, model.config, d, device)

    best_score = run.best_score
    summary: dict = {"epoch": run.start_epoch, "best_score": best_score}
    for epoch in range(run.start_epoch, o.epochs):
        t0 = time.time()
        torch.manual_seed(epoch_seed(o.seed, epoch, 0))  # dropout and in-process augmentation
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(
            epoch_seed(o.seed, epoch, 1))).tolist()
        loader = _loader(train_ds, o.batch_size, order, workers, epoch_seed(o.seed, epoch, 2), device)
        train_loss = _train_epoch(model, loader, emb[:len(d.trained)], loss_fn, optimizer, o, device, epoch, progress)
        val = _validate(model, val_ds, transfer_ds, train_ds, emb, d, o, device, workers, progress)
        score = val["score"] if val else float(epoch)  # no validation split: best.pt is the latest epoch
        if val:
            scheduler.step(score)
        improved = score > best_score
        best_score = max(best_score, score)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"], "val": val,
                  "val_score": score if val else None, "best": improved, "seconds": round(time.time() - t0, 2)}
        if model.zero_shot:
            record["zero_shot_weight"] = float(model.head.zero_shot_weight)
        _save_epoch(out, model, d, o, record, best_score, optimizer, scheduler, improved)
        val_text = (f", val score {score:.4f} (trained mAP {val['trained']['map']:.4f}"
                    + (f", held-out mAP {val['held_out']['map']:.4f}" if "held_out" in val else "") + ")") if val else ""
        weight_text = f", zero-shot weight {record['zero_shot_weight']:.3g}" if model.zero_shot else ""
        log(f"epoch {epoch + 1}/{o.epochs}: loss {train_loss:.4f}{val_text}{weight_text}"
            f"{' (best)' if improved else ''} [{record['seconds']:.1f}s]")
        summary = {**record, "best_score": best_score}
    return summary


def _write_run_json(out: Path, o: TrainOptions, cfg, d: _Data, device) -> None:
    (out / "run.json").write_text(json.dumps({
        "options": o.to_dict(), "model": cfg.to_dict(), "seen": len(d.seen), "unseen": len(d.unseen),
        "trained": len(d.trained), "held_out_concepts": d.held_out, "held_out_images": len(d.transfer_rows),
        "train_images": len(d.train_rows), "val_images": len(d.val_rows), "skipped_lines": len(d.manifest.skipped),
        "device": str(device),
        "validation_score": f"mAP + sum of F1@{list(d.topk)} on the trained labels"
                            + (" + the same on the held-out concepts" if d.held_out else ""),
    }, indent=2))


def _save_epoch(out: Path, model, d: _Data, o: TrainOptions, record: dict, best_score: float, optimizer,
                scheduler, improved: bool) -> None:
    """best.pt when the score improved, the metrics line, then last.pt (with what --resume needs)."""
    light = {"epoch": record["epoch"], "val_score": record["val_score"], "options": o.to_dict(),
             "held_out": d.held_out}
    if improved:
        save_checkpoint(out / "best.pt", model, d.seen, d.unseen, d.templates, train_state=light)
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(json_safe(record)) + "\n")
    save_checkpoint(out / "last.pt", model, d.seen, d.unseen, d.templates, train_state={
        **light, "best_score": best_score, "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": rng_state(), "manifest_sha256": d.manifest_sha,
    })


def _epoch_of(line: str, done: int) -> bool:
    """Whether a metrics.jsonl line is a whole record of an epoch <= `done`."""
    try:
        rec = json.loads(line)
        return isinstance(rec, dict) and int(rec["epoch"]) <= done
    except (ValueError, KeyError, TypeError):
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
