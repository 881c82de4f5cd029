"""Prometheus metrics, in a registry of the app's own (never the process-global one), so that
several apps in one process (the tests) count apart.

``Metrics.render()`` is what ``GET /metrics`` answers. Names, with their labels::

    ditcache_http_requests_total{route,method,status}          requests answered
    ditcache_http_request_duration_seconds{route,method}       latency of whole requests
    ditcache_generations_total{model,method,outcome}           outcome: ok, reused or the exception's name
    ditcache_generation_stage_seconds{model,stage}             queue_wait, text_encoding, denoising,
                                                                decoding, pipeline_overhead,
                                                                encoding, total
    ditcache_denoising_steps_total{model,method,result}        result: computed or cached
    ditcache_transformer_blocks_total{model,method,result}     result: computed or reused
    ditcache_attention_total{model,method,result}              result: computed or reused
    ditcache_cache_peak_bytes{model,method}                    per generation: the most its cache
                                                                state held at once (histogram)
    ditcache_cache_peak_bytes_max{model,method}                the largest of those so far
    ditcache_compile_seconds{model}                            --compile: warm-up (compile) time
    ditcache_prompt_cache_total{model,result}                  prompt encodings: hit or miss
    ditcache_prompt_cache_bytes{model,replica}                 memory of the prompt embeddings kept
    ditcache_result_cache_bytes                                memory of the whole results kept
    ditcache_trajectory_cache_bytes{model,replica}             memory of the trajectories kept
    ditcache_trajectory_steps_skipped_total{model}             denoising steps skipped by resuming a trajectory
    ditcache_queue_depth{model}                                requests waiting
    ditcache_jobs_in_flight{model}                             generations running (0 or 1)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from cache_engine import SessionStats
from server.models.stages import StageTimings

# From a tiny model on a CPU (milliseconds) to a large video model on a GPU (many minutes).
# Cache state: from a tiny model's kilobytes to a video model's tens of gigabytes, by powers of 4.
_BYTES = tuple(float(1024 * 4**power) for power in range(14))
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Watched(Protocol):
    """What the gauges read from a worker."""

    @property
    def queue_depth(self) -> int: ...

    @property
    def busy(self) -> int: ...


class SizedCache(Protocol):
    """What the prompt cache's gauge reads."""

    @property
    def bytes(self) -> int: ...


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "ditcache_http_requests",
            "HTTP requests answered",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "ditcache_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response",
            ["route", "method"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.generations = Counter(
            "ditcache_generations", "Generations ended", ["model", "method", "outcome"], registry=registry
        )
        self.stage_seconds = Histogram(
            "ditcache_generation_stage_seconds",
            "Time per stage of a successful generation",
            ["model", "stage"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.steps = Counter(
            "ditcache_denoising_steps", "Denoising steps", ["model", "method", "result"], registry=registry
        )
        self.blocks = Counter(
            "ditcache_transformer_blocks",
            "Transformer block calls computed or answered from the cache",
            ["model", "method", "result"],
            registry=registry,
        )
        self.attention = Counter(
            "ditcache_attention",
            "Attention calls computed or answered from the cache",
            ["model", "method", "result"],
            registry=registry,
        )
        self.merged_batch = Histogram(
            "ditcache_merged_batch_size",
            "Requests in each merged transformer forward (a block) of a model copy "
            "serving with max_batch above 1; 1: it ran alone",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=registry,
        )
        self.cache_peak_bytes = Histogram(
            "ditcache_cache_peak_bytes",
            "Most memory a generation's cache state held at once",
            ["model", "method"],
            buckets=_BYTES,
            registry=registry,
        )
        self.cache_peak_bytes_max = Gauge(
            "ditcache_cache_peak_bytes_max",
            "Largest cache state a generation held so far: what one more concurrent request may need",
            ["model", "method"],
            registry=registry,
        )
        self.compile_seconds = Gauge(
            "ditcache_compile_seconds",
            "Time the compiled model's warm-up took at load (compilation included)",
            ["model"],
            registry=registry,
        )
        self.prompt_cache = Counter(
            "ditcache_prompt_cache",
            "Prompt encodings answered from the prompt cache (hit) or computed (miss)",
            ["model", "result"],
            registry=registry,
        )
        self.prompt_cache_bytes = Gauge(
            "ditcache_prompt_cache_bytes",
            "Memory the prompt embeddings kept across requests take",
            ["model", "replica"],
            registry=registry,
        )
        self.result_cache_bytes = Gauge(
            "ditcache_result_cache_bytes",
            'Memory the whole results kept for "reuse": "exact" take',
            registry=registry,
        )
        self.trajectory_cache_bytes = Gauge(
            "ditcache_trajectory_cache_bytes",
            'Memory the trajectories kept for "reuse": {"similar": ...} take, per model copy',
            ["model", "replica"],
            registry=registry,
        )
        self.trajectory_steps_skipped = Counter(
            "ditcache_trajectory_steps_skipped",
            "Denoising steps skipped by starting from a similar earlier prompt's trajectory",
            ["model"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "ditcache_queue_depth", "Requests waiting", ["model", "replica"], registry=registry
        )
        self.in_flight = Gauge(
            "ditcache_jobs_in_flight", "Generations running", ["model", "replica"], registry=registry
        )
        # Gauges that hold a running maximum: a read and a set that must not interleave with another's.
        self._lock = threading.Lock()
        self._peak_bytes: dict[tuple[str, str], int] = {}
        self._compile_seconds: dict[str, float] = {}

    def watch_worker(self, model: str, replica: str, worker: Watched) -> None:
        """Gauges read from the worker when scraped, so they can never drift from it."""
        self.queue_depth.labels(model, replica).set_function(lambda: worker.queue_depth)
        self.in_flight.labels(model, replica).set_function(lambda: worker.busy)

    def watch_result_cache(self, cache: SizedCache) -> None:
        self.result_cache_bytes.set_function(lambda: cache.bytes)

    def watch_prompt_cache(self, model: str, replica: str, cache: SizedCache) -> None:
        self.prompt_cache_bytes.labels(model, replica).set_function(lambda: cache.bytes)

    def watch_trajectories(self, model: str, replica: str, store: SizedCache) -> None:
        self.trajectory_cache_bytes.labels(model, replica).set_function(lambda: store.bytes)

    def merged_run(self, model: str) -> Callable[[int], None]:
        """What a model copy's batcher tells of each forward it runs: the requests in it."""
        histogram = self.merged_batch.labels(model)
        return histogram.observe

    def steps_skipped(self, model: str, steps: int) -> None:
        self.trajectory_steps_skipped.labels(model).inc(steps)

    def prompt_encodings(self, model: str, hits: int, misses: int) -> None:
        self.prompt_cache.labels(model, "hit").inc(hits)
        self.prompt_cache.labels(model, "miss").inc(misses)

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route, method).observe(seconds)

    def generation_done(
        self, model: str, method: str, outcome: str, timings: StageTimings | None, stats: SessionStats | None
    ) -> None:
        """``outcome`` is "ok" or the name of the exception that ended the generation."""
        self.generations.labels(model, method, outcome).inc()
        if timings is not None:
            for stage, ms in timings.stages().items():
                self.stage_seconds.labels(model, stage).observe(ms / 1000)
        if stats is not None:
            for counter, computed, reused, reused_name in (
                (self.steps, stats.steps_computed, stats.steps_cached, "cached"),
                (self.blocks, stats.blocks_computed, stats.blocks_reused, "reused"),
                (self.attention, stats.attention_computed, stats.attention_reused, "reused"),
            ):
                counter.labels(model, method, "computed").inc(computed)
                counter.labels(model, method, reused_name).inc(reused)
            self.cache_peak_bytes.labels(model, method).observe(stats.peak_bytes)
            with self._lock:
                largest = self._peak_bytes.get((model, method), 0)
                self._peak_bytes[(model, method)] = max(largest, stats.peak_bytes)
                self.cache_peak_bytes_max.labels(model, method).set(self._peak_bytes[(model, method)])

    def model_compiled(self, model: str, seconds: float) -> None:
        """A compiled model's warm-up time; the slowest replica's, when a model has several."""
        with self._lock:
            self._compile_seconds[model] = max(self._compile_seconds.get(model, 0.0), seconds)
            self.compile_seconds.labels(model).set(self._compile_seconds[model])

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
