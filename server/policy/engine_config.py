"""A request's cache policy ⇄ the engine's frozen config.

``to_engine_config`` is the one place a body's ``cache`` becomes what the engine runs; ``describe``
goes the other way, to show presets and the applied policy in the wire vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cache_engine import CONFIG_CLASSES, CacheConfig, InvalidConfigValue, method_name
from server.errors import InvalidRequest
from server.ops.dtypes import dtype_name, dtype_named
from server.protocol import POLICY_CLASSES, CachePreset, CacheSpec, CacheTarget, NoCache

# Config fields that describe the run rather than the policy: the server knows them from the request.
_RUN_FIELDS = ("num_inference_steps", "num_steps")
# Config fields holding a torch dtype, named on the wire by its name ("float32").
_DTYPE_FIELDS = ("taylor_factors_dtype",)


def to_engine_config(
    spec: CacheSpec | None,
    presets: Mapping[str, CacheConfig | None],
    calibration: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    steps: int | None = None,
) -> CacheConfig | None:
    """The engine config for ``spec`` (None: no caching); a preset is looked up in ``presets``.

    ``calibration`` holds the model's per-checkpoint values by method and field (MagCache's
    ``mag_ratios``); they fill the fields the request left out, and so does ``steps``, the run's step
    count, for the fields that carry it. A ``target`` must be resolved first (``server.policy.named``).
    Raises InvalidRequest naming ``cache.<field>`` when the engine refuses a value.
    """
    if spec is None or isinstance(spec, NoCache):
        return None
    if isinstance(spec, CachePreset):
        if spec.preset not in presets:
            raise InvalidRequest(f"this model has no preset {spec.preset!r}", param="cache.preset")
        return presets[spec.preset]
    if isinstance(spec, CacheTarget):
        raise TypeError("a target is resolved to a policy before it becomes a config")
    values = spec.model_dump(exclude={"method"})
    for name, value in (calibration or {}).get(spec.method, {}).items():
        if name not in spec.model_fields_set:
            values[name] = value
    if steps is not None:
        for name in _RUN_FIELDS:
            if name in values and name not in spec.model_fields_set:
                values[name] = steps
    for name in _DTYPE_FIELDS:
        if isinstance(values.get(name), str):
            values[name] = dtype_named(values[name])
    try:
        config: CacheConfig = CONFIG_CLASSES[spec.method](**values)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param_of(exc)) from exc
    return config


def method_of(config: CacheConfig | None) -> str:
    return "none" if config is None else method_name(config)


def describe(config: CacheConfig | None) -> dict[str, Any]:
    """``config`` as a request body's ``cache`` would write it (fields clients cannot set left out)."""
    method = method_of(config)
    wire = POLICY_CLASSES[method]
    values = {name: getattr(config, name) for name in wire.model_fields if name != "method"}
    for name in _DTYPE_FIELDS:
        if isinstance(values.get(name), torch.dtype):
            values[name] = dtype_name(values[name])
    return wire.model_validate({"method": method, **values}).model_dump(mode="json")


def param_of(exc: ValueError) -> str:
    """``cache.<field>`` for a value the engine's config refused, ``cache`` for any other refusal."""
    return f"cache.{exc.field}" if isinstance(exc, InvalidConfigValue) else "cache"
