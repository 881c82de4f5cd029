"""Exact reuse, end to end: ``python -m benchmarks.reuse``.

Starts ``python -m server serve`` on ``shapes-flux`` in a subprocess (loopback), sends ``-n`` distinct
requests at the served defaults with ``"reuse": "exact"`` and a seed each (computed, and kept), then the
same requests again (answered from the kept results), one at a time. Prints the median client wall time
of both, their ratio, and whether every second answer has the first one's bytes and names its request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.load import start_server, stop_server
from shapes import dataset


def _timed(client: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = client.post("/v1/generations", json=body)
    wall = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return wall, answer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=16, help="distinct requests")
    parser.add_argument("--model", default="shapes-flux")
    args = parser.parse_args(argv)
    bodies = [
        {"model": args.model, "prompt": scene.caption, "seed": index, "reuse": "exact"}
        for index, scene in enumerate(dataset.scenes(args.n, 20_261_208))
    ]
    with tempfile.TemporaryDirectory() as cache:
        process, base_url = start_server(Path(cache), 4, 1, models=[args.model])
        try:
            with httpx.Client(base_url=base_url, timeout=120) as client:
                computed = [_timed(client, body) for body in bodies]
                reused = [_timed(client, body) for body in bodies]
        finally:
            stop_server(process)
    same = sum(
        again["data"] == first["data"] and again["reused_from"] == first["request_id"]
        for (_, first), (_, again) in zip(computed, reused, strict=True)
    )
    miss = statistics.median(wall for wall, _ in computed)
    hit = statistics.median(wall for wall, _ in reused)
    print(f"{args.model}, {args.n} requests at its defaults, one at a time")
    print(f"computed: median {miss:.1f} ms; reused: median {hit:.1f} ms; ratio {hit / miss:.3f}")
    print(f"reused with the first answer's bytes, naming its request: {same} of {args.n}")
    return 0 if same == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
