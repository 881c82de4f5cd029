"""A ditcache server in a subprocess, and the clients that load it: what ``benchmarks.load`` and
``benchmarks.merged`` share (the mix of bodies, a level of concurrent requests, starting and stopping a
server on a free loopback port)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

POLICIES: tuple[dict[str, Any] | None, ...] = (
    None,
    {"method": "first_block_cache", "threshold": 0.2},
    {"method": "taylorseer", "cache_interval": 2, "disable_cache_before_step": 1},
    {"preset": "fast"},
    {"method": "pyramid_attention_broadcast", "spatial_attention_block_skip_range": 2},
    {"method": "dbcache", "residual_diff_threshold": 0.2},
    {"method": "teacache", "rel_l1_thresh": 0.4},
)
_READY_TIMEOUT_S = 300.0
# Whether an answer (200) to the mix's body at an index is the one expected of it.
Check = Callable[[int, httpx.Response], bool]
REQUEST_TIMEOUT_S = 120.0


# Per model: the fields every body of the mix has (model, size, steps); the rest of the model's call
# is its own default (shapes-flux: 20 steps at true CFG 3).
_BASE_BODIES: dict[str, dict[str, Any]] = {
    "tiny-flux": {"steps": 6},
    "tiny-wan": {"steps": 4, "num_frames": 5, "output_format": "gif"},
    "shapes-flux": {},
}
DEFAULT_MODELS = ("tiny-flux", "tiny-wan")


def mix(quick: bool, models: Sequence[str] = DEFAULT_MODELS) -> list[dict[str, Any]]:
    """Bodies of different policies and seeds on each model; every one is deterministic (a seed)."""
    bodies: list[dict[str, Any]] = []
    policies = POLICIES[:3] if quick else POLICIES
    for index, policy in enumerate(policies):
        for offset, model in enumerate(models):
            body: dict[str, Any] = {
                "model": model,
                "prompt": f"a red circle {index}",
                "seed": 100 * offset + index,
                **_BASE_BODIES.get(model, {}),
            }
            if policy is not None:
                body["cache"] = policy
            bodies.append(body)
    return bodies


@dataclass
class Level:
    concurrency: int
    sent: int = 0
    ok: int = 0
    answers_429: int = 0
    answers: int = 0
    errors: int = 0
    mismatches: int = 0
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    skipped: bool = False

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    @property
    def share_429(self) -> float:
        return self.answers_429 / self.answers if self.answers else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def level_json(level: Level) -> dict[str, Any]:
    return {
        "concurrency": level.concurrency,
        "ok": level.ok,
        "throughput": level.throughput,
        "p50_ms": level.percentile(0.5),
        "p95_ms": level.percentile(0.95),
        "errors": level.errors,
        "mismatches": level.mismatches,
    }


# -- the server -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(
    cache_dir: Path,
    queue_size: int,
    torch_threads: int,
    models: Sequence[str] = DEFAULT_MODELS,
    replicas: int = 1,
    backend: str = "local",
    extra: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    command = [
        sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port),
        *(arg for model in models for arg in ("--model", model)), "--cache-dir", str(cache_dir),
        "--queue-size", str(queue_size), "--torch-threads", str(torch_threads), "--log-level", "warning",
        # Jobs are not part of the mix; a store of its own keeps runs apart.
        "--job-store", f"sqlite:{cache_dir / f'jobs-{port}.sqlite'}",
    ]  # fmt: skip
    command += ["--replicas", str(replicas)]
    if backend == "ray":
        command += ["--backend", "ray"]
    command += list(extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + _READY_TIMEOUT_S
    with httpx.Client(base_url=base_url, timeout=10) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
            try:
                if client.get("/ready").status_code == 200:
                    return process, base_url
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    process.kill()
    raise TimeoutError("the server did not become ready")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        # The Ray backend also shuts its local cluster down.
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the clients ----------------------------------------------------------------------------------------


def media_of(response: httpx.Response) -> list[bytes]:
    return [base64.b64decode(item["b64_json"]) for item in response.json()["data"]]


async def references(client: httpx.AsyncClient, bodies: Sequence[dict[str, Any]]) -> list[list[bytes]]:
    out = []
    for body in bodies:
        response = await client.post("/v1/generations", json=body)
        response.raise_for_status()
        out.append(media_of(response))
    return out


async def run_level(
    client: httpx.AsyncClient,
    bodies: Sequence[dict[str, Any]],
    expected: Sequence[list[bytes]],
    level: Level,
    count: int,
    retries: int,
    stop_at: float,
    same: Check | None = None,
) -> None:
    """``count`` bodies drawn in turn, ``level.concurrency`` at a time; an answer is checked by ``same``
    (default: its media are ``expected``'s, byte for byte)."""
    semaphore = asyncio.Semaphore(level.concurrency)

    async def one(index: int) -> None:
        async with semaphore:
            if time.monotonic() >= stop_at:
                return
            which = index % len(bodies)
            level.sent += 1
            started = time.perf_counter()
            try:
                for attempt in range(retries + 1):
                    response = await client.post("/v1/generations", json=bodies[which])
                    level.answers += 1
                    if response.status_code != 429 or attempt == retries:
                        break
                    level.answers_429 += 1
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            except httpx.HTTPError as exc:
                level.errors += 1
                level.error_samples.append(f"{type(exc).__name__}: {exc}")
                return
            if response.status_code == 429:
                level.answers_429 += 1
                return
            if response.status_code != 200:
                level.errors += 1
                level.error_samples.append(f"{response.status_code}: {response.text[:200]}")
                return
            level.latencies_ms.append((time.perf_counter() - started) * 1000)
            level.ok += 1
            matches = same(which, response) if same is not None else media_of(response) == expected[which]
            if not matches:
                level.mismatches += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(count)))
    level.wall_s = time.perf_counter() - started
