"""LoRA adapters of a resident model, chosen per request and owned by it, as its cache state is.

An adapter is read with diffusers' own ``lora_state_dict`` of the pipeline's class (so the formats it
reads, the community ones it converts included, are read here), and kept as its low-rank pairs per
linear module of the transformer. The shared weights never change: a forward hook on each module some
adapter touches adds, for the request in progress only, each of its adapters' update
``B(A(x)) * (weight * alpha / rank)``, in the order the request names them, as PEFT does after
diffusers' ``set_adapters``. The hooks are there only while some request with adapters runs: a
module with a hook takes PyTorch's slower call path, which a request without adapters would otherwise
pay on every module an adapter touches. In a forward merged from several requests' (``--max-batch``),
each request's adapters go to its own rows, so requests with different adapters, or none, share one
forward.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional
from torch.utils.hooks import RemovableHandle

from cache_engine.batching import MergedCall, merged_calls
from server.errors import Conflict

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["Adapter", "AdapterError", "AdapterGone", "Adapters", "LowRank"]

_PREFIX = "transformer."


class AdapterError(ValueError):
    """An adapter this model cannot take, and why."""


class AdapterGone(Conflict):
    """A request named an adapter that was removed while it waited."""


@dataclass(frozen=True)
class LowRank:
    down: torch.Tensor  # A: (rank, in_features)
    up: torch.Tensor  # B: (out_features, rank)
    # alpha / rank: what the adapter's own scaling multiplies its update by.
    scaling: float


@dataclass(frozen=True)
class Adapter:
    name: str
    source: str
    rank: int
    # Per module path in the transformer.
    modules: Mapping[str, LowRank]

    @property
    def bytes(self) -> int:
        return sum(
            pair.down.numel() * pair.down.element_size() + pair.up.numel() * pair.up.element_size()
            for pair in self.modules.values()
        )


# The adapters of the request in progress, with their weights, in the order it names them.
_ACTIVE: ContextVar[tuple[tuple[Adapter, float], ...]] = ContextVar("ditcache_active_adapters", default=())


class Adapters:
    """One resident model's adapters, and the hooks that apply them per request."""

    def __init__(self, pipeline: DiffusionPipeline) -> None:
        self.pipeline = pipeline
        self.transformer: nn.Module = pipeline.transformer
        self._adapters: dict[str, Adapter] = {}
        self._hooks: dict[str, RemovableHandle] = {}
        # Requests running with adapters: the hooks stay while there is one.
        self._users = 0
        # Per adapter name, the requests running with it: a removal waits for them.
        self._in_use: dict[str, int] = {}
        self._lock = threading.Condition()

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __iter__(self) -> Iterator[Adapter]:
        return iter(list(self._adapters.values()))

    def __len__(self) -> int:
        return len(self._adapters)

    def load(self, name: str, source: str) -> Adapter:
        """Read ``source`` (a file, a folder or a hub id) as adapter ``name``; raises AdapterError."""
        if name in self._adapters:
            raise AdapterError(f"an adapter named {name!r} is loaded already")
        reader = getattr(type(self.pipeline), "lora_state_dict", None)
        if reader is None:
            raise AdapterError(f"{type(self.pipeline).__name__} takes no LoRA adapters")
        try:
            read = reader(source, return_alphas=True)
        except TypeError:
            read = (reader(source), None)
        except Exception as exc:
            raise AdapterError(f"could not read adapter {name!r} from {source!r}: {exc}") from exc
        state, alphas = (read[0], read[1]) if isinstance(read, tuple) else (read, None)
        adapter = self._adapter(name, source, state, alphas or {})
        with self._lock:
            self._adapters[name] = adapter
            if self._users:
                self._hook(adapter)
        return adapter

    @contextmanager
    def applied(self, chosen: Sequence[tuple[str, float]]) -> Iterator[None]:
        """Run the code inside with the adapters ``chosen`` (name, weight) added to their modules."""
        with self._lock:
            gone = [name for name, _ in chosen if name not in self._adapters]
            if gone:
                raise AdapterGone(f"adapter {gone[0]!r} was removed while this request waited", param="loras")
            active = tuple((self._adapters[name], weight) for name, weight in chosen)
            if not self._users:
                for adapter in self._adapters.values():
                    self._hook(adapter)
            self._users += 1
            for name, _ in chosen:
                self._in_use[name] = self._in_use.get(name, 0) + 1
        token = _ACTIVE.set(active)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            with self._lock:
                self._users -= 1
                for name, _ in chosen:
                    self._in_use[name] -= 1
                if not self._users:
                    for handle in self._hooks.values():
                        handle.remove()
                    self._hooks.clear()
                self._lock.notify_all()

    def remove(self, name: str, *, timeout_s: float | None = None) -> bool:
        """Drop adapter ``name``: no request may name it from now on, and this returns once the requests
        running with it are done (False if ``timeout_s`` passed first; it is dropped either way)."""
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise KeyError(name)
            return self._lock.wait_for(lambda: not self._in_use.get(name), timeout=timeout_s)

    def _hook(self, adapter: Adapter) -> None:
        for path in adapter.modules:
            if path not in self._hooks:
                self._hooks[path] = self.transformer.get_submodule(path).register_forward_hook(_adding(path))

    def _adapter(
        self, name: str, source: str, state: Mapping[str, torch.Tensor], alphas: Mapping[str, Any]
    ) -> Adapter:
        outside = sorted({key.split(".", 1)[0] for key in state if not key.startswith(_PREFIX)})
        if outside:
            raise AdapterError(
                f"adapter {name!r} changes {', '.join(outside)} as well as the transformer: only "
                "transformer adapters are served"
            )
        downs = {
            key[len(_PREFIX) : -len(".lora_A.weight")]: value
            for key, value in state.items()
            if key.endswith(".lora_A.weight")
        }
        ups = {
            key[len(_PREFIX) : -len(".lora_B.weight")]: value
            for key, value in state.items()
            if key.endswith(".lora_B.weight")
        }
        other = sorted(key for key in state if not key.endswith((".lora_A.weight", ".lora_B.weight")))
        if other or set(downs) != set(ups) or not downs:
            found = other[0] if other else "no lora_A and lora_B pairs"
            raise AdapterError(f"adapter {name!r} is not plain LoRA pairs ({found})")
        parameter = next(self.transformer.parameters())
        modules: dict[str, LowRank] = {}
        for path, down in downs.items():
            try:
                module = self.transformer.get_submodule(path)
            except AttributeError as exc:
                raise AdapterError(
                    f"adapter {name!r} names {path!r}, which this transformer has not"
                ) from exc
            up = ups[path]
            if (
                not isinstance(module, nn.Linear)
                or down.shape[1] != module.in_features
                or up.shape[0] != module.out_features
            ):
                raise AdapterError(f"adapter {name!r} does not fit {path!r}")
            rank = down.shape[0]
            alpha = alphas.get(f"{_PREFIX}{path}.alpha", alphas.get(f"{path}.alpha", rank))
            modules[path] = LowRank(
                down=down.to(device=parameter.device, dtype=parameter.dtype).contiguous(),
                up=up.to(device=parameter.device, dtype=parameter.dtype).contiguous(),
                scaling=float(alpha) / rank,
            )
        return Adapter(
            name, source, max(pair.down.shape[0] for pair in modules.values()), MappingProxyType(modules)
        )


