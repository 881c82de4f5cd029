"""The request path's own cost: ``python -m benchmarks.request_path``.

Starts ``python -m server serve`` in a subprocess on a free loopback port (``shapes-flux`` by default)
and sends ``--requests`` requests one at a time (4 steps, 64x64 by default), each answered as JSON, then
as raw media. Per request it takes:

- ``wall``: the client's time from sending the request to having read the whole answer;
- ``stages``: the sum of the answer's stages (``timings``, without ``total``), which add up to
  ``total``, the server's time from the request's receipt to its encoded media;
- ``http``: the server's time for the whole HTTP request, from the access middleware (the increase of
  ``ditcache_http_request_duration_seconds_sum`` for the route, read from ``/metrics`` after each
  request; requests never overlap).

and prints the medians and 90th percentiles of ``wall``, ``stages``, the request path's own cost
(``wall - stages``), and where that cost is (``http - stages``: the app's routing, body validation and
the answer's serialisation; ``wall - http``: uvicorn, the loopback and the client). For the whole of
what the server adds around the pipeline's run, it also prints ``queue_wait`` (on an idle server: the
request checked against its model and handed to the worker thread), ``encoding`` (the media) and
``wall`` less the pipeline's run. The first
``--warm-up`` requests are not counted. Exit status 0 when the median own cost of the JSON answers is
within ``--target-ms``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.load import start_server, stop_server

_ROUTE = "/v1/generations"


@dataclass(frozen=True)
class Sample:
    wall_ms: float
    # The answer's stages, ``total`` left out.
    stages: dict[str, float]
    total_ms: float
    http_ms: float

    @property
    def stages_ms(self) -> float:
        return sum(self.stages.values())

    @property
    def pipeline_ms(self) -> float:
        """The pipeline's run: every stage but the queue wait and the media's encoding."""
        return sum(ms for name, ms in self.stages.items() if name not in ("queue_wait", "encoding"))


def _http_seconds(client: httpx.Client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if (
                sample.name == "ditcache_http_request_duration_seconds_sum"
                and sample.labels.get("route") == _ROUTE
                and sample.labels.get("method") == "POST"
            ):
                return float(sample.value)
    return 0.0


def _stages_of(response: httpx.Response) -> tuple[dict[str, float], float]:
    """The stages and ``total``, from the JSON body or the ``Server-Timing`` header."""
    if response.headers["content-type"].startswith("application/json"):
        timings: dict[str, Any] = response.json()["timings"]
        stages = {name: value for name, value in timings.items() if name != "denoising_steps"}
    else:
        stages = {}
        for part in response.headers["server-timing"].split(","):
            name, _, duration = part.strip().partition(";dur=")
            stages[name] = float(duration)
    total = stages.pop("total")
    return stages, total


def measure(client: httpx.Client, body: dict[str, Any], accept: str, count: int) -> list[Sample]:
    samples = []
    http_before = _http_seconds(client)
    for index in range(count):
        started = time.perf_counter()
        response = client.post(_ROUTE, json={**body, "seed": index}, headers={"Accept": accept})
        response.read()
        wall = time.perf_counter() - started
        response.raise_for_status()
        http_after = _http_seconds(client)
        stages, total = _stages_of(response)
        samples.append(Sample(wall * 1000, stages, total, (http_after - http_before) * 1000))
        http_before = http_after
    return samples


def _quantiles(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def report(name: str, samples: Sequence[Sample]) -> float:
    """Print one table row per measure; returns the median own cost."""
    rows = {
        "wall": [s.wall_ms for s in samples],
        "stages (sum)": [s.stages_ms for s in samples],
        "total": [s.total_ms for s in samples],
        "stages off total (%)": [100 * abs(s.stages_ms - s.total_ms) / s.total_ms for s in samples],
        "own cost: wall - stages": [s.wall_ms - s.stages_ms for s in samples],
        "  app: http - stages": [s.http_ms - s.stages_ms for s in samples],
        "  uvicorn, loopback, client: wall - http": [s.wall_ms - s.http_ms for s in samples],
        "stage queue_wait (receipt to worker)": [s.stages["queue_wait"] for s in samples],
        "stage pipeline_overhead": [s.stages.get("pipeline_overhead", 0.0) for s in samples],
        "stage encoding (media)": [s.stages["encoding"] for s in samples],
        "around the pipeline: wall - pipeline run": [s.wall_ms - s.pipeline_ms for s in samples],
    }
    print(f"\n{name} ({len(samples)} requests)")
    print(f"| {'measure':<42} | median ms | p90 ms |")
    print(f"| {'-' * 42} | --------: | -----: |")
    for label, values in rows.items():
        median, p90 = _quantiles(values)
        print(f"| {label:<42} | {median:9.2f} | {p90:6.2f} |")
    return statistics.median(rows["own cost: wall - stages"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-flux")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warm-up", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--target-ms", type=float, default=5.0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)

    body = {
        "model": args.model,
        "prompt": "a small red circle at the left on a blue background",
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
    }
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.cache_dir or Path(scratch)
        process, base_url = start_server(cache_dir, 4, args.torch_threads, models=[args.model])
        try:
            with httpx.Client(base_url=base_url, timeout=120) as client:
                measure(client, body, "application/json", args.warm_up)
                as_json = measure(client, body, "application/json", args.requests)
                raw = measure(client, body, "image/png", args.requests)
        finally:
            stop_server(process)
    print(f"{args.model}, {args.steps} steps, {args.size}x{args.size}, one request at a time")
    own = report("JSON answer (base64 media)", as_json)
    report("raw media (Accept: image/png)", raw)
    met = own <= args.target_ms
    print(
        f"\nmedian own cost of the JSON answers: {own:.2f} ms (target {args.target_ms:g} ms: {'met' if met else 'NOT met'})"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
