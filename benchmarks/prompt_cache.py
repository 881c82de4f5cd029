"""What the prompt cache saves: ``python -m benchmarks.prompt_cache``.

Loads ``shapes-flux`` twice through the server's own loading (``load_model``): once keeping prompt
embeddings across requests, once keeping none. Then, alternating between the two so that a shared
machine's drift falls on both alike, it runs ``-n`` requests of distinct prompts at the served defaults
(20 steps, true CFG 3 against the empty negative prompt: two prompt encodings a request), and prints the
median of each stage of the pipeline for both, and the ratio of text encoding times. Every prompt is new,
so what the cache answers is the negative prompt, as it does for every CFG request after the first; the
images of the two models are compared, and must be the same bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from server.models.generation import GenerationParams, generate
from server.models.registry import load_model
from shapes import dataset

_MIB = 2**20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=24, help="requests, each with a prompt of its own")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as cache:
        kept = load_model("shapes-flux", cache_dir=Path(cache), text_cache_bytes=256 * _MIB)
        plain = load_model("shapes-flux", cache_dir=Path(cache))
        prompts = [scene.caption for scene in dataset.scenes(args.n + 1, 20_261_207)]
        stages: dict[str, dict[str, list[float]]] = {"kept": {}, "none": {}}
        identical = 0
        # The first request fills the cache with the empty negative prompt; it is not counted.
        for index, prompt in enumerate(prompts):
            overrides = {} if args.steps is None else {"steps": args.steps}
            params = GenerationParams.from_defaults(kept.defaults, prompt=prompt, seed=index, **overrides)
            outputs = []
            for name, model in (
                (("kept", kept), ("none", plain)) if index % 2 else (("none", plain), ("kept", kept))
            ):
                result = generate(model, params)
                assert result.images is not None
                outputs.append(np.asarray(result.images[0]))
                if index:
                    for stage, ms in result.timings_ms.items():
                        stages[name].setdefault(stage, []).append(ms)
            identical += int(np.array_equal(outputs[0], outputs[1]))
    print(f"shapes-flux, {args.n} requests of distinct prompts, true CFG against the empty negative prompt\n")
    print("| stage (median ms) | prompt cache | none | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for stage in stages["none"]:
        with_cache, without = (
            statistics.median(stages["kept"][stage]),
            statistics.median(stages["none"][stage]),
        )
        print(f"| {stage} | {with_cache:.2f} | {without:.2f} | {with_cache / without:.2f} |")
    saved = 1 - statistics.median(stages["kept"]["text_encoding"]) / statistics.median(
        stages["none"]["text_encoding"]
    )
    print(
        f"\ntext encoding {saved:.0%} shorter with the cache; identical images: {identical} of {len(prompts)}"
    )
    return 0 if identical == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
