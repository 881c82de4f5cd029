"""A compiled model's warm-up: the generations that leave every compiled form of its blocks ready before
the first request, run by the server at start and by the compiled benchmark alike."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from PIL import Image

import cache_engine as ce
from server.models.generation import GenerationParams, InvalidGenerationParams, check_params, generate
from server.models.registry import ResidentModel
from server.models.tasks import text_tasks
from server.ops.acceleration import CompileClock


def warm_up_params(model: ResidentModel) -> list[GenerationParams]:
    """Two generations that leave the compiled blocks ready for any request.

    The first compiles for the default size; the second differs in width, height and frames, which
    makes Dynamo recompile once with those sizes dynamic. Non-square, so that no two sizes look equal
    by accident and get tied together. Both make one image or video: Dynamo specialises a batch of
    one, so the first request for more (``n`` > 1) compiles once more, and no further batch does. A
    model that needs an image (an image-to-video model's) animates a grey one.
    """
    defaults, limits = model.defaults, model.limits
    steps = max(2, model.call_spec.min_steps)
    image = None
    if not text_tasks(model.kind, model.call_spec):
        image = Image.new("RGB", (defaults.width, defaults.height), (128, 128, 128))
    first = GenerationParams.from_defaults(defaults, prompt="warm-up", steps=steps, image=image)
    step = model.size_multiple
    frames = defaults.num_frames
    if frames is not None:
        frames = (
            frames + model.frame_step
            if frames + model.frame_step <= limits.max_frames
            else frames - model.frame_step
        )
    candidates = [
        dataclasses.replace(first, width=width, height=height, num_frames=frames)
        for width, height in (
            (defaults.width - step, defaults.height - 2 * step),
            (defaults.width + step, defaults.height + 2 * step),
            (defaults.width - step, defaults.height + step),
        )
    ]
    for params in candidates:
        try:
            check_params(model, params)
        except InvalidGenerationParams:
            continue
        return [first, params]
    return [first]


@dataclass(frozen=True)
class WarmUpPass:
    """One pass of a compiled model's warm-up: run at each warm-up size under ``config``, in the block
    form ``whole_blocks`` picks, with at least ``min_steps`` steps."""

    config: object | None
    whole_blocks: bool = True
    min_steps: int = 2


# Replaying policies run over this many steps at warm-up: PAB's ranges of 2 and 3 cycle in four.
_TAP_WARM_UP_STEPS = 4


def warm_up_passes() -> tuple[WarmUpPass, ...]:
    """What leaves every compiled form of a block ready, the server's warm-up and the benchmark's alike:
    no cache policy twice, once with the blocks compiled whole (what most policies run) and once through
    the dispatchers inside them (what FasterCache runs), then the policies replaying tapped attention in
    every combination a request makes of it.

    Over four steps, PAB with ranges 2 (spatial, temporal) and 3 (cross) runs and replays each kind of
    attention inside a block against the other; TaylorSeer replays every attention module at once, with
    a prediction rather than a former output. Each combination is a graph of the whole block.
    """
    everywhere = (-1.0, 1001.0)
    replaying = (
        ce.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            temporal_attention_block_skip_range=2,
            cross_attention_block_skip_range=3,
            spatial_attention_timestep_skip_range=everywhere,
            temporal_attention_timestep_skip_range=everywhere,
            cross_attention_timestep_skip_range=everywhere,
        ),
        ce.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
    )
    return (
        WarmUpPass(None, whole_blocks=True),
        WarmUpPass(None, whole_blocks=False),
        *(WarmUpPass(config, min_steps=_TAP_WARM_UP_STEPS) for config in replaying),
    )


def warm_up(model: ResidentModel) -> CompileClock:
    """Run the warm-up generations on ``model``, one per warm-up size and pass
    (:func:`warm_up_passes`), and time them."""
    clock = CompileClock()
    with clock.measure():
        for warm in warm_up_passes():
            if warm.config is not None:
                try:
                    model.cache.check(warm.config)
                except ValueError:
                    continue  # nothing of it applies to this model
            for params in warm_up_params(model):
                with model.cache.session(warm.config, whole_blocks=warm.whole_blocks):
                    generate(model, dataclasses.replace(params, steps=max(params.steps, warm.min_steps)))
    return clock
