"""Merged forwards on a GPU: ``python -m benchmarks.gpu --merged``.

FLUX.1-dev's transformer (random weights, bfloat16, guidance-distilled, no text encoders) at 512x512
and 1024x1024. ``--requests`` requests of a mix of policies (no cache among them) run two ways on one
resident model, timed in wall-clock time with the device synchronised:

- one at a time, each in its own cache session (what ``--max-batch 1`` does);
- ``--max-batch`` of them at once, each in its own thread, session and pipeline copy (its own
  schedulers), their transformer forwards merged by one ``ForwardBatcher`` (what ``--max-batch N``
  does), the next request starting as one finishes.

Each request's merged latents are compared with its one-at-a-time latents (the largest difference,
relative to the largest value) and its cache decisions (every count but ``peak_bytes``) with its
one-at-a-time ones. Prints per size: images/s both ways, the ratio, the mean requests per merged
forward, the largest latent difference, and the requests whose decisions differed.

    python -m benchmarks.gpu --merged                      # 512 and 1024, 16 requests, max batch 8
    python -m benchmarks.gpu --merged --max-batch 4 --requests 32 --steps 28
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import cache_engine as ce
from cache_engine.batching import ForwardBatcher
from server.models.generation import with_own_schedulers

# The policies of the mix, in turn: none first, then one per method that decides per block or per
# attention call, at settings that reuse on FLUX.
POLICIES: tuple[Callable[[int], object | None], ...] = (
    lambda steps: None,
    lambda steps: ce.FirstBlockCacheConfig(threshold=0.12),
    lambda steps: ce.DBCacheConfig(residual_diff_threshold=0.12),
    lambda steps: ce.TeaCacheConfig(rel_l1_thresh=0.4, num_steps=steps),
    lambda steps: ce.TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2),
    lambda steps: ce.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2),
    lambda steps: ce.SeaCacheConfig(threshold=0.3),
    lambda steps: ce.GuardedTaylorSeerCacheConfig(),
)


@dataclass
class Run:
    latents: torch.Tensor
    stats: ce.SessionStats
    batch_mean: float = 1.0


@dataclass
class SizeResult:
    size: int
    alone_images_per_s: float
    merged_images_per_s: float
    batch_mean: float
    largest_relative_difference: float
    decisions_differing: int

    @property
    def ratio(self) -> float:
        return self.merged_images_per_s / self.alone_images_per_s


def _synchronised(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _one(pipe: Any, engine: ce.CacheEngine, kwargs: dict[str, Any], config: object | None, seed: int) -> Run:
    generator = torch.Generator(pipe.device).manual_seed(seed)
    with engine.session(config) as session:
        latents = pipe(**kwargs, generator=generator).images
    return Run(latents.float().cpu(), session.stats)


def _fits(engine: ce.CacheEngine, config: object | None) -> bool:
    """Whether ``config`` applies to the model (a small test model has too few blocks for DBCache's)."""
    try:
        engine.check(config)
    except ValueError:
        return False
    return True


def measure(
    pipe: Any, kwargs: dict[str, Any], *, requests: int, max_batch: int, steps: int, size: int
) -> SizeResult:
    """``requests`` of the mix on ``pipe`` one at a time, then ``max_batch`` at a time merged."""
    device = pipe.transformer.device
    engine = ce.engine_of(pipe.transformer) or ce.CacheEngine(pipe.transformer)
    mix = [policy(steps) for policy in POLICIES]
    mix = [config for config in mix if _fits(engine, config)]
    configs = [mix[index % len(mix)] for index in range(requests)]
    call = {**kwargs, "height": size, "width": size}
    _one(pipe, engine, call, None, 0)  # warm-up: kernels chosen, memory reserved

    started = _synchronised(device)
    alone = [_one(pipe, engine, call, config, index) for index, config in enumerate(configs)]
    alone_s = _synchronised(device) - started

    batcher = ForwardBatcher()
    pending = list(enumerate(configs))
    merged: dict[int, Run] = {}
    lock = threading.Lock()

    def worker() -> None:
        shell = with_own_schedulers(pipe)
        while True:
            with lock:
                if not pending:
                    return
                index, config = pending.pop(0)
                member = batcher.admit()
            with member.bound():
                run = _one(shell, engine, call, config, index)
            merged[index] = dataclasses.replace(run, batch_mean=member.stats.mean)

    started = _synchronised(device)
    threads = [threading.Thread(target=worker) for _ in range(max_batch)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged_s = _synchronised(device) - started

    differences = [
        float((merged[index].latents - run.latents).abs().max() / run.latents.abs().max().clamp(min=1e-12))
        for index, run in enumerate(alone)
    ]
    differing = sum(
        dataclasses.replace(merged[index].stats, peak_bytes=0, estimated_error=None)
        != dataclasses.replace(run.stats, peak_bytes=0, estimated_error=None)
        for index, run in enumerate(alone)
    )
    return SizeResult(
        size=size,
        alone_images_per_s=requests / alone_s,
        merged_images_per_s=requests / merged_s,
        batch_mean=statistics.mean(run.batch_mean for run in merged.values()),
        largest_relative_difference=max(differences),
        decisions_differing=differing,
    )


def markdown(results: Sequence[SizeResult], max_batch: int) -> str:
    lines = [
        f"| size | one at a time, images/s | max batch {max_batch}, images/s | ratio | requests per merged "
        "forward | largest latent difference (relative) | requests deciding otherwise |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result.size}x{result.size} | {result.alone_images_per_s:.3f} | {result.merged_images_per_s:.3f} "
            f"| {result.ratio:.2f}x | {result.batch_mean:.2f} | {result.largest_relative_difference:.1e} "
            f"| {result.decisions_differing} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace, build: Callable[[], Any]) -> list[SizeResult]:
    """``build()`` gives the FLUX-sized pipeline and its call arguments (``benchmarks.gpu``'s)."""
    bp = build()
    results = []
    for size in args.sizes:
        results.append(
            measure(
                bp.pipe,
                bp.call_kwargs,
                requests=args.requests,
                max_batch=args.max_batch,
                steps=args.steps,
                size=size,
            )
        )
        print(markdown(results[-1:], args.max_batch), flush=True)
    print(markdown(results, args.max_batch))
    return results
