"""What bounds merged forwards on a model: ``python -m benchmarks.merged_bound``.

Merging speeds up only the leaves (the blocks, or attention calls, that a request's policy computes):
everything else a request does (its pipeline's loop, the transformer's embeddings and output head,
its cache policy's own arithmetic, text encoding, decoding) runs per request as before. In one process,
with the model resident and one torch thread, this measures for ``--model``:

1. ``--requests`` generations of the load benchmark's policy mix, one at a time, each through a batch of
   its own: the share of their wall time spent in leaves;
2. the model's blocks at batch 1 and at ``--rows`` rows (the transformer's forward on random inputs of
   a request's shape): the speedup per row that merging ``--rows`` requests' leaves can give at most;
3. the bound that follows (Amdahl): 1 / ((1 - share) + share / speedup), the most throughput merging can
   add if every leaf of every request merged ``--rows`` ways;
4. the stages outside the denoiser, text encoding and decoding, at batch 1 and at ``--rows`` prompts or
   latents (the model's own calls of them, widened): what merging them could save per request.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter

from benchmarks.served import mix
from cache_engine import batching
from server.models.generation import GenerationParams, generate
from server.models.registry import load_model
from server.policy.resolve import resolve
from server.protocol import CacheSpec


def _leaf_share(model: Any, bodies: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """Seconds of wall time and of leaves, over ``bodies`` run one at a time through a batcher."""
    spent = [0.0]
    batcher = batching.ForwardBatcher()
    original = batcher.run

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    batcher.run = timed  # type: ignore[method-assign]
    specs: TypeAdapter[CacheSpec] = TypeAdapter(CacheSpec)
    started = time.perf_counter()
    for body in bodies:
        params = GenerationParams.from_defaults(model.defaults, prompt=body["prompt"], seed=body["seed"])
        spec = specs.validate_python(body["cache"]) if "cache" in body else None
        config = resolve(model, spec, params.steps, params.guidance_scale).config
        with batcher.admit().bound(), model.cache.session(config):
            generate(model, params, own_scheduler=True)
    return time.perf_counter() - started, spent[0]


def _per_row_speedup(model: Any, rows: int, repeats: int) -> float:
    """Block time per row at batch 1 over at ``rows`` rows, on the transformer's own call."""
    transformer = model.pipeline.transformer
    captured: dict[str, Any] = {}

    def capture(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.setdefault("call", (args, kwargs))

    handle = transformer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        params = GenerationParams.from_defaults(model.defaults, prompt="a red circle", seed=0, steps=1)
        generate(model, params)
    finally:
        handle.remove()
    args, kwargs = captured["call"]

    def widened(value: Any, batch: int) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1:
            return value.expand(batch, *value.shape[1:]).contiguous()
        return value

    def seconds(batch: int) -> float:
        call = {name: widened(value, batch) for name, value in kwargs.items()}
        with torch.no_grad():
            transformer(*args, **call)
            started = time.perf_counter()
            for _ in range(repeats):
                transformer(*args, **call)
        return (time.perf_counter() - started) / repeats

    return seconds(1) / (seconds(rows) / rows)


def _stage_calls(model: Any) -> dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    """One generation's calls of ``encode_prompt`` and of the VAE's ``decode``: (function, args, kwargs)."""
    pipeline = model.pipeline
    captured: dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]] = {}
    originals = {"text": pipeline.encode_prompt, "decode": pipeline.vae.decode}

    def capturing(stage: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            captured.setdefault(stage, (originals[stage], args, kwargs))
            return originals[stage](*args, **kwargs)

        return call

    # Whatever stands there now (a wrapper of the server's own, or nothing) comes back after.
    owners = {"text": (pipeline, "encode_prompt"), "decode": (pipeline.vae, "decode")}
    before = {stage: owner.__dict__.get(name) for stage, (owner, name) in owners.items()}
    for stage, (owner, name) in owners.items():
        owner.__dict__[name] = capturing(stage)
    try:
        params = GenerationParams.from_defaults(model.defaults, prompt="a red circle", seed=0, steps=1)
        generate(model, params)
    finally:
        for stage, (owner, name) in owners.items():
            if before[stage] is None:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = before[stage]
    return captured


def _per_row_ms(
    stage: str, function: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, repeats: int
) -> float:
    """Milliseconds per request of ``function``'s call widened to ``batch`` requests (prompts or latents)."""

    def widened(value: Any) -> Any:
        if stage == "text" and isinstance(value, str):
            return [f"{value} {index}" for index in range(batch)]
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1:
            return value.expand(batch, *value.shape[1:]).contiguous()
        return value

    call_args = [widened(value) for value in args]
    call_kwargs = {name: widened(value) for name, value in kwargs.items()}
    with torch.no_grad():
        function(*call_args, **call_kwargs)
        started = time.perf_counter()
        for _ in range(repeats):
            function(*call_args, **call_kwargs)
    return (time.perf_counter() - started) / repeats / batch * 1000


def _stage_per_row(model: Any, rows: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Per stage, milliseconds per request at batch 1 and at ``rows`` requests in one call."""
    return {
        stage: (
            _per_row_ms(stage, function, args, kwargs, 1, repeats),
            _per_row_ms(stage, function, args, kwargs, rows, repeats),
        )
        for stage, (function, args, kwargs) in _stage_calls(model).items()
    }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.merged_bound", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="shapes-flux")
    parser.add_argument("--requests", type=int, default=14)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cache-dir", type=Path, default=Path(".ditcache"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.model, cache_dir=args.cache_dir)
    bodies = mix(False, [args.model])
    bodies = [bodies[index % len(bodies)] for index in range(args.requests)]
    _leaf_share(model, bodies[:2])  # warm-up
    wall, leaves = _leaf_share(model, bodies)
    share = leaves / wall
    speedup = _per_row_speedup(model, args.rows, args.repeats)
    bound = 1 / ((1 - share) + share / speedup)
    print(f"{args.model}, one torch thread, {args.requests} requests of the load mix one at a time:")
    print(f"- leaves: {share:.1%} of the requests' wall time ({leaves:.2f} of {wall:.2f} s)")
    print(f"- the transformer per row at {args.rows} rows: {speedup:.2f}x faster than at 1 row")
    print(f"- so merging can add at most {bound:.2f}x throughput, every leaf merged {args.rows} ways")
    per_request_ms = wall / len(bodies) * 1000
    result = {"share": share, "speedup": speedup, "bound": bound}
    for stage, (alone_ms, merged_ms) in _stage_per_row(model, args.rows, args.repeats).items():
        saved = (alone_ms - merged_ms) / per_request_ms
        print(
            f"- {'text encoding' if stage == 'text' else 'decoding'}: {alone_ms:.2f} ms a request alone, "
            f"{merged_ms:.2f} ms each at {args.rows} in one call: merged, it would save {saved:.1%} of a "
            f"request's {per_request_ms:.0f} ms"
        )
        result[f"{stage}_saved"] = saved
    return result


if __name__ == "__main__":
    main()
