"""Compiled blocks on a GPU: FLUX-sized and Wan-sized transformers, random weights, bfloat16.

``python -m benchmarks.gpu`` measures what ``python -m benchmarks.engine --compile`` measures on the
CPU, at production sizes: per family, two identically seeded pipelines with a cache engine, one with
its blocks compiled as the server's ``--compile`` does it, both with the same attention backend
(``flash`` where the machine runs it, else ``native``); the compiled one warmed at two sizes in both forms, then run
at five request sizes under every cache method, counting recompilations; then each configuration
timed on both, interleaved, in wall-clock time with the device synchronised.

    python -m benchmarks.gpu                                  # flux and wan, 10 steps, 3 repeats
    python -m benchmarks.gpu --families flux --steps 20 --repeats 5 --json out.json --markdown out.md
    python -m benchmarks.gpu --attention-backend native --mode max-autotune-no-cudagraphs

Configurations (nothing is downloaded; text encoders are left out and prompt embeddings are random):

- ``flux``: FLUX.1-dev's transformer (19 double and 38 single blocks, width 3072, 24 heads), 1024x1024
  (4096 image tokens), 512 text tokens, guidance-distilled: one transformer call per step.
- ``wan``: Wan 2.1 1.3B's transformer (30 blocks, width 1536, 12 heads), 480x832, 33 frames, CFG as two
  calls per step; ``--wan 14b`` takes Wan 2.1 14B's (40 blocks, width 5120, 40 heads) instead.

Output: progress on stderr; on stdout (and in ``--markdown``) the table of ``benchmarks.compiled``:
per family and configuration (``uncached`` and each method at the CPU benchmark's settings), ms per
step eager and compiled (wall clock, medians), the compiled speedup (eager over compiled, median of
back-to-back pairs, range in brackets), the method's speedup on top of compilation, the largest
absolute difference between compiled and eager latents, and whether both ran the same blocks; then
per family the warm-up (compile) time, the graphs compiled in it, the five request sizes and the
recompilations they caused. ``--json`` writes the same as a list of objects, one per family, with
the raw seconds of every run under ``cases[].samples`` (``eager``, ``compiled``, ``ratio``, ``over``).
Needs a CUDA device; about 15 minutes on one H100-class GPU for both families at the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.ops import acceleration

from . import compiled
from .engine import METHODS


@dataclass(frozen=True)
class GpuFamily:
    """What the methods' benchmark configs read of a family (see ``benchmarks.engine.METHODS``)."""

    name: str
    cfg: str
    tensor_format: str

    @property
    def label(self) -> str:
        return f"{self.name} ({self.cfg} CFG)"


@dataclass
class GpuPipeline:
    family: GpuFamily
    pipe: Any
    call_kwargs: dict[str, Any]

    @property
    def transformer(self) -> torch.nn.Module:
        module: torch.nn.Module = self.pipe.transformer
        return module


WAN_SIZES: dict[str, dict[str, int]] = {
    "1.3b": {"num_layers": 30, "num_attention_heads": 12, "ffn_dim": 8960},
    "14b": {"num_layers": 40, "num_attention_heads": 40, "ffn_dim": 13824},
}


def _flux(device: torch.device, gen: torch.Generator) -> GpuPipeline:
    # Imported from their modules: diffusers' lazy top-level names type-check as placeholder classes.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    transformer = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1-dev's configuration
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        norm_num_groups=2,
    )
    # No text encoders: the prompt embeddings are passed in (None does not type-check as a component).
    components: dict[str, Any] = {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "text_encoder": None,
        "tokenizer": None,
        "text_encoder_2": None,
        "tokenizer_2": None,
        "transformer": transformer,
    }
    pipe = FluxPipeline(**components)
    kwargs = {
        "prompt_embeds": torch.randn(1, 512, 4096, generator=gen, device=device, dtype=torch.bfloat16),
        "pooled_prompt_embeds": torch.randn(1, 768, generator=gen, device=device, dtype=torch.bfloat16),
        "height": 1024,
        "width": 1024,
        "guidance_scale": 3.5,
        "max_sequence_length": 512,
    }
    return GpuPipeline(GpuFamily("flux", "distilled", "BCHW"), pipe, kwargs)


