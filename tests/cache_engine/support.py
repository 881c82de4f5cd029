"""Helpers shared by the engine's tests: configs at which each method really reuses, runs of the
reference implementation (diffusers' own hooks), counters placed under the engine's dispatchers, the
checks of configs a model refuses, small seeded transformers outside any pipeline, and sessions run side
by side in lockstep.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import diffusers
import pytest
import torch
from diffusers.hooks import HookRegistry
from diffusers.models import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from torch import nn

import cache_engine as ce
from cache_engine.session import active_session
from tests.cache_engine.pipelines import FAMILY_INFO, TinyPipeline, build, clone_with_shared_transformer, run

# Six steps instead of the factory's ten: enough for every method below to compute, reuse and
# compute again, and it keeps the suite short.
STEPS = 6

# The families every method is checked on, each in a CFG mode where the reference has no
# documented departure (true CFG as separate calls is covered by the departure tests).
PARITY_CASES: tuple[tuple[str, str], ...] = (
    ("flux", "distilled"),
    ("cogvideox", "batched"),
    ("wan", "distilled"),
)

# Every family in every CFG mode it has.
ALL_CASES: tuple[tuple[str, str], ...] = tuple(
    (family, cfg) for family, info in FAMILY_INFO.items() for cfg in info.cfg_modes
)

METHODS: tuple[str, ...] = (
    "first_block_cache",
    "taylorseer",
    "taylorseer_lite",
    "pyramid_attention_broadcast",
    "faster_cache",
)

# The reference's TaylorSeer defaults match only attention named ``attn`` under ``transformer_blocks``
# and friends; these name the blocks' attention modules of the families that call them attn1/attn2.
TAYLORSEER_ATTENTION: dict[str, list[str]] = {
    "cogvideox": [r"transformer_blocks\.\d+\.attn1"],
    "wan": [r"blocks\.\d+\.attn[12]"],
    "ltx": [r"transformer_blocks\.\d+\.attn[12]"],
    "cogview4": [r"transformer_blocks\.\d+\.attn1"],
}

# The layout the reference's FasterCache needs for its frequency split (ours reads it from the model table).
REFERENCE_TENSOR_FORMAT = {"cogvideox": "BFCHW", "wan": "BCFHW", "hunyuan_video": "BCFHW"}


def tiny(family: str, cfg: str | None = None, *, steps: int = STEPS) -> TinyPipeline:
    tp = build(family, cfg=cfg)
    tp.call_kwargs["num_inference_steps"] = steps
    return tp


def method_kwargs(method: str, tp: TinyPipeline, *, explicit_identifiers: bool = True) -> dict[str, Any]:
    """Arguments, valid for both our config class and the reference's, at which ``method`` reuses."""
    if method == "first_block_cache":
        return {"threshold": 0.5}
    if method in ("taylorseer", "taylorseer_lite"):
        kwargs: dict[str, Any] = {
            "cache_interval": 3,
            "disable_cache_before_step": 2,
            "taylor_factors_dtype": torch.float32,
            "use_lite_mode": method == "taylorseer_lite",
        }
        if method == "taylorseer" and explicit_identifiers and tp.family in TAYLORSEER_ATTENTION:
            kwargs["cache_identifiers"] = TAYLORSEER_ATTENTION[tp.family]
        return kwargs
    if method == "pyramid_attention_broadcast":
        return {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (0, 1000)}
    if method == "faster_cache":
        return {
            # Every step but the first: the schedules start at 999 or 1000, and the reference, when the
            # very first call falls inside this window, skips attention with nothing cached and fails.
            "spatial_attention_timestep_skip_range": (-1, 990),
            "unconditional_batch_timestep_skip_range": (-1, 1000),
            "unconditional_batch_skip_range": 2,
            "tensor_format": REFERENCE_TENSOR_FORMAT.get(tp.family, "BCHW"),
            "is_guidance_distilled": tp.cfg == "distilled",
        }
    raise ValueError(method)


