"""What `qks-serve` serves, without HTTP: a bundle's image engine behind the micro-batcher, its label
banks (and banks added while serving), and requests turned into `qks-infer`'s records.

The pieces are the runtime's own: `select_backend` picks the engine, `Preprocess.load` decodes,
`LabelBank` loads or encodes labels, and `RecordBuilder.records` makes the records, so an image
gets here the record qks-infer writes for it. Every refusal is a `ServeError` with the HTTP status
that answers it and a one-line reason.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.infer import RecordBuilder, public_record
from ..runtime.labels import BANK_NAME, LabelBank
from .batcher import MicroBatcher, Overloaded


class ServeError(Exception):
    """A request that cannot be answered: HTTP `status` and a one-line reason."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how long it may take."""

    max_images: int = 64  # images per request
    max_upload_bytes: int = 32 << 20  # a request's body
    max_pixels: int = 40_000_000  # one image's width x height, read from its header
    max_labels: int = 1000  # labels in a request's `labels` or a PUT bank
    max_label_chars: int = 200
    max_banks: int = 64  # banks held at once (the bundle's and those PUT)
    timeout_s: float = 30.0  # per request: reading, decoding, label encoding, queue and engine
    max_in_flight: int = 64  # tag requests handled at once (bodies held in memory); beyond: 503


@dataclass(frozen=True)
class ServeConfig:
    bundle: Path
    bank: str | None = None  # the default bank (None: the bundle's default)
    backend: str = "auto"
    precision: str = "auto"
    threads: int | None = None  # ONNX Runtime intra-op threads
    verify: bool = True  # sha256 of the bundle's files at start
    max_batch: int = 16  # images per engine run
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # images waiting for the engine; beyond: 503
    decode_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    label_cache: int = 32  # request label lists kept encoded in memory
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class TagOptions:
    labels: list[str] | None = None
    bank: str | None = None
    top_k: int | None = None
    threshold: float | None = None
    all_scores: bool = False


