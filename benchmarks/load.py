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
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from benchmarks.served import (
    DEFAULT_MODELS,
    REQUEST_TIMEOUT_S,
    Level,
    level_json,
    mix,
    references,
    run_level,
    start_server,
    stop_server,
)

if TYPE_CHECKING:
    from benchmarks.merged import MergedReport


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
