"""``python -m benchmarks.load --max-batch 1,8``: servers merging forwards, against one at a time.

One server per ``--max-batch`` value, all started before anything is measured and kept up together;
the first value (1: one generation at a time) gives the serial references. Then, for ``--rounds``
rounds, each concurrency level is run against each server in turn, so that a drift of the shared
machine falls on every server alike; the report takes each server's median over the rounds.

A merged answer is checked against the reference of its body as merged forwards promise (point 3 of
their design): the same cache decisions (every count of the answer's ``cache`` but ``peak_bytes``) and
the same image within two levels per pixel (latents within 1e-4 of the alone ones). An answer of the
one-at-a-time server must be the reference byte for byte.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageSequence

from benchmarks.served import (
    REQUEST_TIMEOUT_S,
    Check,
    Level,
    level_json,
    media_of,
    mix,
    run_level,
    start_server,
    stop_server,
)

# Pixel levels a merged answer may differ by, anywhere (its latents are within 1e-4 of the alone ones).
PIXEL_TOLERANCE = 2


@dataclass(frozen=True)
class Reference:
    media: list[bytes]
    decisions: dict[str, Any]


@dataclass
class Served:
    max_batch: int
    # Per concurrency level, one Level per round.
    rounds: dict[int, list[Level]] = field(default_factory=dict)
    # Per concurrency level, each answer's mean requests per merged forward.
    batch_means: dict[int, list[float]] = field(default_factory=dict)

    def batch_mean(self, concurrency: int) -> float:
        means = self.batch_means.get(concurrency, [])
        return statistics.mean(means) if means else 1.0

    def median(self, concurrency: int, measure: str) -> float:
        levels = self.rounds[concurrency]
        values = [level.throughput if measure == "throughput" else level.percentile(0.5) for level in levels]
        return statistics.median(values)

    @property
    def errors(self) -> int:
        return sum(level.errors for levels in self.rounds.values() for level in levels)

    @property
    def mismatches(self) -> int:
        return sum(level.mismatches for levels in self.rounds.values() for level in levels)


@dataclass
class MergedReport:
    levels: list[int]
    served: list[Served]
    references: int

    @property
    def errors(self) -> int:
        return sum(served.errors for served in self.served)

    @property
    def mismatches(self) -> int:
        return sum(served.mismatches for served in self.served)

    def ratio(self, served: Served, concurrency: int, measure: str) -> float:
        base = self.served[0].median(concurrency, measure)
        return served.median(concurrency, measure) / base if base else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "max_batch": [
                {
                    "max_batch": served.max_batch,
                    "requests_per_merged_forward": statistics.mean(served.batch_means)
                    if served.batch_means
                    else 1.0,
                    "levels": [
                        {
                            "concurrency": concurrency,
                            "throughput_median": served.median(concurrency, "throughput"),
                            "throughput_ratio": self.ratio(served, concurrency, "throughput"),
                            "p50_ms_median": served.median(concurrency, "p50"),
                            "p50_ratio": self.ratio(served, concurrency, "p50"),
                            "requests_per_merged_forward": served.batch_mean(concurrency),
                            "rounds": [level_json(level) for level in served.rounds[concurrency]],
                        }
                        for concurrency in self.levels
                    ],
                }
                for served in self.served
            ],
            "errors": self.errors,
            "mismatches": self.mismatches,
        }

    def markdown(self) -> str:
        lines = [
            "| max batch | concurrency | req/s (median) | vs max batch 1 | p50 ms (median) | vs max batch 1 "
            "| requests per merged forward | errors | mismatches |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for served in self.served:
            for concurrency in self.levels:
                levels = served.rounds[concurrency]
                lines.append(
                    f"| {served.max_batch} | {concurrency} | {served.median(concurrency, 'throughput'):.2f} "
                    f"| {self.ratio(served, concurrency, 'throughput'):.2f}x "
                    f"| {served.median(concurrency, 'p50'):.0f} | {self.ratio(served, concurrency, 'p50'):.2f}x "
                    f"| {served.batch_mean(concurrency):.2f} | {sum(level.errors for level in levels)} "
                    f"| {sum(level.mismatches for level in levels)} |"
                )
        return "\n".join(lines)


def decisions(cache: dict[str, Any] | None) -> dict[str, Any]:
    """What an answer's ``cache`` decided: every count, not the bytes its state held (a merged call's
    outputs are each request's own rows, copied compact, so a state keeping views of a wider storage
    alone holds less merged)."""
    return {key: value for key, value in (cache or {}).items() if key != "peak_bytes"}


def same_decisions(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Every count equal; a guarded method's own error estimate, computed from the latents, within 1e-4."""
    estimate, expected = ours.get("estimated_error"), theirs.get("estimated_error")
    counts_equal = {k: v for k, v in ours.items() if k != "estimated_error"} == {
        k: v for k, v in theirs.items() if k != "estimated_error"
    }
    if estimate is None or expected is None:
        return counts_equal and estimate == expected
    return counts_equal and abs(estimate - expected) <= 1e-4 * max(abs(expected), 1e-12)