class Service:
    """The loaded bundle, engine, batcher and banks; `await tag(images, options)` -> records."""

    def __init__(self, config: ServeConfig):
        from PIL import Image

        from ..runtime.backend import select_backend
        from ..runtime.bundle import Bundle

        self.config, self.limits = config, config.limits
        Image.MAX_IMAGE_PIXELS = self.limits.max_pixels  # Preprocess.load refuses bigger images from the header
        self.bundle = Bundle.load(config.bundle, verify=config.verify)
        self.engine, self.backend_reason = select_backend(self.bundle, config.backend, threads=config.threads,
                                                          precision=config.precision)
        try:
            self.banks: dict[str, LabelBank] = {n: LabelBank.from_bundle(self.bundle, n) for n in self.bundle.banks}
            self.default_bank = config.bank or self.bundle.default_bank()
            if self.default_bank not in self.banks:
                raise ServeError(400, f"the bundle has no label bank {self.default_bank!r} "
                                      f"(it has: {', '.join(sorted(self.banks)) or 'none'})")
        except BaseException:
            self.engine.close()
            raise
        self._label_engine = None
        self._label_lock = threading.Lock()
        self._request_banks: OrderedDict[tuple, LabelBank] = OrderedDict()
        self.decode_pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="qks-decode")
        self.label_pool = ThreadPoolExecutor(1, thread_name_prefix="qks-labels")  # one label encoder at a time
        self.in_name, self.out_name = self.engine.inputs[0].name, self.engine.outputs[0].name
        self.on_batch = None  # set by the app: (images, seconds) of every engine run
        self.batcher = MicroBatcher(self._run_engine, max_batch=config.max_batch,
                                    max_wait_s=config.max_wait_ms / 1000, max_queue=config.max_queue,
                                    on_batch=lambda n, s: self.on_batch and self.on_batch(n, s))

    def _run_engine(self, pixels: np.ndarray) -> np.ndarray:
        return self.engine.run({self.in_name: pixels})[self.out_name]

    def close(self) -> None:
        """Drain the batcher (queued requests still run), then free the engines."""
        self.batcher.close()
        self.decode_pool.shutdown(wait=True)
        self.label_pool.shutdown(wait=True)
        self.engine.close()
        if self._label_engine is not None:
            self._label_engine.close()

    # -- label banks ---------------------------------------------------------------------------------

    def check_labels(self, labels) -> list[str]:
        """A request's label list: strings, trimmed, non-empty, repeated ones kept once, within the limits."""
        if not isinstance(labels, list) or not labels:
            raise ServeError(400, "labels must be a non-empty list of label texts")
        names, seen = [], set()
        for i, label in enumerate(labels):
            if not isinstance(label, str):
                raise ServeError(400, f"labels[{i}] is not a string")
            label = label.strip()
            if not label:
                raise ServeError(400, f"labels[{i}] is empty")
            if len(label) > self.limits.max_label_chars:
                raise ServeError(413, f"labels[{i}] is longer than {self.limits.max_label_chars} characters")
            if "\n" in label or "\r" in label:
                raise ServeError(400, f"labels[{i}] holds a line break (one label per item)")
            try:
                label.encode("utf-8")
            except UnicodeEncodeError:
                raise ServeError(400, f"labels[{i}] is not valid Unicode (a lone surrogate)") from None
            if label not in seen:
                seen.add(label)
                names.append(label)
        if len(names) > self.limits.max_labels:
            raise ServeError(413, f"{len(names)} labels; at most {self.limits.max_labels} per request")
        return names

    def _encode(self, names: list[str]) -> LabelBank:
        from ..runtime.labels import label_engine

        with self._label_lock:
            if self._label_engine is None:
                self._label_engine = label_engine(self.bundle, "cpu", self.config.threads)
            return LabelBank.for_labels(self.bundle, names, engine=self._label_engine)

    async def encode(self, names: list[str]) -> LabelBank:
        """The bank for new label text: the runtime's label graph (and its disk cache), off the event loop."""
        from ..engines.base import EngineError
        from ..runtime.labels import LabelError
        from ..runtime.manifest import BundleError

        try:
            return await asyncio.get_running_loop().run_in_executor(self.label_pool, self._encode, names)
        except (BundleError, LabelError, EngineError) as e:  # e.g. a bundle without a tokenizer
            raise ServeError(400, f"cannot encode these labels: {e}") from None

    async def request_bank(self, options: TagOptions) -> tuple[str, LabelBank]:
        if options.labels is not None:
            names = self.check_labels(options.labels)
            key = tuple(names)
            bank = self._request_banks.get(key)
            if bank is None:
                bank = await self.encode(names)
                self._request_banks[key] = bank
                while len(self._request_banks) > self.config.label_cache:
                    self._request_banks.popitem(last=False)
            self._request_banks.move_to_end(key)
            return "request", bank
        name = options.bank or self.default_bank
        bank = self.banks.get(name)  # one read: a bank swapped meanwhile serves the next request
        if bank is None:
            raise ServeError(404, f"no label bank {name!r} (banks: {', '.join(sorted(self.banks))})")
        return name, bank

    async def put_bank(self, name: str, labels) -> tuple[LabelBank, bool]:
        """Add or replace bank NAME while serving; requests already running keep the bank they read."""
        if not BANK_NAME.fullmatch(name):
            raise ServeError(400, "bank name: letters, digits, '_', '-', '.' (not first), at most 100 characters")
        if name not in self.banks and len(self.banks) >= self.limits.max_banks:
            raise ServeError(409, f"{len(self.banks)} banks held already (limit {self.limits.max_banks}); "
                                  "replace one instead")
        bank = await self.encode(self.check_labels(labels))
        replaced = name in self.banks
        self.banks[name] = bank
        return bank, replaced

    # -- images ----------------------------------------------------------------------------------------

    def decode(self, index: int, name: str, data: bytes) -> np.ndarray:
        """One uploaded file -> pixels, as qks-infer decodes it; ServeError naming the image otherwise.
        More pixels than `max_pixels` (PIL.Image.MAX_IMAGE_PIXELS, set at start) is refused from the
        header, before any pixel is decoded: a decompression bomb costs nothing."""
        from ..runtime.preprocess import PreprocessError

        where = f"image {index + 1} ({name})"
        if not data:
            raise ServeError(400, f"{where}: empty file (0 bytes)")
        try:
            return self.bundle.preprocess.load(io.BytesIO(data))
        except PreprocessError as e:
            raise ServeError(413 if str(e).startswith("image too large") else 400, f"{where}: {e}") from None
        except Exception as e:  # a decoder bug is this request's error, not the server's
            raise ServeError(400, f"{where}: cannot decode image: {type(e).__name__}") from None

    async def tag(self, images: list[tuple[str, bytes]], options: TagOptions) -> dict:
        """Images (name, file bytes) -> {"bank", "labels", "results": qks-infer's records}."""
        loop = asyncio.get_running_loop()
        bank_name, bank = await self.request_bank(options)
        decoded = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, self.decode, i, name, data)
                                         for i, (name, data) in enumerate(images)), return_exceptions=True)
        errors = [e for e in decoded if isinstance(e, BaseException)]
        if errors:
            if not isinstance(errors[0], ServeError):
                raise errors[0]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ServeError(errors[0].status, errors[0].message + more)
        try:
            qf = await self.batcher.submit(np.stack(decoded))
        except Overloaded as e:
            raise ServeError(503, f"server busy: {e}; retry later", {"Retry-After": "1"}) from None
        items = [(name, arr, None) for (name, _), arr in zip(images, decoded, strict=True)]
        build = RecordBuilder(self.engine, bank, self.bundle.scoring, top_k=options.top_k,
                              threshold=options.threshold, all_scores=options.all_scores)
        records = [public_record(r) for r in build.records(items, qf)]
        return {"bank": bank_name, "labels": len(bank), "results": records}