_CONFIG_CLASS = {
    "first_block_cache": "FirstBlockCacheConfig",
    "taylorseer": "TaylorSeerCacheConfig",
    "taylorseer_lite": "TaylorSeerCacheConfig",
    "pyramid_attention_broadcast": "PyramidAttentionBroadcastConfig",
    "faster_cache": "FasterCacheConfig",
}


def our_config(method: str, tp: TinyPipeline, **overrides: Any) -> Any:
    kwargs = {**method_kwargs(method, tp), **overrides}
    return getattr(ce, _CONFIG_CLASS[method])(**kwargs)


def reference_config(method: str, tp: TinyPipeline, **overrides: Any) -> Any:
    """The reference's config for the same arguments; PAB and FasterCache need its timestep callback."""
    kwargs = {**method_kwargs(method, tp), **overrides}
    if method in ("pyramid_attention_broadcast", "faster_cache"):
        pipe = tp.pipe
        kwargs["current_timestep_callback"] = lambda: pipe.current_timestep
    return getattr(diffusers, _CONFIG_CLASS[method])(**kwargs)


def reference_run(tp: TinyPipeline, config: Any) -> torch.Tensor:
    """Run ``tp`` with diffusers' own hooks enabled, and take them off again whatever happens."""
    transformer = tp.pipe.transformer
    transformer.enable_cache(config)
    try:
        return run(tp)
    finally:
        transformer.disable_cache()


def session_run(
    engine: ce.CacheEngine, tp: TinyPipeline, config: Any
) -> tuple[torch.Tensor, ce.SessionStats]:
    with engine.session(config) as session:
        output = run(tp)
    return output, session.stats


def our_run(tp: TinyPipeline, config: object) -> tuple[torch.Tensor, ce.SessionStats]:
    """``tp`` in one session of ``config`` on an engine made for it and closed after, whatever happens."""
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        return session_run(engine, tp, config)
    finally:
        engine.close()


