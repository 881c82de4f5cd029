"""Every transformer class diffusers exports, under every method: it acts correctly, or it is refused
when the policy is checked, never failing during a run and never returning a wrong output.

Two runs of six denoiser calls per class and method, on the tiny seeded builds of ``tests.cache_engine.zoo``:
- the same input at every call: a correct cache gives back the uncached output at every call;
- a moving input (latents drifting, timestep falling): something is reused, and nothing fails.
A method is in ``engine.supported_methods`` exactly where its policy is not refused.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import diffusers
import pytest
import torch
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

import cache_engine as ce
from cache_engine import teacache
from cache_engine.targets import build_layout, has_modulated_input, is_attention_module, modulated_input
from tests.cache_engine.zoo import ZooSpec
from tests.cache_engine.zoo.catalog import NOT_DENOISERS, SPECS

CALLS = 6

# A config per method at which it reuses whatever it can within six calls: thresholds no change reaches,
# warmups of one call.
CONFIGS: dict[str, Callable[[], object]] = {
    "first_block_cache": lambda: ce.FirstBlockCacheConfig(threshold=100.0),
    "mag_cache": lambda: ce.MagCacheConfig(
        threshold=100.0,
        max_skip_steps=2,
        retention_ratio=0.0,
        num_inference_steps=CALLS,
        mag_ratios=(1.0,) * CALLS,
    ),
    "dbcache": lambda: ce.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=100.0, max_warmup_steps=1
    ),
    "teacache": lambda: ce.TeaCacheConfig(rel_l1_thresh=100.0, coefficients=(1.0, 0.0)),
    "sea_cache": lambda: ce.SeaCacheConfig(threshold=100.0, num_inference_steps=CALLS),
    "taylorseer": lambda: ce.TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32
    ),
    "taylorseer_lite": lambda: ce.TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32, use_lite_mode=True
    ),
    "guarded_taylorseer": lambda: ce.GuardedTaylorSeerCacheConfig(step_tolerance=1e6),
    "pyramid_attention_broadcast": lambda: ce.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        temporal_attention_block_skip_range=2,
        cross_attention_block_skip_range=2,
    ),
}
# FasterCache is left out: on a batch it takes for [unconditional, conditional] it approximates the first
# half from the second, so equal inputs give a different output by design.

SPECS_BY_NAME = {spec.class_name: spec for spec in SPECS}


def _exported_transformers() -> set[str]:
    found = set()
    for name in dir(diffusers):
        try:
            value = getattr(diffusers, name)
        except (AttributeError, ImportError, RuntimeError):
            continue
        if (
            inspect.isclass(value)
            and issubclass(value, ModelMixin)
            and value.__module__.startswith("diffusers.models.transformers.")
        ):
            found.add(name)
    return found


def test_every_exported_transformer_is_classified() -> None:
    exported = _exported_transformers()
    assert exported - set(SPECS_BY_NAME) - set(NOT_DENOISERS) == set(), "classes the zoo does not know"
    assert set(SPECS_BY_NAME) - exported == set(), "zoo classes diffusers no longer exports"
    assert set(SPECS_BY_NAME).isdisjoint(NOT_DENOISERS)


@dataclasses.dataclass
class _Built:
    model: nn.Module
    kwargs: dict[str, Any]
    engine: ce.CacheEngine
    still: list[torch.Tensor]
    moving_inputs: list[dict[str, Any]]
    moving: list[torch.Tensor]


def _sample(output: Any) -> torch.Tensor:
    while not isinstance(output, torch.Tensor):
        output = output[0] if isinstance(output, (tuple, list)) else output.sample
    return output


def _moving_inputs(spec: ZooSpec, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    latent = kwargs[spec.latent]
    # Some denoisers take their latents as a list of per-sample tensors (Z-Image, Cosmos 3).
    latents = list(latent) if isinstance(latent, list) else [latent]
    generator = torch.Generator().manual_seed(1)
    drifts = [torch.randn(one.shape, generator=generator, dtype=one.dtype) for one in latents]
    inputs = []
    for call in range(CALLS):
        moved = dict(kwargs)
        shifted = [one + 0.05 * call * drift for one, drift in zip(latents, drifts, strict=True)]
        moved[spec.latent] = shifted if isinstance(latent, list) else shifted[0]
        if spec.timestep is not None:
            timestep = kwargs[spec.timestep]
            value = spec.timestep_start + (spec.timestep_end - spec.timestep_start) * (0.1 + 0.15 * call)
            moved[spec.timestep] = (
                torch.full_like(timestep, value) if isinstance(timestep, torch.Tensor) else value
            )
        inputs.append(moved)
    return inputs


@pytest.fixture(scope="module")
def built() -> Iterator[Callable[[str], _Built]]:
    cache: dict[str, _Built] = {}

    def get(class_name: str) -> _Built:
        if class_name not in cache:
            spec = SPECS_BY_NAME[class_name]
            model, kwargs = spec.build()
            with torch.no_grad():
                still = _sample(model(**kwargs)).clone()
                moving_inputs = _moving_inputs(spec, kwargs)
                moving = [_sample(model(**inputs)).clone() for inputs in moving_inputs]
            engine = ce.CacheEngine(model)
            cache[class_name] = _Built(model, kwargs, engine, [still], moving_inputs, moving)
        return cache[class_name]

    yield get
    for entry in cache.values():
        entry.engine.close()


def _refused(engine: ce.CacheEngine, config: object) -> str | None:
    try:
        engine.check(config)
    except ce.UnsupportedMethodError as error:
        return str(error)
    return None


def _relative_error(output: torch.Tensor, expected: torch.Tensor) -> float:
    return float((output - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("class_name", sorted(SPECS_BY_NAME))
def test_method_acts_correctly_or_is_refused(
    class_name: str, method: str, built: Callable[[str], _Built]
) -> None:
    entry = built(class_name)
    config = CONFIGS[method]()
    refusal = _refused(entry.engine, config)
    if method != "taylorseer_lite":  # a mode of TaylorSeer, which is supported wherever its default acts
        assert (refusal is None) == (ce.method_name(config) in entry.engine.supported_methods), refusal
    if refusal is not None:
        return
    with torch.no_grad():
        with entry.engine.session(config):
            errors = [
                _relative_error(_sample(entry.model(**entry.kwargs)), entry.still[0]) for _ in range(CALLS)
            ]
        assert max(errors) <= 1e-4, f"same input, different output: {errors}"
        with entry.engine.session(config) as session:
            outputs = [_sample(entry.model(**inputs)) for inputs in entry.moving_inputs]
            stats = session.stats
    assert all(
        out.shape == ref.shape and torch.isfinite(out).all()
        for out, ref in zip(outputs, entry.moving, strict=True)
    )
    assert stats.blocks_reused + stats.attention_reused > 0 or stats.steps_cached > 0, stats


def _first_attention(block: nn.Module) -> nn.Module:
    return next(module for module in block.modules() if module is not block and is_attention_module(module))


def _modulated_and_attended(spec: ZooSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """TeaCache's reading of the first block's modulated input in one call, and what that block's first
    attention received there; None where the table has no reader for the block."""
    model, kwargs = spec.build()
    runs = teacache.runs(build_layout(model))
    if not runs or not has_modulated_input(runs[0][0]):
        return None
    site = runs[0][0]
    seen: dict[str, Any] = {}

    def block_hook(_: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        seen.setdefault("block", (args, kw))

    def attention_hook(_: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        seen.setdefault("attention", kw.get("hidden_states", args[0] if args else None))

    hooks = [
        site.module.register_forward_pre_hook(block_hook, with_kwargs=True),
        _first_attention(site.module).register_forward_pre_hook(attention_hook, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(**kwargs)
            args, kw = seen["block"]
            return modulated_input(site, args, kw), seen["attention"]
    finally:
        for hook in hooks:
            hook.remove()


def test_teacache_reads_the_input_of_the_first_blocks_attention() -> None:
    """TeaCache's signal is the first block's image stream as its attention receives it, after the norm
    and the timestep modulation: where the table has a reader, it recomputes exactly that."""
    checked = []
    for spec in SPECS:
        found = _modulated_and_attended(spec)
        if found is None:
            continue
        modulated, attended = found
        assert modulated.shape == attended.shape, spec.class_name
        assert torch.allclose(modulated, attended, atol=1e-5), spec.class_name
        checked.append(spec.class_name)
    # The families TeaCache publishes coefficients for, at least, are read.
    assert {"FluxTransformer2DModel", "HunyuanVideoTransformer3DModel", "LTXVideoTransformer3DModel"} <= set(
        checked
    )
