"""The package's public surface: what ``__all__`` promises is there, and the reference API is diffusers'."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import diffusers
import pytest
from diffusers.models.cache_utils import CacheMixin

import cache_engine as ce

# The reference's entry points (its "Caching methods" page): module-level functions of diffusers ...
REFERENCE_FUNCTIONS = (
    "apply_pyramid_attention_broadcast",
    "apply_faster_cache",
    "apply_first_block_cache",
    "apply_taylorseer_cache",
)
# ... and CacheMixin methods, which the facade offers as functions of the transformer ...
REFERENCE_METHODS = ("enable_cache", "disable_cache", "cache_context")
# ... and its config classes (methods beyond the reference have config classes of their own).
REFERENCE_CONFIGS = (
    "PyramidAttentionBroadcastConfig",
    "FasterCacheConfig",
    "FirstBlockCacheConfig",
    "TaylorSeerCacheConfig",
)


def _parameters(function: object, *, skip_first: bool = False) -> list[tuple[str, object]]:
    assert callable(function)
    parameters = list(inspect.signature(function).parameters.values())[1 if skip_first else 0 :]
    # **kwargs of the reference's cache_context are passed through to its hook registry, which we lack.
    return [(p.name, p.kind) for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]


def test_all_names_only_what_the_package_defines_for_its_users() -> None:
    assert len(ce.__all__) == len(set(ce.__all__))
    public = {
        name
        for name, value in vars(ce).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    # Nothing exported that is not there, and nothing public left out of __all__.
    assert set(ce.__all__) == public
    for name in ce.__all__:
        value = getattr(ce, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            # Defined here, not a third-party name passed through.
            assert value.__module__.startswith("cache_engine."), (name, value.__module__)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from cache_engine import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(ce.__all__)


@pytest.mark.parametrize("name", REFERENCE_FUNCTIONS)
def test_reference_functions_take_the_references_arguments(name: str) -> None:
    assert name in ce.__all__
    assert _parameters(getattr(ce, name)) == _parameters(getattr(diffusers, name))


@pytest.mark.parametrize("name", REFERENCE_METHODS)
def test_reference_methods_are_functions_of_the_transformer(name: str) -> None:
    assert name in ce.__all__
    ours = inspect.signature(getattr(ce, name))
    assert next(iter(ours.parameters)) == "transformer"
    assert _parameters(getattr(ce, name), skip_first=True) == _parameters(
        getattr(CacheMixin, name), skip_first=True
    )


def test_each_method_has_one_config_class_exported_under_its_name() -> None:
    assert set(ce.CONFIG_CLASSES) == set(ce.METHOD_NAMES)
    assert len(set(ce.CONFIG_CLASSES.values())) == len(ce.CONFIG_CLASSES)
    for name, config_class in ce.CONFIG_CLASSES.items():
        assert ce.method_name(config_class()) == name
        assert getattr(ce, config_class.__name__) is config_class and config_class.__name__ in ce.__all__
    with pytest.raises(ValueError, match="unknown cache config"):
        ce.method_name(object())


@pytest.mark.parametrize("name", REFERENCE_CONFIGS)
def test_reference_configs_are_methods_here(name: str) -> None:
    assert inspect.isclass(getattr(diffusers, name))
    assert getattr(ce, name) in ce.CONFIG_CLASSES.values()


def test_errors_are_value_errors_and_invalid_values_keep_their_field() -> None:
    assert issubclass(ce.UnsupportedMethodError, ValueError)
    with pytest.raises(ValueError) as raised:
        ce.FirstBlockCacheConfig(threshold=-1.0)
    error = raised.value
    assert isinstance(error, ce.InvalidConfigValue) and error.field == "threshold"
    # Errors may cross a process boundary (a worker in another process); the field must survive it.
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.field) == (ce.InvalidConfigValue, str(error), "threshold")


def test_import_has_no_side_effects() -> None:
    """Importing the engine loads neither diffusers nor anything that installs hooks."""
    code = "import sys, cache_engine; print('diffusers' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("method", ce.METHOD_NAMES)
def test_every_config_field_is_described_on_the_config(method: str) -> None:
    """Each field says what it does in its metadata (the one place it is described), and describing it
    changed no default: the config still builds from its defaults, and keeps them."""
    config_class = ce.CONFIG_CLASSES[method]
    config = config_class()
    for field in dataclasses.fields(config_class):
        doc = field.metadata.get("doc")
        assert isinstance(doc, str) and doc.strip(), f"{config_class.__name__}.{field.name} has no doc"
        assert getattr(config, field.name) == field.default, f"{config_class.__name__}.{field.name}"
