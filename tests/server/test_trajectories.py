"""Trajectories kept across requests, on real tiny pipelines: a run resumed from a kept trajectory skips
its first steps' denoiser calls and goes on from the kept latents."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cache_engine.targets import build_layout
from server.models.generation import GenerationParams, GenerationResult, generate, trajectory_setting
from server.models.registry import ResidentModel, load_model
from server.models.trajectories import (
    DEFAULT_RULE,
    RESUMABLE_PIPELINES,
    Kept,
    TrajectoryRule,
    TrajectoryRun,
    TrajectoryStore,
    kept_steps,
)
from tiny_pipelines import tiny_pipeline

STEPS = 5


@pytest.fixture(scope="module", params=["flux", "sd3", "cogview4", "ltx", "hunyuan_video"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ResidentModel:
    folder = tmp_path_factory.mktemp("trajectories") / request.param
    tiny = tiny_pipeline(request.param)
    tiny.build().save_pretrained(folder)
    model = load_model(str(folder), cache_dir=folder.parent / "cache", trajectory_cache_bytes=2**24)
    # Its folder's defaults are the full model's sizes: the tiny one is run at its small ones.
    sizes = {
        name: tiny.small_call[name] for name in ("width", "height", "num_frames") if name in tiny.small_call
    }
    return dataclasses.replace(model, defaults=dataclasses.replace(model.defaults, **sizes))


def _params(model: ResidentModel, prompt: str, seed: int) -> GenerationParams:
    return GenerationParams.from_defaults(model.defaults, prompt=prompt, seed=seed, steps=STEPS)


def _run(model: ResidentModel, params: GenerationParams, request_id: str, *, resume: bool) -> TrajectoryRun:
    assert model.trajectories is not None
    return TrajectoryRun(
        model.trajectories,
        trajectory_setting("", params),
        request_id,
        params.prompt,
        params.steps,
        resume=resume,
    )


def _pixels(result: GenerationResult) -> np.ndarray:
    if result.videos is not None:
        return np.stack([np.asarray(frame) for video in result.videos for frame in video])
    assert result.images is not None
    return np.stack([np.asarray(image) for image in result.images])


def _counting_block_calls(model: ResidentModel) -> list[int]:
    calls = [0]
    block = build_layout(model.pipeline.transformer).blocks[0].module

    def count(module: torch.nn.Module, args: Any) -> None:
        calls[0] += 1

    block.register_forward_pre_hook(count)
    return calls


def test_the_pipeline_is_one_that_resumes(model: ResidentModel) -> None:
    assert type(model.pipeline).__name__ in RESUMABLE_PIPELINES
    assert model.trajectories is not None and model.trajectory_probe is not None


def test_a_run_resumed_from_the_same_prompt_skips_steps_and_makes_what_the_kept_run_made(
    model: ResidentModel,
) -> None:
    calls = _counting_block_calls(model)
    kept_run = _run(model, _params(model, "a red circle", 1), "kept", resume=False)
    kept = generate(model, _params(model, "a red circle", 1), trajectory=kept_run)
    passes = calls[0] // STEPS
    assert kept_run.resumed is None and kept_run.embedding is not None

    calls[0] = 0
    # Another seed: its noise is never used, since the run goes on from the kept latents.
    resumed_run = _run(model, _params(model, "a red circle", 2), "resumed", resume=True)
    resumed = generate(model, _params(model, "a red circle", 2), trajectory=resumed_run)
    assert resumed_run.resumed is not None
    assert resumed_run.resumed.request_id == "kept"
    assert resumed_run.resumed.similarity == 1.0 and resumed_run.resumed.same_prompt
    # The uncalibrated rule: the same prompt may skip up to 90% of the steps, at a kept step.
    skipped = max(k for k in kept_steps(STEPS) if k <= int(DEFAULT_RULE.same_prompt * STEPS))
    assert skipped == 4
    assert resumed_run.resumed.steps_skipped == skipped
    assert calls[0] == (STEPS - skipped) * passes
    assert np.array_equal(_pixels(resumed), _pixels(kept))
    # A resumed run does not keep its own: its early latents are another run's.
    assert model.trajectories is not None and len(model.trajectories.kept()) == 1


def test_another_prompt_under_the_rule_runs_every_step_as_a_plain_call(model: ResidentModel) -> None:
    params = _params(model, "a blue square at the top", 3)
    plain = generate(model, params)
    run = _run(model, params, "other", resume=True)
    assert np.array_equal(_pixels(generate(model, params, trajectory=run)), _pixels(plain))
    assert run.resumed is None


def test_the_kept_latents_are_only_those_of_kept_steps(model: ResidentModel) -> None:
    assert model.trajectories is not None
    for kept in model.trajectories.kept():
        assert set(kept.latents) <= set(kept_steps(STEPS))
        assert all(latents.device.type == "cpu" for latents in kept.latents.values())


# -- the rule and the store, without a pipeline ------------------------------------------------------------


def test_kept_steps_leave_a_step_run_and_one_left() -> None:
    assert kept_steps(20) == (2, 4, 6, 10, 14, 18)
    assert kept_steps(2) == (1,)
    assert kept_steps(1) == ()


def test_a_rule_gives_the_share_of_the_first_point_reached() -> None:
    rule = TrajectoryRule(((0.99, 0.5), (0.9, 0.2), (0.8, 0.1)), same_prompt=0.7)
    assert rule.share(0.3, same_prompt=True) == 0.7
    assert rule.share(1.0) == 0.5
    assert rule.share(0.95) == 0.2
    assert rule.share(0.8) == 0.1
    assert rule.share(0.79) == 0.0
    with pytest.raises(ValueError, match="most similar down"):
        TrajectoryRule(((0.9, 0.2), (0.99, 0.5)))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        TrajectoryRule(((0.9, 1.0),))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        TrajectoryRule((), same_prompt=1.0)
    assert TrajectoryRule.from_json(rule.to_json()) == rule


def _kept(request_id: str, setting: object, direction: list[float], prompt: str = "") -> Kept:
    embedding = torch.tensor(direction, dtype=torch.float32)
    return Kept(request_id, setting, prompt or request_id, embedding / embedding.norm(), {2: torch.zeros(4)})


def test_the_nearest_is_of_the_same_setting_and_the_store_keeps_its_bound() -> None:
    store = TrajectoryStore(max_bytes=3 * (16 + 8))
    store.put(_kept("a", "tenant-1", [1.0, 0.0]))
    store.put(_kept("b", "tenant-1", [1.0, 1.0]))
    store.put(_kept("c", "tenant-2", [1.0, 0.1]))
    query = torch.tensor([1.0, 0.05]) / torch.tensor([1.0, 0.05]).norm()
    found = store.nearest("tenant-1", "another", query)
    assert found is not None and found[0].request_id == "a" and found[1] < 1.0
    # The same prompt comes first, however far its embedding.
    found = store.nearest("tenant-1", "b", query)
    assert found is not None and found[0].request_id == "b" and found[1] == 1.0
    found = store.nearest("tenant-2", "another", query)
    assert found is not None and found[0].request_id == "c"
    assert store.nearest("tenant-3", "another", query) is None
    # A fourth goes over the bound: the least recently used ("a": "b" and "c" were found after it) leaves.
    store.put(_kept("d", "tenant-1", [0.0, 1.0]))
    assert store.bytes <= store.max_bytes
    assert sorted(kept.request_id for kept in store.kept()) == ["b", "c", "d"]


def test_a_run_that_may_not_resume_never_looks(model: ResidentModel) -> None:
    params = _params(model, "a red circle", 4)
    run = dataclasses.replace(_run(model, params, "x", resume=False), keep=False)
    generate(model, params, trajectory=run)
    assert run.resumed is None


def test_a_model_keeps_no_trajectories_without_a_bound(tmp_path: Path) -> None:
    folder = tmp_path / "flux"
    tiny_pipeline("flux").build().save_pretrained(folder)
    model = load_model(str(folder), cache_dir=tmp_path / "cache")
    assert model.trajectories is None and model.trajectory_probe is None
