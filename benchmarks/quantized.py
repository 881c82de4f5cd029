"""int8 weights (``--quantize int8``): weight bytes, the uncached output's PSNR, every method run.

``python -m benchmarks.quantized`` loads each built-in model as the server does, in float32 and in
bfloat16, each with and without int8 weight-only quantization (torchao), and reports the transformers'
weight bytes and their ratios, the PSNR of the uncached image or video (8-bit pixels, same seed) of
the quantized model against the unquantized one, and whether every cache method the model supports
runs on the quantized model and reuses something. Then the same byte ratios for the engine
benchmark's configurations (``benchmarks.models``, width 128).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cache_engine import methods
from server.models.generation import GenerationParams, generate
from server.models.registry import ResidentModel, load_model
from server.ops.acceleration import Acceleration, quantize, weight_bytes

from . import models


def _pixels(
    model: ResidentModel, params: GenerationParams, config: object | None = None
) -> tuple[np.ndarray, int]:
    with model.cache.session(config) as run:
        result = generate(model, params)
    frames = result.images if result.images is not None else (result.videos or [[]])[0]
    reused = 0 if run.stats is None else run.stats.blocks_reused + run.stats.attention_reused
    return np.stack([np.asarray(frame, dtype=np.float64) for frame in frames]), reused


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    mse = float(((reference - other) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(255**2 / mse))


def served(name: str, cache_dir: Path) -> list[str]:
    cells: list[str] = []
    methods_cell = ""
    loaded = {
        (dtype, quant): load_model(
            name,
            cache_dir=cache_dir,
            dtype=dtype,
            accelerate=Acceleration(quantize="int8" if quant else "none"),
        )
        for dtype in ("float32", "bfloat16")
        for quant in (False, True)
    }
    for dtype in ("float32", "bfloat16"):
        plain, int8 = loaded[(dtype, False)], loaded[(dtype, True)]
        defaults = plain.defaults
        params = GenerationParams.from_defaults(defaults, prompt="a red circle on a blue square", seed=3)
        reference, _ = _pixels(plain, params)
        output, _ = _pixels(int8, params)
        cells += [
            f"{plain.weight_bytes:,}",
            f"{int8.weight_bytes:,}",
            f"{int8.weight_bytes / plain.weight_bytes:.3f}",
        ]
        cells.append(f"{psnr(reference, output):.1f}")
        if dtype == "float32":
            ran = []
            for method in int8.supported_methods:
                config_class = methods.CONFIG_CLASSES[method]
                _, reused = _pixels(int8, params, methods._PROBE_CONFIGS.get(config_class, config_class)())
                ran.append(method if reused else f"{method} (no reuse)")
            methods_cell = ", ".join(ran)
    return [name, *cells, methods_cell]


def bench_bytes(family: str) -> list[str]:
    full = models.build(family).transformer
    half = models.build(family).transformer.to(torch.bfloat16)
    cells = [family]
    for module in (full, half):
        before = weight_bytes(module)
        quantize(module, "int8", device="cpu")
        cells += [f"{before:,}", f"{weight_bytes(module):,}", f"{weight_bytes(module) / before:.3f}"]
    return cells


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quantized", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--models", nargs="+", default=["shapes-flux", "tiny-flux", "tiny-wan"])
    parser.add_argument("--cache-dir", type=Path, default=None, help="where built-in models are built")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.cache_dir or Path(scratch)
        rows = []
        for name in args.models:
            print(f"{name}: loading four ways and generating", file=sys.stderr, flush=True)
            rows.append(served(name, cache_dir))
    served_table = _table(
        [
            "model",
            "fp32 bytes",
            "int8 bytes",
            "int8/fp32",
            "PSNR int8 vs fp32 (dB)",
            "bf16 bytes",
            "int8 bytes (bf16 rest)",
            "int8/bf16",
            "PSNR int8 vs bf16 (dB)",
            "methods run on int8",
        ],
        rows,
    )
    bench_table = _table(
        [
            "benchmark config",
            "fp32 bytes",
            "int8 bytes",
            "int8/fp32",
            "bf16 bytes",
            "int8 bytes (bf16 rest)",
            "int8/bf16",
        ],
        [bench_bytes(family) for family in ("flux", "wan", "cogvideox")],
    )
    text = f"{served_table}\n\n{bench_table}\n"
    print(text)
    return text


if __name__ == "__main__":
    main()
