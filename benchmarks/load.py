"""The server under concurrent load: ``python -m benchmarks.load``.

Starts ``python -m server serve`` in a subprocess on a free loopback port (the built-in tiny models by
default, ``--models`` to choose; a short queue so that backpressure shows), then:

1. sends each body of a mix (several cache policies, both models, fixed seeds) once, one at a time:
   the serial reference;
2. for each concurrency level, sends ``--requests`` bodies drawn in turn from the mix, at most
   ``level`` in flight. A 429 is retried after its ``Retry-After``, as a polite client would, up to
   ``--retries`` times;
3. reports per level: throughput, p50/p95/p99 latency (from first send to final answer, retries
   included), the share of answers that were 429, errors (any other non-200, or a transport
   failure), and mismatches: a 200 whose decoded media differs, byte for byte, from the serial
   reference for its body and seed.

With ``--replicas N`` (N > 1) it does all of this twice in one run, against a server with one replica
per model and against one with N (each replica a worker with ``--torch-threads`` threads), checks both
against the one-replica server's serial references, and prints the throughput ratio per level.

With ``--backend ray`` the servers are ``ditcache serve --backend ray`` on a local Ray cluster of their
own: N Ray Serve replicas (``--replicas N --backend ray``, one CPU each) behind
the ingress, instead of N workers in one process. The references are still taken from the first
server, so a Ray run is checked byte for byte too.

Exit status 0 when there were no errors and no mismatches. Bounded: ``--time-limit`` seconds per
server (levels not reached are reported as skipped), loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from benchmarks.merged import MergedReport

_POLICIES: tuple[dict[str, Any] | None, ...] = (
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
    policies = _POLICIES[:3] if quick else _POLICIES
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


@dataclass
class Report:
    levels: list[Level]
    references: int
    replicas: int = 1
    # The same levels against a server with one replica per model, when ``replicas`` > 1.
    baseline: list[Level] | None = None

    def ratios(self) -> list[float]:
        """Throughput with ``replicas`` replicas over throughput with one, per level."""
        if self.baseline is None:
            return []
        return [
            ours.throughput / base.throughput if base.throughput else 0.0
            for ours, base in zip(self.levels, self.baseline, strict=True)
        ]

    @property
    def errors(self) -> int:
        return sum(level.errors for level in [*self.levels, *(self.baseline or [])])

    @property
    def mismatches(self) -> int:
        return sum(level.mismatches for level in [*self.levels, *(self.baseline or [])])

    def markdown(self) -> str:
        if self.baseline is None:
            return _table(self.levels)
        ratios = " | ".join(
            f"{level.concurrency}: {ratio:.2f}x"
            for level, ratio in zip(self.levels, self.ratios(), strict=True)
        )
        return "\n\n".join(
            [
                f"1 replica per model:\n\n{_table(self.baseline)}",
                f"{self.replicas} replicas per model:\n\n{_table(self.levels)}",
                f"throughput, {self.replicas} replicas over 1, by concurrency: {ratios}",
            ]
        )


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


def _table(levels: Sequence[Level]) -> str:
    lines = [
        "| concurrency | requests | ok | req/s | p50 ms | p95 ms | p99 ms | 429 share | errors | mismatches |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        if level.skipped:
            lines.append(f"| {level.concurrency} | skipped (time limit) | | | | | | | | |")
            continue
        lines.append(
            f"| {level.concurrency} | {level.sent} | {level.ok} | {level.throughput:.2f} "
            f"| {level.percentile(0.5):.0f} | {level.percentile(0.95):.0f} | {level.percentile(0.99):.0f} "
            f"| {level.share_429:.1%} | {level.errors} | {level.mismatches} |"
        )
    return "\n".join(lines)


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


async def drive(
    base_url: str, args: argparse.Namespace, expected: list[list[bytes]] | None = None
) -> tuple[list[Level], list[list[bytes]]]:
    """The levels against the server at ``base_url``, and the serial references they were checked
    against (taken here unless ``expected`` is given)."""
    bodies = mix(args.quick, args.models)
    stop_at = time.monotonic() + args.time_limit
    limits = httpx.Limits(max_connections=max(args.levels) + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        if expected is None:
            expected = await references(client, bodies)
        levels = []
        for concurrency in args.levels:
            level = Level(concurrency)
            if time.monotonic() >= stop_at:
                level.skipped = True
            else:
                await run_level(client, bodies, expected, level, args.requests, args.retries, stop_at)
            levels.append(level)
    return levels, expected


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few bodies, levels 1 and 2")
    parser.add_argument("--levels", type=lambda text: [int(part) for part in text.split(",")], default=None)
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default 40; quick 6)")
    parser.add_argument("--queue-size", type=int, default=2, help="the server's queue per model (default 2)")
    parser.add_argument("--retries", type=int, default=5, help="retries of a 429 (default 5)")
    parser.add_argument(
        "--time-limit", type=float, default=600.0, help="seconds for all levels (default 600)"
    )
    parser.add_argument("--torch-threads", type=int, default=1, help="the server's torch threads (default 1)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the built-in models are built")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here as JSON")
    parser.add_argument(
        "--models",
        type=lambda text: [part for part in text.split(",") if part],
        default=list(DEFAULT_MODELS),
        help="models served and mixed, comma-separated (default tiny-flux,tiny-wan)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="N > 1: run against 1 and N replicas per model, with the ratio",
    )
    parser.add_argument(
        "--max-batch",
        type=lambda text: [int(part) for part in text.split(",")],
        default=None,
        help="e.g. 1,8: one server per value, measured in turn over --rounds rounds (benchmarks.merged)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="with --max-batch: rounds per server (default 3)"
    )
    parser.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local: replicas are workers in one process; ray: Ray Serve replicas (needs the ray extra)",
    )
    return parser


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    if args.levels is None:
        args.levels = [1, 2] if args.quick else [1, 4, 8]
    if args.requests is None:
        args.requests = 6 if args.quick else 40
    if args.max_batch is not None and (args.replicas != 1 or args.backend != "local"):
        _parser().error("--max-batch compares one local replica per value: no --replicas, no --backend ray")
    return args


def run_merged(argv: Sequence[str] | None = None) -> MergedReport:
    """``--max-batch``: one server per value, against the first (``benchmarks.merged``)."""
    from benchmarks.merged import compare

    args = _arguments(argv)
    if args.max_batch is None:
        _parser().error("run_merged needs --max-batch")
    with tempfile.TemporaryDirectory() as scratch:
        merged = compare(args, args.cache_dir or Path(scratch))
    if args.json is not None:
        args.json.write_text(json.dumps(merged.as_json(), indent=2))
    return merged


def run(argv: Sequence[str] | None = None) -> Report:
    args = _arguments(argv)
    if args.max_batch is not None:
        _parser().error("--max-batch runs through run_merged")
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.cache_dir or Path(scratch)

        def against(
            replicas: int, expected: list[list[bytes]] | None
        ) -> tuple[list[Level], list[list[bytes]]]:
            process, base_url = start_server(
                cache_dir, args.queue_size, args.torch_threads, args.models, replicas, args.backend
            )
            try:
                return asyncio.run(drive(base_url, args, expected))
            finally:
                stop_server(process)

        levels, expected = against(1, None)
        report = Report(levels=levels, references=len(expected))
        if args.replicas > 1:
            report = Report(
                levels=against(args.replicas, expected)[0],
                references=len(expected),
                replicas=args.replicas,
                baseline=levels,
            )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "backend": args.backend,
                    "replicas": report.replicas,
                    "ratios": report.ratios(),
                    "baseline": None
                    if report.baseline is None
                    else [level_json(level) for level in report.baseline],
                    "levels": [
                        {
                            "concurrency": level.concurrency,
                            "sent": level.sent,
                            "ok": level.ok,
                            "throughput": level.throughput,
                            "p50_ms": level.percentile(0.5),
                            "p95_ms": level.percentile(0.95),
                            "p99_ms": level.percentile(0.99),
                            "share_429": level.share_429,
                            "errors": level.errors,
                            "mismatches": level.mismatches,
                            "skipped": level.skipped,
                        }
                        for level in report.levels
                    ],
                },
                indent=2,
            )
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    report: Report | MergedReport = (
        run_merged(argv) if _parser().parse_args(argv).max_batch is not None else run(argv)
    )
    print(f"serial references: {report.references} bodies")
    print(report.markdown())
    if isinstance(report, Report):
        for level in report.levels:
            for sample in level.error_samples[:3]:
                print(f"concurrency {level.concurrency}: {sample}", file=sys.stderr)
    print(f"errors: {report.errors}, mismatches: {report.mismatches}")
    return 0 if report.errors == 0 and report.mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
