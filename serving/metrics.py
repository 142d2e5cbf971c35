"""Prometheus metrics with TF Serving's names, plus the embedded server's extensions.

TF Serving's metric ``/tensorflow/serving/request_count`` is exported as
``:tensorflow:serving:request_count`` (every character outside [a-zA-Z0-9_] becomes ':'). Latencies
are histograms in microseconds, as in TF Serving. Each server owns its registry, so several servers
(or tests) can live in one process.

Extensions (not in TF Serving): ``carclf_serving_request_latency_by_version`` (per model version),
``carclf_serving_inflight_requests`` and ``carclf_serving_model_version_state``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import Metric

from carclf.errors import CarClfError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exponential_buckets(scale: float, growth: float, count: int) -> tuple[float, ...]:
    """``scale * growth**k`` for k < count, each held at the six significant digits TF Serving prints.

    TF Serving writes a bucket's ``le`` with absl's StrCat (``le="32.4"``); the exact products would be
    exported as ``le="32.400000000000006"``."""
    return tuple(float(f"{scale * growth ** k:.6g}") for k in range(count))


# TF Serving's request latency buckets: exponential, 10 us * 1.8^k, 33 buckets.
LATENCY_BUCKETS_US = exponential_buckets(10, 1.8, 33)
# batching_session queuing latency: 100 us * 1.2^k, 52 buckets.
QUEUE_BUCKETS_US = exponential_buckets(100, 1.2, 52)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)


def exported_name(tf_name: str) -> str:
    """'/tensorflow/serving/request_count' -> ':tensorflow:serving:request_count'."""
    return "".join(c if c.isalnum() or c == "_" else ":" for c in tf_name)


class _ExactCounter:
    """A counter exported under its exact name (prometheus_client would append ``_total``)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = defaultdict(float)
        self._lock = threading.Lock()
        registry.register(self)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[tuple(labels)] += amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(labels), 0.0)

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, "unknown")
        with self._lock:
            for labels, value in self._values.items():
                metric.add_sample(self.name, dict(zip(self.labelnames, labels, strict=True)), value)
        yield metric

    def describe(self) -> Iterator[Metric]:
        yield Metric(self.name, self.documentation, "unknown")


class ServingMetrics:
    """Every metric the server records; one instance per server."""

    def __init__(self) -> None:
        disable_created_metrics()  # TF Serving exports no *_created series
        self.registry = registry = CollectorRegistry()
        n = exported_name
        self.request_count = _ExactCounter(
            n("/tensorflow/serving/request_count"), "The total number of requests.", ["model_name", "status"],
            registry)
        self.request_latency = Histogram(
            n("/tensorflow/serving/request_latency"), "Distribution of wall time (in microseconds) for Tensorflow "
            "Serving request.", ["model_name", "API", "entrypoint"], buckets=LATENCY_BUCKETS_US, registry=registry)
        self.runtime_latency = Histogram(
            n("/tensorflow/serving/runtime_latency"), "Distribution of wall time (in microseconds) for Tensorflow "
            "runtime.", ["model_name", "API", "runtime"], buckets=LATENCY_BUCKETS_US, registry=registry)
        self.input_batch_size = Histogram(
            n("/tensorflow/serving/batching_session/input_batch_size"),
            "Tracks the batch size distribution on the inputs.", buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.processed_batch_size = Histogram(
            n("/tensorflow/serving/batching_session/processed_batch_size"),
            "Tracks the batch size distribution on processing.", buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.padding_size = Histogram(
            n("/tensorflow/serving/batching_session/padding_size"), "Tracks the padding size distribution on "
            "batches.", ["execution_batch_size"], buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.queuing_latency = Histogram(
            n("/tensorflow/serving/batching_session/queuing_latency"), "Distribution of wall time spent (in "
            "microseconds) in queuing", ["thread_pool_name"], buckets=QUEUE_BUCKETS_US, registry=registry)
        self.warmup_latency = Histogram(
            n("/tensorflow/serving/model_warmup_latency"), "Distribution of wall time (in microseconds) for "
            "warming up the model.", ["model_path", "status"], buckets=LATENCY_BUCKETS_US, registry=registry)
        self.warmup_records = _ExactCounter(
            n("/tensorflow/serving/model_warmup_records_read"), "Number of warmup records read.",
            ["model_path"], registry)
        # --- extensions ---
        self.version_latency = Histogram(
            "carclf_serving_request_latency_by_version", "Request wall time (microseconds) per model version "
            "(extension of the embedded server).", ["model_name", "model_version", "API", "entrypoint"],
            buckets=LATENCY_BUCKETS_US, registry=registry)
        self.inflight = Gauge("carclf_serving_inflight_requests", "Requests being answered now (extension).",
                              ["entrypoint"], registry=registry)
        self.version_state = Gauge("carclf_serving_model_version_state", "ModelVersionStatus.State code of "
                                   "each known version (extension).", ["model_name", "model_version"],
                                   registry=registry)
        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels: str):
        """``metric.labels(*labels)``, looked up once: prometheus_client checks and locks on every call, and a
        request records five labelled series."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children.setdefault(key, metric.labels(*labels))
        return found

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    @contextmanager
    def track(self, model_name: str, api: str, entrypoint: str) -> Iterator[dict]:
        """Time one request and count it by status; ``info["version"]`` may be set once it is known."""
        info: dict = {"version": None}
        start = time.perf_counter()
        status = "OK"
        inflight = self.child(self.inflight, entrypoint)
        inflight.inc()
        try:
            yield info
        except CarClfError as exc:
            status = exc.code
            raise
        except (asyncio.CancelledError, futures.CancelledError):
            status = "CANCELLED"
            raise
        except BaseException:
            status = "INTERNAL"
            raise
        finally:
            inflight.dec()
            micros = (time.perf_counter() - start) * 1e6
            model = info.get("model_name") or model_name
            self.request_count.inc(model, status)
            self.child(self.request_latency, model, api, entrypoint).observe(micros)
            if info["version"] is not None:
                self.child(self.version_latency, model, str(info["version"]), api, entrypoint).observe(micros)
