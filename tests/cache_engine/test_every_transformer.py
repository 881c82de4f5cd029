"""Every transformer class diffusers exports, under every method: it acts correctly, or it is refused
when the policy is checked, never failing during a run and never returning a wrong output.

Two runs of six denoiser calls per class and method, on the tiny seeded builds of ``tiny_pipelines.transformers``:
- the same input at every call: a correct cache gives back the uncached output at every call;
- a moving input (latents drifting, timestep falling): something is reused, and nothing fails.
A method is in ``engine.supported_methods`` exactly where its policy is not refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import diffusers
import pytest
import torch
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

import cache_engine as ce
from benchmarks.coverage import CONFIGS, METHODS, Subject, outcome, subject
from cache_engine import teacache
from cache_engine.targets import build_layout, has_modulated_input, is_attention_module, modulated_input
from tiny_pipelines.transformers import TinyTransformer
from tiny_pipelines.transformers.catalog import NOT_DENOISERS, TINY_TRANSFORMERS

BY_NAME = {tiny.class_name: tiny for tiny in TINY_TRANSFORMERS}


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
    assert exported - set(BY_NAME) - set(NOT_DENOISERS) == set(), "classes not classified here"
    assert set(BY_NAME) - exported == set(), "classes diffusers no longer exports"
    assert set(BY_NAME).isdisjoint(NOT_DENOISERS)


@pytest.fixture(scope="module")
def subjects() -> Iterator[Callable[[str], Subject]]:
    """Each class built once per module, with its engine, closed when the module is done."""
    built: dict[str, Subject] = {}

    def get(class_name: str) -> Subject:
        if class_name not in built:
            built[class_name] = subject(BY_NAME[class_name])
        return built[class_name]

    yield get
    for entry in built.values():
        entry.engine.close()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("class_name", sorted(BY_NAME))
def test_method_acts_correctly_or_is_refused(
    class_name: str, method: str, subjects: Callable[[str], Subject]
) -> None:
    entry = subjects(class_name)
    found = outcome(entry, method)
    assert found.kind in ("acts", "refused"), found.detail
    if method != "taylorseer_lite":  # a mode of TaylorSeer, which is supported wherever its default acts
        listed = ce.method_name(CONFIGS[method]()) in entry.engine.supported_methods
        assert listed == (found.kind == "acts"), found.detail


def _first_attention(block: nn.Module) -> nn.Module:
    return next(module for module in block.modules() if module is not block and is_attention_module(module))


def _modulated_and_attended(spec: TinyTransformer) -> tuple[torch.Tensor, torch.Tensor] | None:
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
    for spec in TINY_TRANSFORMERS:
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