def _wan(device: torch.device, gen: torch.Generator, size: str) -> GpuPipeline:
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    transformer = WanTransformer3DModel(**WAN_SIZES[size])
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    components: dict[str, Any] = {
        "tokenizer": None,
        "text_encoder": None,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "transformer": transformer,
    }
    pipe = WanPipeline(**components)
    text = (1, 512, 4096)
    kwargs = {
        "prompt_embeds": torch.randn(*text, generator=gen, device=device, dtype=torch.bfloat16),
        "negative_prompt_embeds": torch.randn(*text, generator=gen, device=device, dtype=torch.bfloat16),
        "guidance_scale": 5.0,
        "height": 480,
        "width": 832,
        "num_frames": 33,
        "max_sequence_length": 512,
    }
    return GpuPipeline(GpuFamily("wan", "separate", "BCFHW"), pipe, kwargs)


def build(
    family: str, *, device: torch.device, steps: int, wan: str, backend: str, seed: int = 0
) -> GpuPipeline:
    """``family`` with seeded random weights, built on ``device`` in bfloat16, with ``backend`` set."""
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.bfloat16)
        try:
            gen = torch.Generator(device).manual_seed(seed + 1)
            bp = _flux(device, gen) if family == "flux" else _wan(device, gen, wan)
        finally:
            torch.set_default_dtype(default_dtype)
    bp.pipe.to(device)
    bp.transformer.eval()
    set_backend: Any = getattr(bp.transformer, "set_attention_backend")  # noqa: B009 (diffusers' models only)
    set_backend(backend)
    bp.pipe.set_progress_bar_config(disable=True)
    bp.call_kwargs.update(num_inference_steps=steps, output_type="latent", return_dict=True)
    return bp


def pick_backend(requested: str | None, device: torch.device) -> str:
    """``requested``, or flash attention where this machine runs it, else torch's native SDPA."""
    for name in [requested] if requested else ["flash", "native"]:
        try:
            acceleration.check_attention_backend(name, device=device, dtype=torch.bfloat16)
        except acceleration.AccelerationError as exc:
            if requested:
                raise SystemExit(str(exc)) from exc
            print(f"{exc}; trying the next backend", file=sys.stderr)
            continue
        return name
    return "native"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["flux", "wan"], choices=["flux", "wan"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wan", choices=sorted(WAN_SIZES), default="1.3b", help="which Wan 2.1 size")
    parser.add_argument("--attention-backend", default=None, help="default: flash where it runs, else native")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    merged = parser.add_argument_group("merged forwards (--merged, benchmarks.gpu_merged)")
    merged.add_argument(
        "--merged", action="store_true", help="one at a time against --max-batch merged, FLUX"
    )
    merged.add_argument("--max-batch", type=int, default=8)
    merged.add_argument("--requests", type=int, default=16)
    merged.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    args = parser.parse_args(argv)
    if not args.merged and ("--max-batch" in (argv or sys.argv) or "--sizes" in (argv or sys.argv)):
        parser.error("--max-batch and --sizes are for --merged")
    return args


def main(argv: Sequence[str] | None = None) -> list[compiled.FamilyResult]:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks.gpu needs a CUDA device; on a CPU run python -m benchmarks.engine --compile"
        )
    backend = pick_backend(args.attention_backend, device)
    if args.merged:
        from benchmarks import gpu_merged

        gpu_merged.main(
            args,
            functools.partial(build, "flux", device=device, steps=args.steps, wan=args.wan, backend=backend),
        )
        return []

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    cases = [compiled.Case("uncached", None), *(compiled.Case(case.name, case.ours) for case in METHODS)]
    started = time.perf_counter()
    results = []
    for family in args.families:
        log(f"{family}: building (bfloat16, attention backend {backend})")
        results.append(
            compiled.bench_family(
                family,
                cases,
                build=functools.partial(
                    build, family, device=device, steps=args.steps, wan=args.wan, backend=backend
                ),
                steps=args.steps,
                repeats=args.repeats,
                rng=random.Random(args.seed),
                log=log,
                clock=time.perf_counter,
                mode=args.mode,
                sync=torch.cuda.synchronize,
            )
        )
        torch.cuda.empty_cache()
    header = (
        f"Run: {torch.cuda.get_device_name(device)}, {args.steps} steps, {args.repeats} repeats, bfloat16, "
        f"attention backend {backend}, compile mode {args.mode or 'default'}, Wan {args.wan}, torch "
        f"{torch.__version__}; the benchmark took {time.perf_counter() - started:.0f} s. Times: wall clock "
        "with the device synchronised; every ratio the median over the repeats of runs made back to back."
    )
    table = compiled.render(results, header=header, clock="wall")
    print(table)
    if args.markdown is not None:
        args.markdown.write_text(table)
    if args.json is not None:
        args.json.write_text(json.dumps([dataclasses.asdict(result) for result in results], indent=1))
    return results


if __name__ == "__main__":
    main()
