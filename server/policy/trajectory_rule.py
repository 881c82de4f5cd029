"""``ditcache calibrate --trajectories``: the rule from a prompt's similarity to a kept one to the share of
steps it may skip, measured on the model as NIRVANA calibrates its rule.

Each calibration prompt runs once in full and keeps its trajectory. It is then paired with its most
similar other prompts (and one drawn at random, for the low similarities). For each pair the second prompt
runs from the first's kept latents at every kept step K, and is compared with what it makes uncached
from the same noise (the first prompt's seed): the difference is what the first K steps under the other
prompt cost, nothing else. The rule then gives each similarity the largest share K / N at which all but
``TAIL_RATE`` of the pairs at least that similar keep ``floor_psnr``; a lower similarity never skips more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from server.models.generation import GenerationParams, check_params, generate, trajectory_setting
from server.models.registry import ResidentModel
from server.models.trajectories import (
    KEPT_FRACTIONS,
    TrajectoryRule,
    TrajectoryRun,
    TrajectoryStore,
    kept_steps,
)
from server.policy.fidelity import output_pixels, psnr_of

__all__ = ["FLOOR_PSNR", "PairMeasure", "calibrate_trajectories", "fit_rule", "measure_pairs"]

# What a skip must keep, against the prompt's own run from the same noise.
FLOOR_PSNR = 30.0
# At most this share of the pairs at or above a similarity may fall under the floor.
TAIL_RATE = 0.1
# Fewer pairs than this at or above a similarity say nothing of it: it skips no more than the next.
MIN_PAIRS = 8
# The similarities the rule has points at.
SIMILARITIES: tuple[float, ...] = (0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
# Each prompt is paired with this many of its most similar others, and one at random.
NEIGHBOURS = 3
# Room for every calibration trajectory at once.
_STORE_BYTES = 2**34
# Resumes at any similarity, at any kept step: the calibration picks the step.
_ANY = TrajectoryRule(((-1.0, max(KEPT_FRACTIONS)),))


@dataclass(frozen=True)
class PairMeasure:
    """One prompt run from another's kept latents: their similarity, and per step K the PSNR against its
    own uncached run from the same noise."""

    similarity: float
    psnr: Mapping[int, float]


def _pixels(model: ResidentModel, params: GenerationParams, trajectory: TrajectoryRun | None) -> np.ndarray:
    return output_pixels(generate(model, params, trajectory=trajectory))


def measure_pairs(
    model: ResidentModel,
    prompts: Sequence[str],
    *,
    steps: int,
    guidance_scale: float,
    neighbours: int = NEIGHBOURS,
    log: Callable[[str], None] = print,
) -> list[PairMeasure]:
    """Run every prompt keeping its trajectory, then each from its neighbours' (see the module)."""

    def params(prompt: str, seed: int) -> GenerationParams:
        made = GenerationParams.from_defaults(
            model.defaults, prompt=prompt, steps=steps, guidance_scale=guidance_scale, seed=seed
        )
        check_params(model, made)
        return made

    if model.trajectory_probe is None:
        raise ValueError(
            f"model {model.name!r} ({type(model.pipeline).__name__}) cannot start from kept latents, "
            "or was loaded keeping none"
        )
    store = TrajectoryStore(_STORE_BYTES, _ANY)
    for index, prompt in enumerate(prompts):
        run = TrajectoryRun(
            store, trajectory_setting("", params(prompt, index)), f"p{index}", prompt, steps, resume=False
        )
        generate(model, params(prompt, index), trajectory=run)
        if run.embedding is None:
            raise ValueError(f"{type(model.pipeline).__name__}'s encode_prompt gave no embedding to compare")
    by_id = {entry.request_id: entry for entry in store.kept()}
    kept = [by_id[f"p{index}"] for index in range(len(prompts))]
    embeddings = np.stack([entry.embedding.numpy() for entry in kept])
    similarity = embeddings @ embeddings.T
    rng = np.random.default_rng(0)
    pairs: list[PairMeasure] = []
    for i, base in enumerate(kept):
        others = [int(j) for j in np.argsort(-similarity[i]) if j != i and prompts[j] != prompts[i]]
        chosen = [
            *others[:neighbours],
            *([int(rng.choice(others[neighbours:]))] if others[neighbours:] else []),
        ]
        for j in chosen:
            reference = _pixels(model, params(prompts[j], i), None)
            # Only the first prompt's trajectory to start from; the resumed runs keep none.
            alone = TrajectoryStore(_STORE_BYTES, _ANY)
            alone.put(base)
            by_step: dict[int, float] = {}
            for step in kept_steps(steps):
                run = TrajectoryRun(
                    alone,
                    base.setting,
                    f"p{j}-from-p{i}",
                    prompts[j],
                    steps,
                    resume=True,
                    max_skipped_steps=step,
                    keep=False,
                )
                resumed = _pixels(model, params(prompts[j], j), run)
                assert run.resumed is not None and run.resumed.steps_skipped == step
                by_step[step] = psnr_of(float(((resumed - reference) ** 2).sum()), resumed.size)
            pairs.append(PairMeasure(float(similarity[i, j]), by_step))
        log(f"  trajectories: prompt {i + 1}/{len(prompts)}")
    return pairs


def fit_rule(
    pairs: Sequence[PairMeasure], steps: int, *, floor_psnr: float = FLOOR_PSNR, tail_rate: float = TAIL_RATE
) -> TrajectoryRule:
    """The rule (see the module); a similarity whose pairs keep the floor at no kept step has no point."""
    points: list[tuple[float, float]] = []
    ceiling = max(KEPT_FRACTIONS)
    for lowest in SIMILARITIES:
        near = [pair for pair in pairs if pair.similarity >= lowest]
        if len(near) < MIN_PAIRS:
            continue
        allowed = int(tail_rate * len(near))
        share = 0.0
        for step in sorted(kept_steps(steps), reverse=True):
            under = sum(1 for pair in near if pair.psnr[step] < floor_psnr)
            if under <= allowed:
                share = step / steps
                break
        # A lower similarity never skips more than a higher one.
        ceiling = min(ceiling, share)
        if ceiling > 0:
            points.append((lowest, ceiling))
    return TrajectoryRule(tuple(points), floor_psnr=floor_psnr, pairs=len(pairs))


def calibrate_trajectories(
    model: ResidentModel,
    prompts: Sequence[str],
    *,
    steps: int,
    guidance_scale: float,
    log: Callable[[str], None] = print,
) -> tuple[TrajectoryRule, list[PairMeasure]]:
    log(f"calibrating trajectories of {model.name} at {steps} steps, guidance {guidance_scale:g}")
    pairs = measure_pairs(model, prompts, steps=steps, guidance_scale=guidance_scale, log=log)
    return fit_rule(pairs, steps), pairs
