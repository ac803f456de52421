"""Prometheus metrics of one service instance, on its own registry (tests build many apps).

Names and labels are part of the ops contract (README "Metrics"); change them deliberately.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.request_seconds = Histogram(
            "sessionrec_request_seconds",
            "HTTP request latency by route template, method and status code",
            ["endpoint", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "sessionrec_batch_size",
            "requests per model step, by batcher (recommend / close)",
            ["batcher"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "sessionrec_queue_wait_seconds",
            "time a request waited in the micro-batcher queue",
            ["batcher"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "sessionrec_step_seconds",
            "model + index time of one batch on the compute worker",
            ["batcher"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.recommendations = Counter(
            "sessionrec_recommendations",
            "recommendations served, by degradation-ladder rung",
            ["source"],
            registry=r,
        )
        self.redis_errors = Counter(
            "sessionrec_redis_errors",
            "Redis calls that failed or passed their deadline, by operation",
            ["op"],
            registry=r,
        )
        self.sessions = Counter(
            "sessionrec_sessions",
            "closed sessions received, by result (appended / duplicate)",
            ["result"],
            registry=r,
        )
        self.cache_updates = Counter(
            "sessionrec_cache_updates",
            "K/V cache writes, by kind (appended / rebuilt / deferred / superseded)",
            ["kind"],
            registry=r,
        )
        self.overloaded = Counter(
            "sessionrec_overloaded", "requests shed because the queue was full", registry=r
        )
        self.reloads = Counter(
            "sessionrec_reloads", "generation reloads, by result", ["result"], registry=r
        )
        self.generation = Info(
            "sessionrec_generation", "the model version being served", registry=r
        )
        self.queue_depth = Gauge(
            "sessionrec_queue_depth", "requests waiting in the recommend batcher", registry=r
        )
