"""The mechanism: a dispatcher around a module's forward, and a handle that takes it off again."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import nn

from cache_engine.hooks import DispatchHandle, install_dispatcher, installed_handle
from tests.cache_engine.pipelines import build


def _pass_through(module: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return forward(*args, **kwargs)


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def test_dispatcher_sees_module_forward_and_arguments_and_decides_the_result(linear: nn.Linear) -> None:
    seen: list[tuple[nn.Module, tuple[Any, ...], dict[str, Any]]] = []

    def dispatch(module: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        seen.append((module, args, kwargs))
        return forward(*args, **kwargs) * 2

    x = torch.randn(2, 4)
    expected = linear(x)
    with install_dispatcher(linear, dispatch):
        doubled = linear(x)
    assert seen and seen[0][0] is linear and seen[0][1][0] is x
    assert torch.equal(doubled, expected * 2)
    assert torch.equal(linear(x), expected)


def test_remove_restores_the_class_forward_and_is_idempotent(linear: nn.Linear) -> None:
    x = torch.randn(2, 4)
    expected = linear(x)
    handle = install_dispatcher(linear, _pass_through)
    assert installed_handle(linear) is handle
    assert "forward" in linear.__dict__

    handle.remove()
    assert handle.removed
    assert "forward" not in linear.__dict__
    assert installed_handle(linear) is None
    handle.remove()
    assert "forward" not in linear.__dict__
    assert torch.equal(linear(x), expected)


def test_remove_restores_an_instance_forward_that_was_there_before(linear: nn.Linear) -> None:
    calls = []
    original = linear.forward

    def instance_forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(x)
        return original(x)

    linear.forward = instance_forward  # type: ignore[method-assign, assignment]
    handle = install_dispatcher(linear, _pass_through)
    linear(torch.randn(1, 4))
    assert len(calls) == 1  # the dispatcher wrapped the instance forward, not the class's
    handle.remove()
    assert linear.__dict__["forward"] is instance_forward


def test_context_manager_removes_even_on_error(linear: nn.Linear) -> None:
    with pytest.raises(RuntimeError, match="inside"), install_dispatcher(linear, _pass_through) as handle:
        assert isinstance(handle, DispatchHandle)
        raise RuntimeError("inside")
    assert handle.removed
    assert "forward" not in linear.__dict__


def test_a_second_dispatcher_on_the_same_module_is_refused(linear: nn.Linear) -> None:
    handle = install_dispatcher(linear, _pass_through)
    with pytest.raises(ValueError, match="already installed"):
        install_dispatcher(linear, _pass_through)
    handle.remove()
    # Once removed, the module takes a new one.
    install_dispatcher(linear, _pass_through).remove()


def test_signature_and_metadata_survive_on_real_transformer_modules() -> None:
    transformer = build("flux", cfg="distilled").pipe.transformer
    modules = [transformer, transformer.transformer_blocks[0], transformer.transformer_blocks[0].attn]
    before = [inspect.signature(m.forward) for m in modules]
    handles = [install_dispatcher(m, _pass_through) for m in modules]
    try:
        for module, signature in zip(modules, before, strict=True):
            assert inspect.signature(module.forward) == signature
            assert module.forward.__name__ == "forward"
            assert module.forward.__doc__ == type(module).forward.__doc__
            assert module.forward.__wrapped__ == module.__class__.forward.__get__(module)
    finally:
        for handle in handles:
            handle.remove()
    assert [inspect.signature(m.forward) for m in modules] == before


def test_torch_module_hooks_still_fire_around_the_dispatcher(linear: nn.Linear) -> None:
    order: list[str] = []

    def dispatch(module: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        order.append("dispatch")
        return forward(*args, **kwargs)

    pre = linear.register_forward_pre_hook(lambda *_: order.append("pre"))
    post = linear.register_forward_hook(lambda *_: order.append("post"))
    with install_dispatcher(linear, dispatch):
        linear(torch.randn(1, 4))
    pre.remove()
    post.remove()
    assert order == ["pre", "dispatch", "post"]