def _frames(data: bytes) -> list[np.ndarray]:
    with Image.open(io.BytesIO(data)) as image:
        return [np.asarray(frame.convert("RGB"), dtype=np.int16) for frame in ImageSequence.Iterator(image)]


def _close(media: list[bytes], reference: list[bytes]) -> bool:
    if len(media) != len(reference):
        return False
    for ours, theirs in zip(media, reference, strict=True):
        frames, expected = _frames(ours), _frames(theirs)
        if len(frames) != len(expected):
            return False
        for frame, other in zip(frames, expected, strict=True):
            if frame.shape != other.shape or int(np.abs(frame - other).max()) > PIXEL_TOLERANCE:
                return False
    return True


def _checker(references: Sequence[Reference], exact: bool, served: Served, concurrency: int) -> Check:
    def same(which: int, response: httpx.Response) -> bool:
        answer = response.json()
        batch = answer.get("batch")
        if batch is not None:
            served.batch_means.setdefault(concurrency, []).append(float(batch["mean"]))
        media = media_of(response)
        reference = references[which]
        if exact:
            return media == reference.media
        return same_decisions(decisions(answer.get("cache")), reference.decisions) and _close(
            media, reference.media
        )

    return same


async def _references(base_url: str, bodies: Sequence[dict[str, Any]]) -> list[Reference]:
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
        found = []
        for body in bodies:
            response = await client.post("/v1/generations", json=body)
            response.raise_for_status()
            found.append(Reference(media_of(response), decisions(response.json().get("cache"))))
        return found


async def _level(
    base_url: str,
    args: argparse.Namespace,
    bodies: Sequence[dict[str, Any]],
    concurrency: int,
    same: Check,
) -> Level:
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        level = Level(concurrency)
        stop_at = time.monotonic() + args.time_limit
        await run_level(client, bodies, [], level, args.requests, args.retries, stop_at, same=same)
        return level


def compare(args: argparse.Namespace, cache_dir: Path) -> MergedReport:
    """Every ``args.max_batch`` server, the first one's serial answers as the references."""
    bodies = mix(args.quick, args.models)
    queue = max(args.queue_size, max(args.levels))
    servers = []
    try:
        for max_batch in args.max_batch:
            extra = ["--max-batch", str(max_batch)]
            process, base_url = start_server(cache_dir, queue, args.torch_threads, args.models, extra=extra)
            servers.append((Served(max_batch), process, base_url))
        references = asyncio.run(_references(servers[0][2], bodies))
        for _ in range(args.rounds):
            for concurrency in args.levels:
                for served, _, base_url in servers:
                    same = _checker(references, served.max_batch == 1, served, concurrency)
                    level = asyncio.run(_level(base_url, args, bodies, concurrency, same))
                    served.rounds.setdefault(concurrency, []).append(level)
    finally:
        for _, process, _ in servers:
            stop_server(process)
    return MergedReport(list(args.levels), [served for served, _, _ in servers], len(references))
