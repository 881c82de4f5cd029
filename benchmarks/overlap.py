"""Do two generations overlap on two threads of one process as well as in two processes?

    python -m benchmarks.overlap            # shapes-flux, 20 steps, true CFG 3, 8 images per copy

Two copies of the pipeline, one torch thread each: the images per second of one copy alone, of both on
two threads of this process, and of both in two processes started for the purpose. It separates what
Python's interpreter lock costs two in-process replicas from what the server adds around them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "server" / "assets" / "shapes-flux"


def _load(model: Path) -> Any:
    import torch

    from shapes import evaluate

    torch.set_num_threads(1)
    pipe = evaluate.load(model)
    evaluate.generate(pipe, ["a red circle"], [0], steps=2)  # warm-up
    return pipe


def _generate(pipe: Any, images: int, steps: int, cfg: float) -> None:
    from shapes import evaluate

    for seed in range(images):
        evaluate.generate(pipe, ["a red circle on a blue background"], [seed], steps=steps, cfg=cfg)


def _process(model: Path, images: int, steps: int, cfg: float, go: Event, ready: Any, seconds: Any) -> None:
    pipe = _load(model)
    ready.put(None)
    go.wait()
    started = time.perf_counter()
    _generate(pipe, images, steps, cfg)
    seconds.put(time.perf_counter() - started)


def measure(model: Path, images: int, steps: int, cfg: float) -> dict[str, float]:
    """Images per second: one copy alone, two on threads, two in processes."""
    first, second = _load(model), _load(model)
    started = time.perf_counter()
    _generate(first, images, steps, cfg)
    alone = images / (time.perf_counter() - started)

    threads = [
        threading.Thread(target=_generate, args=(pipe, images, steps, cfg)) for pipe in (first, second)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    on_threads = 2 * images / (time.perf_counter() - started)

    context = mp.get_context("spawn")
    go, ready, seconds = context.Event(), context.Queue(), context.Queue()
    processes = [
        context.Process(target=_process, args=(model, images, steps, cfg, go, ready, seconds))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    # Both load and warm up before either is timed.
    for _ in processes:
        ready.get(timeout=600)
    go.set()
    slowest = max(seconds.get() for _ in processes)
    for process in processes:
        process.join()
    return {"alone": alone, "threads": on_threads, "processes": 2 * images / slowest}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overlap", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--images", type=int, default=8, help="images per copy (default 8)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=3.0, help="true CFG scale (1: none)")
    args = parser.parse_args(argv)
    rates = measure(args.model, args.images, args.steps, args.cfg)
    alone = rates["alone"]
    print(
        f"one copy: {alone:.2f} images/s; two on threads: {rates['threads']:.2f} ({rates['threads'] / alone:.2f}x); "
        f"two in processes: {rates['processes']:.2f} ({rates['processes'] / alone:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