def applied_reference_run(
    tp: TinyPipeline, apply: Callable[[nn.Module, Any], object], config: Any, hooks: Sequence[str]
) -> torch.Tensor:
    """``tp`` under a reference method applied straight to its transformer (SD3 and PixArt have no
    ``enable_cache``), with the hooks named ``hooks`` taken off again whatever happens."""
    transformer = tp.pipe.transformer
    apply(transformer, config)
    try:
        return run(tp)
    finally:
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        for name in hooks:
            registry.remove_hook(name, recurse=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@dataclass
class Rig:
    """A tiny pipeline with a CacheEngine, and an identically seeded one left to the reference."""

    tp: TinyPipeline
    engine: ce.CacheEngine
    _reference: TinyPipeline | None = None

    @property
    def reference(self) -> TinyPipeline:
        if self._reference is None:
            self._reference = tiny(
                self.tp.family, self.tp.cfg, steps=self.tp.call_kwargs["num_inference_steps"]
            )
        return self._reference


RigFactory = Callable[[str, str | None], Rig]


@contextmanager
def rigs(*, steps: int = STEPS) -> Iterator[RigFactory]:
    """A factory of rigs built on first use and kept until the block ends, then closed."""
    made: dict[tuple[str, str | None], Rig] = {}

    def get(family: str, cfg: str | None = None) -> Rig:
        if (family, cfg) not in made:
            tp = tiny(family, cfg, steps=steps)
            made[(family, cfg)] = Rig(tp, ce.CacheEngine(tp.pipe.transformer))
        return made[(family, cfg)]

    try:
        yield get
    finally:
        for rig in made.values():
            rig.engine.close()


@dataclass
class ForwardCounter:
    """Counts real executions of a module's forward, per branch if told how to read the branch.

    Installed as the instance's ``forward`` before any CacheEngine exists, so the engine's dispatcher
    wraps it: a call the cache serves never reaches it.
    """

    module: nn.Module
    branch: Callable[[], str | None] = lambda: None
    calls: int = 0
    by_branch: dict[str | None, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        original = self.module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            name = self.branch()
            self.calls += 1
            self.by_branch[name] = self.by_branch.get(name, 0) + 1
            return output

        functools.update_wrapper(forward, original)
        self.module.forward = forward


class BranchRecorder:
    """Tracks the pass (``cond``, ``uncond``, ...) the pipeline is in, by wrapping ``cache_context``.

    Installed before the CacheEngine, whose own ``cache_context`` then calls this one inside.
    """

    def __init__(self, transformer: nn.Module) -> None:
        self.current: str | None = None
        original = cast("Callable[..., Any]", transformer.cache_context)

        @contextmanager
        def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
            previous, self.current = self.current, name
            try:
                with original(name, **kwargs):
                    yield
            finally:
                self.current = previous

        transformer.__dict__["cache_context"] = cache_context


def record_block_runs(caller: nn.Module, block: nn.Module) -> list[bool]:
    """Per call of ``caller``, whether ``block`` really ran during it; the list fills as the calls come.

    Installed before any CacheEngine exists: a pre-hook on ``caller`` sees every call, the ones the cache
    serves too, while ``block``'s own forward, wrapped by the engine's dispatcher, sees only real runs.
    """
    ran: list[bool] = []
    caller.register_forward_pre_hook(lambda module, args: ran.append(False))
    real_forward = block.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        ran[-1] = True
        return real_forward(*args, **kwargs)

    block.forward = forward
    return ran


def named(transformer: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in transformer.named_modules()
        if any(re.fullmatch(pattern, name) for pattern in patterns)
    }


def field_names(config_class: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class)]


def assert_default_matches_reference(name: str, field_name: str) -> None:
    """Our config class ``name`` has the reference's default for ``field_name``."""
    ours = getattr(ce, name)()
    theirs = getattr(diffusers, name)()
    assert getattr(ours, field_name) == getattr(theirs, field_name)


def assert_invalid(config_class: type, field_name: str, value: Any) -> None:
    """Building ``config_class`` with ``field_name=value`` raises InvalidConfigValue for that field.

    The field travels on the error, where the server reads it; the message names it too, for people.
    """
    with pytest.raises(ce.InvalidConfigValue, match=re.escape(field_name)) as raised:
        config_class(**{field_name: value})
    assert raised.value.field == field_name
    assert isinstance(raised.value, ValueError)


def run_with(tp: TinyPipeline, *, seed: int = 0, **extra: Any) -> torch.Tensor:
    """``run`` with extra pipeline arguments (a step callback); the same latents as ``run`` otherwise."""
    call = cast("Callable[..., Any]", tp.pipe)
    output = call(**tp.call_kwargs, generator=torch.Generator("cpu").manual_seed(seed), **extra)
    return output[0].float()


def assert_refused_on_the_model(
    engine: ce.CacheEngine, config: object, field_name: str, *, method: str
) -> ce.InvalidConfigValue:
    """A session of ``config`` on ``engine`` is refused with InvalidConfigValue for ``field_name``,
    and none is left bound; ``method`` stays offered, since a config that fits the model runs.

    Returns the error, for what its message should say about the model.
    """
    with pytest.raises(ce.InvalidConfigValue) as raised, engine.session(config):
        pass
    assert raised.value.field == field_name
    assert active_session() is None
    assert method in engine.supported_methods
    return raised.value


def assert_unsupported(model: nn.Module, config: object, method: str) -> None:
    """An engine on ``model`` does not offer ``method``, and refuses a session of ``config`` naming it."""
    engine = ce.CacheEngine(model)
    try:
        assert method not in engine.supported_methods
        with pytest.raises(ce.UnsupportedMethodError, match=method) as raised, engine.session(config):
            pass
    finally:
        engine.close()
    assert raised.value.method == method
    assert active_session() is None


# -- standalone transformers ------------------------------------------------------------------------------

ModelT = TypeVar("ModelT", bound=nn.Module)


def seeded_model(model_class: Callable[..., ModelT], **config: Any) -> ModelT:
    """``model_class(**config)`` in eval mode, with the weights of seed 0; the global random state is left
    as it was, so that the tests after it draw what they would have drawn."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(**config)
    return model.eval()


def single_block_flux() -> FluxTransformer2DModel:
    """A Flux transformer of one double-stream block and nothing else, with seeded weights."""
    return small_flux(double_blocks=1, single_blocks=0)


def small_flux(*, double_blocks: int, single_blocks: int) -> FluxTransformer2DModel:
    """A Flux transformer of the given blocks at the smallest widths, with seeded weights."""
    return seeded_model(
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=4,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )


_FLUX2_CHANNELS = 32
_FLUX2_TEXT_DIM = 96
_FLUX2_TEXT_TOKENS = 8


def tiny_flux2() -> Flux2Transformer2DModel:
    """Flux 2: two double-stream blocks, then two single-stream blocks on text and image tokens joined."""
    return seeded_model(
        Flux2Transformer2DModel,
        patch_size=1,
        in_channels=_FLUX2_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_FLUX2_TEXT_DIM,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )


def flux2_call(transformer: nn.Module, tokens: int) -> torch.Tensor:
    """One call of a ``tiny_flux2`` on ``tokens`` image tokens; its inputs are seeded by ``tokens``, so
    calls of one size see the same inputs and calls of another size a new shape."""
    generator = torch.Generator().manual_seed(tokens)
    with torch.no_grad():
        output = transformer(
            hidden_states=torch.randn(1, tokens, _FLUX2_CHANNELS, generator=generator),
            encoder_hidden_states=torch.randn(1, _FLUX2_TEXT_TOKENS, _FLUX2_TEXT_DIM, generator=generator),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(tokens, 4),
            txt_ids=torch.zeros(_FLUX2_TEXT_TOKENS, 4),
            return_dict=False,
        )[0]
    assert isinstance(output, torch.Tensor)
    return output


# -- isolation ------------------------------------------------------------------------------------------

# A pipeline, the config of its session and the seed of its initial noise.
Job = tuple[TinyPipeline, object, int]

# Seconds a run waits for the others at a step, and a thread is waited for at the end.
LOCKSTEP_TIMEOUT = 120

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


def lockstep_callback(barrier: threading.Barrier) -> StepCallback:
    """A step callback that holds its run at ``barrier`` until the runs beside it end the same step."""

    def in_lockstep(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        barrier.wait()
        return {}

    return in_lockstep


def _run_alone(engine: ce.CacheEngine, job: Job) -> torch.Tensor:
    tp, config, seed = job
    with engine.session(config):
        return run_with(tp, seed=seed)


def run_in_lockstep(engine: ce.CacheEngine, jobs: Sequence[Job]) -> list[torch.Tensor]:
    """Run each job in its own thread and session, every step of one beside the others'.

    A barrier in the step callback holds each thread until the others have finished the same step.
    """
    barrier = threading.Barrier(len(jobs), timeout=LOCKSTEP_TIMEOUT)
    in_lockstep = lockstep_callback(barrier)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        tp, config, seed = jobs[index]
        try:
            barrier.wait()  # the sessions start together
            with engine.session(config):
                results[index] = run_with(tp, seed=seed, callback_on_step_end=in_lockstep)
        except BaseException as error:  # reported below; a thread's exception is otherwise lost
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOCKSTEP_TIMEOUT)
    assert not errors, errors
    return [results[index] for index in range(len(jobs))]


def alone_and_in_lockstep(
    tp: TinyPipeline, config_a: object, config_b: object, *, seed_b: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``tp`` under ``config_a`` and a second pipeline on the same transformer under ``config_b``, on
    one engine: the two outputs of each run alone, then the two of both run in lockstep."""
    jobs = [(tp, config_a, 0), (clone_with_shared_transformer(tp), config_b, seed_b)]
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        alone = [_run_alone(engine, job) for job in jobs]
        return alone, run_in_lockstep(engine, jobs)
    finally:
        engine.close()
