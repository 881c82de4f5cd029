"""SIGTERM drains the real server: ``ditcache serve`` in a subprocess.

The request running when the signal comes finishes within the grace period; the one queued behind
it, too long to finish in what is left, is cancelled at the end of the grace period and answers 503
in the envelope; nothing new is taken; the process exits 0.

The server runs with its denoiser gated (``gated_serve``): the running request is held until the
signal has been sent, and the queued one is never let go, so that it takes at least ``HOLD_S`` a step.
How fast the machine is decides nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import error_of, wait_until
from .gated_serve import GATES_ENV, HOLD_S

GRACE_S = 5.0
# A few small steps: done at once when let go.
RUNNING = {"prompt": "first", "steps": 4, "seed": 1}
# Never let go, so each step takes at least HOLD_S: eight times the grace period in all.
QUEUED = {"prompt": "second", "steps": int(8 * GRACE_S / HOLD_S), "seed": 2}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _gauge(client: httpx.Client, name: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


@pytest.mark.slow
def test_sigterm_finishes_running_work_cancels_the_rest_and_exits_0(
    model_cache: Path, tmp_path: Path
) -> None:
    port = _free_port()
    command = [
        sys.executable, "-m", "tests.server.gated_serve", "serve", "--model", "tiny-flux",
        "--port", str(port), "--cache-dir", str(model_cache), "--shutdown-grace-s", str(GRACE_S),
        "--torch-threads", "1", "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", GATES_ENV: str(tmp_path)}
    process = subprocess.Popen(
        command,
        env=env,
        cwd=Path(__file__).parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base_url, timeout=120) as client:

            def ready() -> bool:
                assert process.poll() is None, "the server exited early"
                try:
                    return client.get("/ready").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, 120, "a ready server")
            with ThreadPoolExecutor(2) as pool:
                running = pool.submit(_post, base_url, RUNNING, "running-1")
                wait_until(lambda: _gauge(client, "ditcache_jobs_in_flight") == 1, 60, "a running request")
                queued = pool.submit(_post, base_url, QUEUED, "queued-1")
                wait_until(lambda: _gauge(client, "ditcache_queue_depth") == 1, 60, "a queued request")
                signalled = time.monotonic()
                process.send_signal(signal.SIGTERM)
                try:
                    late = httpx.post(f"{base_url}/v1/generations", json=RUNNING, timeout=30)
                    assert late.status_code == 503 and error_of(late)["code"] == "not_ready"
                except httpx.TransportError:
                    pass  # refused at the socket: also not taken
                # Held until now, so it was still running when the signal came.
                assert not running.done()
                (tmp_path / "running-1").touch()
                finished, cancelled = running.result(), queued.result()
            exit_code = process.wait(timeout=GRACE_S + 60)
            stopped_after = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert finished.status_code == 200, finished.text
    assert cancelled.status_code == 503, cancelled.text
    error = error_of(cancelled)
    assert (error["code"], error["request_id"]) == ("unavailable", "queued-1")
    assert exit_code == 0, process.stderr.read().decode() if process.stderr else ""
    # Not a timing claim about speed: the grace period bounds the wait, by a wide margin.
    assert stopped_after < GRACE_S + 30


def _post(base_url: str, body: dict[str, object], request_id: str) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/generations", json=body, headers={"X-Request-Id": request_id}, timeout=120
    )
