"""Prometheus metrics of ``msa-fast serve`` (``GET /metrics``, prometheus_client's text format).

- ``msa_fast_requests_total{endpoint, status}``: answered requests by endpoint and HTTP status;
- ``msa_fast_request_seconds{endpoint}``: latency from the request's first byte to its answer;
- ``msa_fast_batch_size``: samples per Predictor call;
- ``msa_fast_queue_depth``: requests waiting for the worker thread (sampled at each scrape).

A registry of its own rather than the process-global one, so that importing the module twice
(tests) or another library's metrics never collide. With ``--workers N`` every process keeps its
own metrics and a scrape reaches one of them (the kernel picks; label-free aggregation belongs
to the scraper).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    def __init__(self, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("msa_fast_requests", "Answered requests", ("endpoint", "status"),
                                registry=self.registry)
        self.latency = Histogram("msa_fast_request_seconds", "Request latency (seconds)", ("endpoint",),
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("msa_fast_batch_size", "Samples per Predictor call",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("msa_fast_queue_depth", "Requests waiting for the model",
                                 registry=self.registry)
        self.queue_depth.set_function(queue_depth)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["ServeMetrics"]