def _adding(path: str) -> Any:
    """The forward hook of the module at ``path``: the request's adapters' updates added to its output;
    inside a forward merged from several requests' (``--max-batch``), each request's to its own rows."""

    def add(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        calls = merged_calls()
        if calls is not None:
            return _added_per_request(path, calls, args[0], output)
        active = _ACTIVE.get()
        return _added(path, active, args[0], output) if active else None

    return add


def _added(
    path: str, active: tuple[tuple[Adapter, float], ...], x: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    for adapter, weight in active:
        pair = adapter.modules.get(path)
        if pair is not None:
            output = output + functional.linear(functional.linear(x, pair.down), pair.up) * (
                weight * pair.scaling
            )
    return output


def _added_per_request(
    path: str, calls: tuple[MergedCall, ...], x: torch.Tensor, output: torch.Tensor
) -> torch.Tensor | None:
    """Each merged request's adapters, read from its own context, on its own rows of ``output``."""
    updated: torch.Tensor | None = None
    start = 0
    for call in calls:
        rows = slice(start, start + call.rows)
        start += call.rows
        active = call.context.get(_ACTIVE, ())
        if not active:
            continue
        if updated is None:
            updated = output.clone()
        updated[rows] = _added(path, active, x[rows], output[rows])
    return updated
