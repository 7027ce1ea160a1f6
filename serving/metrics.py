"""Prometheus metrics of one `qks-serve` (its own registry, served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qks_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.latency = Histogram("qks_request_seconds", "HTTP request time, by route", ["path"], registry=r)
        self.images = Counter("qks_images", "images tagged", registry=r)
        self.batch_images = Histogram("qks_batch_images", "images per engine run (micro-batching)",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.engine_seconds = Histogram("qks_engine_seconds", "engine time per run", registry=r)
        self.rejected = Counter("qks_rejected", "requests refused before the engine, by reason", ["reason"], registry=r)
        self.queue_images = Gauge("qks_queue_images", "images waiting for the engine", registry=r)
        self.in_flight = Gauge("qks_in_flight_requests", "requests being handled", registry=r)
        self.banks = Gauge("qks_label_banks", "label banks held", registry=r)

    def on_batch(self, images: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.engine_seconds.observe(seconds)
