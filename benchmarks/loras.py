"""What LoRA adapters cost: ``python -m benchmarks.loras``.

Loads ``shapes-flux`` four times through the server's own loading (``load_model``): two copies holding two
rank-``--rank`` adapters (seeded random pairs on every linear module of its attention and feed-forward
layers, written as diffusers writes adapters and read back as the server reads them), one at the served
default, where a request folds its adapters into weights of its own, and one that never folds (what every
module past the fold budget, and every merged forward, does: the update added to the shared weight's
product); two holding none (the second shows how far two copies with nothing to tell them apart differ:
the noise floor). Then ``-n`` rounds at the served defaults, each round running, back to back so that a
shared machine's drift falls on all alike (and starting with another each round): the bare copy; the
adapted copy without adapters, with one, with two; the other adapted copy with one and with two. Prints
the median denoising time of each and its ratio to the bare copy's.
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

import torch

from server.models.generation import GenerationParams, generate
from server.models.registry import ResidentModel, load_model
from shapes import dataset

_TOUCHED = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2", "proj_mlp", "proj_out")


def write_adapter(model: ResidentModel, folder: Path, rank: int, seed: int) -> None:
    from diffusers import FluxPipeline

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for path, module in model.pipeline.transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and path.endswith(_TOUCHED):
            state[f"{path}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
            state[f"{path}.lora_B.weight"] = (
                torch.randn(module.out_features, rank, generator=generator) * 0.01
            )
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=12, help="rounds")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        bare = load_model("shapes-flux", cache_dir=root)
        # A second bare copy: how far two copies of one model differ with nothing to tell them apart.
        control = load_model("shapes-flux", cache_dir=root)
        adapted = load_model("shapes-flux", cache_dir=root)
        added = load_model("shapes-flux", cache_dir=root, lora_fold_bytes=0)
        for index, name in enumerate(("first", "second")):
            write_adapter(adapted, root / name, args.rank, seed=index)
            for model in (adapted, added):
                assert model.adapters is not None
                model.adapters.load(name, str(root / name))
        one, two = (("first", 1.0),), (("first", 1.0), ("second", 0.5))
        runs = {
            "no adapter, model holding none": (bare, ()),
            "no adapter, another copy holding none": (control, ()),
            "no adapter, model holding two": (adapted, ()),
            "one adapter, folded": (adapted, one),
            "two adapters, folded": (adapted, two),
            "one adapter, added": (added, one),
            "two adapters, added": (added, two),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        prompts = [scene.caption for scene in dataset.scenes(args.n, 20_261_209)]
        names = list(runs)
        for index, prompt in enumerate(prompts):
            # Each round starts with another run, so that no run always follows the same one.
            for name in names[index % len(names) :] + names[: index % len(names)]:
                model, loras = runs[name]
                params = GenerationParams.from_defaults(
                    model.defaults, prompt=prompt, seed=index, loras=loras
                )
                times[name].append(generate(model, params).timings_ms["denoising"])
    base = statistics.median(times["no adapter, model holding none"])
    print(f"shapes-flux, {args.n} rounds at its defaults, rank-{args.rank} adapters\n")
    print("| run | median denoising ms | ratio |")
    print("| --- | ---: | ---: |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.3f} |")
    layer, update = layer_and_update_us(width=128, tokens=80, rank=args.rank)
    print(
        f"\nOne {128}-wide linear layer over 80 tokens (an attention projection of shapes-flux): {layer:.1f} us; "
        f"the rank-{args.rank} update added to it, as an unfolded module computes it: {update:.1f} us "
        f"({update / layer:.0%}, for {2 * args.rank / 128:.0%} of the layer's multiply-adds)"
    )
    return 0


def layer_and_update_us(width: int, tokens: int, rank: int, repeats: int = 20_000) -> tuple[float, float]:
    """Microseconds per call of a ``width``-square linear layer on ``tokens`` rows, and of a rank-``rank``
    update added to its output (down, up, scaled, summed: what ``server.models.adapters`` runs)."""
    from torch.nn import functional

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, width, generator=generator)
    weight, bias = torch.randn(width, width, generator=generator), torch.randn(width, generator=generator)
    down, up = torch.randn(rank, width, generator=generator), torch.randn(width, rank, generator=generator)
    output = functional.linear(x, weight, bias)

    def per_call(run: Any) -> float:
        for _ in range(repeats // 10):
            run()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        return (time.perf_counter() - start) / repeats * 1e6

    with torch.no_grad():
        layer = per_call(lambda: functional.linear(x, weight, bias))
        update = per_call(lambda: output + functional.linear(functional.linear(x, down), up) * 0.5)
    return layer, update


if __name__ == "__main__":
    sys.exit(main())
