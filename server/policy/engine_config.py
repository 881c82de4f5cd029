"""A cache policy ⇄ the engine's frozen config.

``engine_config`` is the one place a policy becomes what the engine runs, whatever wrote it: a request's
``cache`` (``to_engine_config``), a model's calibration or the calibration sweep (plain field dicts).
``describe`` goes the other way, to show a config in the wire's vocabulary: the applied policy in an
answer, a model's presets and method defaults on its card.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from cache_engine import CONFIG_CLASSES, CacheConfig, InvalidConfigValue, method_name
from server.errors import InvalidRequest
from server.ops.dtypes import dtype_name, dtype_named
from server.protocol import NOT_ON_THE_WIRE, CachePreset, CacheSpec, CacheTarget

# Config fields that describe the run rather than the policy: the server knows them from the request.
_RUN_FIELDS = ("num_inference_steps", "num_steps")
# Config fields holding a torch dtype, named on the wire by its name ("float32").
_DTYPE_FIELDS = ("taylor_factors_dtype",)

# A model's own values per method and config field: what fills the fields a policy leaves out.
MethodValues = Mapping[str, Mapping[str, Any]]


def engine_config(
    method: str,
    given: Mapping[str, Any],
    model_values: MethodValues | None = None,
    *,
    steps: int | None = None,
) -> CacheConfig | None:
    """The engine config of ``method`` with the fields ``given`` (wire names and values; None: no caching).

    A field left out takes, in this order of precedence, the run's step count ``steps`` (for the fields
    that carry it), the model's value (``model_values``: its calibrated ``mag_ratios``, its fitted
    DBCache front blocks), the config's default. Raises InvalidRequest naming ``cache.<field>`` when the
    engine refuses a value.
    """
    if method == "none":
        return None
    if method not in CONFIG_CLASSES:
        raise InvalidRequest(f"unknown cache method {method!r}", param="cache.method")
    fields = {field.name for field in dataclasses.fields(CONFIG_CLASSES[method])}
    values = dict((model_values or {}).get(method, {}))
    if steps is not None:
        values.update({name: steps for name in _RUN_FIELDS if name in fields})
    values.update(given)
    for name in _DTYPE_FIELDS:
        if isinstance(values.get(name), str):
            values[name] = dtype_named(values[name])
    unknown = sorted(set(values) - fields)
    if unknown:
        raise InvalidRequest(f"{method} has no field {unknown[0]!r}", param=f"cache.{unknown[0]}")
    try:
        config: CacheConfig = CONFIG_CLASSES[method](**values)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param_of(exc)) from exc
    return config


def to_engine_config(
    spec: CacheSpec | None, model_values: MethodValues | None = None, *, steps: int | None = None
) -> CacheConfig | None:
    """The engine config of a request's method and the fields it set (see ``engine_config``); a preset or
    a target is a policy the model names, resolved by ``server.policy.resolve``."""
    if spec is None:
        return None
    if isinstance(spec, (CachePreset, CacheTarget)):
        raise TypeError("a preset or a target is resolved on its model (server.policy.resolve)")
    given = spec.model_dump(include=spec.model_fields_set - {"method"})
    return engine_config(spec.method, given, model_values, steps=steps)


def method_of(config: CacheConfig | None) -> str:
    return "none" if config is None else method_name(config)


def describe(config: CacheConfig | None) -> dict[str, Any]:
    """``config`` as a request body's ``cache`` would write it, every field a client can set filled in."""
    method = method_of(config)
    described: dict[str, Any] = {"method": method}
    if config is None:
        return described
    hidden = NOT_ON_THE_WIRE[method]
    for field in dataclasses.fields(config):
        if field.name not in hidden:
            described[field.name] = _wire_value(getattr(config, field.name))
    return described


def _wire_value(value: Any) -> Any:
    """A config's value as JSON writes it: a dtype by its name, tuples and tensors as lists."""
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_wire_value(item) for item in value]
    return value


def param_of(exc: ValueError) -> str:
    """``cache.<field>`` for a value the engine's config refused, ``cache`` for any other refusal."""
    return f"cache.{exc.field}" if isinstance(exc, InvalidConfigValue) else "cache"
