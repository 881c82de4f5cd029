"""Under load and bad input: limits, backpressure, deadlines, failures mid-run, auth, metrics, logs.

One server (tiny-flux only, a queue of one, tightened limits, an API key) serves the module. Where a
test needs the worker to be slow or to fail, it swaps the transformer's forward for a fake: nothing
a client can send makes a tiny model on a CPU run out of memory, or take a predictable time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from cache_engine.session import CacheSession, active_session
from server.logs import JsonFormatter, RequestIdFilter

from .conftest import LiveServer, b64_items, error_of, live_server, metric, wait_until

KEY = "k-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_STEPS = 40
MAX_BODY = 4096
SERVER_TIMEOUT_S = 60.0
GOOD = {"prompt": "a red circle", "steps": 3, "seed": 5}
CACHED = {**GOOD, "steps": 6, "cache": {"method": "first_block_cache", "threshold": 10.0}}


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(
        model_cache,
        models=["tiny-flux"],
        queue_size=1,
        model_limits={"tiny-flux": {"max_steps": MAX_STEPS, "max_width": 128, "max_pixels": 128 * 64}},
        max_body_bytes=MAX_BODY,
        request_timeout_s=SERVER_TIMEOUT_S,
        retry_after_s=3,
        api_key=KEY,
    )


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(headers=AUTH) as client:
        yield client


@contextmanager
def forward_replaced(
    server: LiveServer, make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """The tiny-flux transformer's forward replaced by ``make(original)`` inside the block."""
    generations = server.runtime.generations
    assert generations is not None
    transformer = generations.models["tiny-flux"].pipeline.transformer
    original = transformer.forward
    transformer.forward = make(original)
    try:
        yield
    finally:
        transformer.forward = original


@contextmanager
def gated(server: LiveServer) -> Iterator[threading.Event]:
    """Every transformer call waits for the event: the worker stays busy until the test lets go."""
    release = threading.Event()

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def wait_then_run(*args: Any, **kwargs: Any) -> Any:
            release.wait(60)
            return original(*args, **kwargs)

        return wait_then_run

    with forward_replaced(server, make):
        try:
            yield release
        finally:
            release.set()


# -- limits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "limit"),
    [
        ({**GOOD, "steps": MAX_STEPS + 1}, "steps", str(MAX_STEPS)),
        ({**GOOD, "width": 192}, "width", "128"),
        ({**GOOD, "width": 128, "height": 128}, "width", str(128 * 64)),
        ({**GOOD, "n": 9}, "n", "8"),
        ({**GOOD, "prompt": "x" * 1001}, "prompt", "1000"),
        ({**GOOD, "width": 8192, "height": 8192}, "width", "128"),
    ],
)
def test_over_a_limit_is_422_naming_the_field_and_the_limit(
    server: LiveServer, client: httpx.Client, body: dict[str, Any], field: str, limit: str
) -> None:
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 422
    error = error_of(response)
    assert error["param"] == field and limit in error["message"]
    assert server.queue_depths() == {"tiny-flux": 0}


def test_model_card_shows_the_configured_limits(client: httpx.Client) -> None:
    limits = client.get("/v1/models/tiny-flux").json()["limits"]
    assert (limits["max_steps"], limits["max_width"], limits["max_pixels"]) == (MAX_STEPS, 128, 128 * 64)
    assert limits["max_height"] == 256  # not overridden: the model's own


