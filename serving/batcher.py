"""Micro-batching: images from concurrent requests run through the image engine together.

One worker thread owns the engine. It takes the oldest waiting request, then keeps taking more for
at most `max_wait_s` or until `max_batch` images are gathered, runs them as engine batches of at
most `max_batch` images, and hands each request its rows of query features. The queue is bounded
in images: a request that would overfill it is refused at once (`Overloaded`: the HTTP layer
answers 503 with Retry-After), never left to hang. A request whose caller gave up (timeout,
disconnect) is cancelled and skipped if it has not started. `flush()` (the server is stopping)
ends the waiting: what is queued runs now. `close()` drains: everything already queued still
runs, then the worker ends.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

_FLUSH = object()  # wakes a worker waiting for company: run what is there


class Overloaded(RuntimeError):
    """The queue is full (or closing); one line."""


@dataclass
class _Job:
    pixels: np.ndarray  # [n, 3, S, S]
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """`await submit(pixels)` -> query features [n, Nq, D], run with other requests' images."""

    def __init__(self, run, *, max_batch: int, max_wait_s: float, max_queue: int, on_batch=None):
        self._run = run  # pixels [B, 3, S, S] -> query features [B, ...]; B <= max_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._on_batch = on_batch or (lambda images, seconds: None)
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0  # images queued, not yet running
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="qks-batcher", daemon=True)
        self._thread.start()

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        n = len(pixels)
        with self._lock:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if self.waiting + n > self.max_queue:
                raise Overloaded(f"the queue is full ({self.waiting} images waiting, limit {self.max_queue})")
            self.waiting += n
            job = _Job(pixels)
            self._q.put(job)
        return await asyncio.wrap_future(job.future)  # cancelling this cancels the job if not started

    def flush(self) -> None:
        """Stop waiting for company from now on (shutting down): queued requests run at once."""
        self.max_wait_s = 0.0
        self._q.put(_FLUSH)

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the worker."""
        with self._lock:
            self._closed = True
            self._q.put(None)
        self._thread.join(timeout)

    # -- the worker thread ---------------------------------------------------------------------------

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, n = [first], len(first.pixels)
        deadline = time.monotonic() + self.max_wait_s
        while n < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if job is None:  # closing: run what we have, then stop
                return jobs, True
            if job is _FLUSH:
                break
            jobs.append(job)
            n += len(job.pixels)
        return jobs, False

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._q.get()
            if first is None:
                return
            if first is _FLUSH:
                continue
            jobs, stop = self._gather(first)
            with self._lock:
                self.waiting -= sum(len(j.pixels) for j in jobs)
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if live:
                self._run_jobs(live)

    def _run_jobs(self, jobs: list[_Job]) -> None:
        try:
            pixels = np.concatenate([j.pixels for j in jobs]) if len(jobs) > 1 else jobs[0].pixels
            outs = []
            for i in range(0, len(pixels), self.max_batch):
                t0 = time.perf_counter()
                outs.append(self._run(pixels[i:i + self.max_batch]))
                self._on_batch(len(outs[-1]), time.perf_counter() - t0)
            qf = outs[0] if len(outs) == 1 else np.concatenate(outs)
        except BaseException as e:  # the engine failed: every request of this batch gets the error
            for j in jobs:
                j.future.set_exception(e)
            return
        start = 0
        for j in jobs:
            j.future.set_result(qf[start:start + len(j.pixels)])
            start += len(j.pixels)