def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(client: httpx.Client) -> None:
    big = json.dumps({**GOOD, "prompt": "x" * MAX_BODY}).encode()
    declared = client.post("/v1/generations", content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413
    error = error_of(declared)
    assert error["code"] == "payload_too_large" and str(MAX_BODY) in error["message"]

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    streamed = client.post("/v1/generations", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413 and error_of(streamed)["code"] == "payload_too_large"
    assert client.post("/v1/generations", json=GOOD).status_code == 200


# -- backpressure -----------------------------------------------------------------------------------------


def test_a_full_queue_is_429_with_retry_after(server: LiveServer, client: httpx.Client) -> None:
    with gated(server) as release, ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/v1/generations", json=GOOD)
        wait_until(
            lambda: (
                server.runtime.generations is not None
                and server.runtime.generations.workers["tiny-flux"].busy == 1
            )
        )
        queued = pool.submit(client.post, "/v1/generations", json={**GOOD, "seed": 6})
        wait_until(lambda: server.queue_depths() == {"tiny-flux": 1})
        assert metric(client, "ditcache_queue_depth", model="tiny-flux") == 1
        assert metric(client, "ditcache_jobs_in_flight", model="tiny-flux") == 1
        full = client.post("/v1/generations", json={**GOOD, "seed": 7})
        job = client.post("/v1/jobs", json={**GOOD, "seed": 8})
        release.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
    for refused in (full, job):
        assert refused.status_code == 429
        assert error_of(refused)["code"] == "queue_full"
        assert refused.headers["retry-after"] == "3"


# -- deadlines --------------------------------------------------------------------------------------------


def test_a_deadline_stops_the_job_at_its_next_step_and_answers_504(
    server: LiveServer, client: httpx.Client
) -> None:
    calls: list[int] = []

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def slow(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            time.sleep(0.05)
            return original(*args, **kwargs)

        return slow

    before = metric(client, "ditcache_generations_total", model="tiny-flux", outcome="DeadlineExceeded")
    with forward_replaced(server, make):
        response = client.post(
            "/v1/generations", json={**GOOD, "steps": MAX_STEPS}, headers={"X-Request-Timeout": "0.5"}
        )
    assert response.status_code == 504
    error = error_of(response)
    assert error["code"] == "deadline_exceeded"
    # Stopped between steps, long before the 40 it asked for.
    assert 1 <= len(calls) < MAX_STEPS
    assert (
        metric(client, "ditcache_generations_total", model="tiny-flux", outcome="DeadlineExceeded")
        == before + 1
    )
    assert client.post("/v1/generations", json=GOOD).status_code == 200


def test_a_request_still_queued_at_its_deadline_is_dropped_with_504(
    server: LiveServer, client: httpx.Client
) -> None:
    with gated(server) as release, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.post, "/v1/generations", json=GOOD)
        wait_until(
            lambda: (
                server.runtime.generations is not None
                and server.runtime.generations.workers["tiny-flux"].busy == 1
            )
        )
        late = client.post("/v1/generations", json=GOOD, headers={"X-Request-Timeout": "0.3"})
        assert server.queue_depths() == {"tiny-flux": 0}
        release.set()
        assert running.result().status_code == 200
    assert late.status_code == 504 and error_of(late)["code"] == "deadline_exceeded"


@pytest.mark.parametrize("value", ["120", "0", "-1", "soon"])
def test_a_timeout_over_the_servers_or_not_positive_is_422(client: httpx.Client, value: str) -> None:
    response = client.post("/v1/generations", json=GOOD, headers={"X-Request-Timeout": value})
    assert response.status_code == 422
    assert error_of(response)["param"] == "X-Request-Timeout"


# -- a failure inside the generation ----------------------------------------------------------------------


def test_out_of_memory_at_a_step_is_503_and_the_next_job_equals_a_fresh_run(
    server: LiveServer, client: httpx.Client
) -> None:
    reference = client.post("/v1/generations", json=CACHED)
    assert reference.status_code == 200
    reference_bytes = b64_items(reference.json())
    assert reference.json()["cache"]["steps_cached"] > 0  # the cache holds state when it fails

    fail_at = 4
    seen: list[CacheSession | None] = []
    state_at_failure: list[int] = []

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def fail_at_step(*args: Any, **kwargs: Any) -> Any:
            seen.append(active_session())
            if len(seen) == fail_at:
                session = seen[-1]
                assert session is not None
                state_at_failure.append(len(session._state))
                # A fake: torch's own out-of-memory type, raised where the device would raise it.
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
            return original(*args, **kwargs)

        return fail_at_step

    capture = _Capture()
    with _captured_logs(capture), forward_replaced(server, make):
        failed = client.post("/v1/generations", json=CACHED, headers={"X-Request-Id": "oom-1"})
    assert failed.status_code == 503
    error = error_of(failed)
    assert (error["code"], error["request_id"]) == ("out_of_memory", "oom-1")
    assert "Traceback" not in failed.text and "2.00 GiB" not in failed.text
    # The session that failed held cache state, and holds none now.
    session = seen[-1]
    assert session is not None and state_at_failure[0] > 0
    assert session._state == {}
    # The worker took the next job, and its output is a fresh run's.
    again = client.post("/v1/generations", json=CACHED)
    assert again.status_code == 200 and b64_items(again.json()) == reference_bytes
    # Every line of the failed request, on the event loop or on the worker thread, has its id.
    mine = [record for record in capture.records if record.request_id == "oom-1"]
    assert {record.name for record in mine} >= {"server.runtime.worker", "server.api.access"}
    line = json.loads(JsonFormatter().format(mine[0]))
    assert line["request_id"] == "oom-1" and line["message"]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.addFilter(RequestIdFilter())
        self.records: list[Any] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _captured_logs(handler: logging.Handler) -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# -- auth --------------------------------------------------------------------------------------------


def test_a_missing_or_wrong_key_is_401_and_probes_stay_open(server: LiveServer) -> None:
    with server.client() as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            for method, path in (("POST", "/v1/generations"), ("GET", "/v1/models"), ("GET", "/v1/jobs/x")):
                response = anonymous.request(method, path, json=GOOD, headers=headers)
                assert response.status_code == 401, (headers, path)
                assert error_of(response)["code"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
        for path in ("/health", "/ready", "/metrics"):
            assert anonymous.get(path).status_code == 200
        assert anonymous.get("/v1/models", headers=AUTH).status_code == 200


# -- metrics ------------------------------------------------------------------------------------------


def test_metrics_move_when_requests_run(client: httpx.Client) -> None:
    def requests_ok() -> float:
        return metric(
            client, "ditcache_http_requests_total", route="/v1/generations", method="POST", status="200"
        )

    def steps(result: str) -> float:
        return metric(
            client,
            "ditcache_denoising_steps_total",
            model="tiny-flux",
            method="first_block_cache",
            result=result,
        )

    before = (requests_ok(), steps("computed"), steps("cached"))
    stages_before = metric(
        client, "ditcache_generation_stage_seconds_count", model="tiny-flux", stage="denoising"
    )
    response = client.post("/v1/generations", json=CACHED)
    assert response.status_code == 200
    stats = response.json()["cache"]
    assert requests_ok() == before[0] + 1
    assert steps("computed") == before[1] + stats["steps_computed"]
    assert steps("cached") == before[2] + stats["steps_cached"] > before[2]
    assert (
        metric(client, "ditcache_generation_stage_seconds_count", model="tiny-flux", stage="denoising")
        == stages_before + 1
    )
    blocks = metric(
        client,
        "ditcache_transformer_blocks_total",
        model="tiny-flux",
        method="first_block_cache",
        result="reused",
    )
    assert blocks >= stats["blocks_reused"] > 0
    # Routes are templates, so ids do not multiply the series.
    client.get("/v1/jobs/job_a")
    client.get("/v1/jobs/job_b")
    assert metric(client, "ditcache_http_requests_total", route="/v1/jobs/{job_id}", status="404") >= 2
