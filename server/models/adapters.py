"""LoRA adapters of a resident model, chosen per request and owned by it, as its cache state is.

An adapter is read with diffusers' own ``lora_state_dict`` of the pipeline's class (so the formats it
reads, the community ones it converts included, are read here), and kept as its low-rank pairs per
linear module of the transformer. The shared weights never change: the forward of each module some
adapter touches is replaced by one that adds, for the request in progress only, each of its adapters'
update ``B(A(x)) * (weight * alpha / rank)``, in the order the request names them, as PEFT does after
diffusers' ``set_adapters``. These forwards are there only while some request with adapters runs: a
request without adapters would otherwise pay a Python call on every module an adapter touches. In a forward merged from several requests' (``--max-batch``),
each request's adapters go to its own rows, so requests with different adapters, or none, share one
forward.

A request running alone may instead fold its adapters into a weight of its own, ``W + sum(B @ A x
weight x scaling)`` (what diffusers' ``fuse_lora`` writes into the shared weight, here kept by the request
and dropped with it), and run the module as one product. On a narrow layer the two small products of an
update cost as much as the layer itself, whatever their arithmetic; folded, they cost nothing per step.
The folded weights of one request take at most ``fold_bytes``; the modules past that, and every module in
a merged forward, add the update instead.
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


# What one request folds its adapters into, when it runs alone, by default: enough for every module of a
# small model, a few modules of a large one (a FLUX projection is 18 MiB in bfloat16).
DEFAULT_FOLD_BYTES = 64 * 2**20


class _Applied:
    """The adapters of one request in progress, with their weights in the order it names them, and the
    weights it folded them into: owned by the request, dropped with it."""

    def __init__(self, adapters: tuple[tuple[Adapter, float], ...], fold_bytes: int) -> None:
        self.adapters = adapters
        self._bytes_left = fold_bytes
        # Per module path: its folded weight, or None where it is not folded (over the budget, or a
        # weight that is not a plain tensor, as a quantized one).
        self._folded: dict[str, torch.Tensor | None] = {}

    def folded(self, path: str, module: nn.Linear) -> torch.Tensor | None:
        if path in self._folded:
            return self._folded[path]
        pairs = [(pair, scale) for adapter, scale in self.adapters if (pair := adapter.modules.get(path))]
        weight = module.weight
        size = weight.numel() * weight.element_size()
        folded = None
        # A module none of the request's adapters touch (another adapter's) is not copied.
        plain = type(weight.data) is torch.Tensor and weight.is_floating_point()
        if pairs and plain and size <= self._bytes_left:
            self._bytes_left -= size
            with torch.no_grad():
                folded = weight.detach().clone()
                for pair, scale in pairs:
                    folded += (pair.up @ pair.down) * (scale * pair.scaling)
        self._folded[path] = folded
        return folded


# The adapters of the request in progress; None: it has none.
_ACTIVE: ContextVar[_Applied | None] = ContextVar("ditcache_active_adapters", default=None)


class Adapters:
    """One resident model's adapters, and the hooks that apply them per request."""

    def __init__(self, pipeline: DiffusionPipeline, *, fold_bytes: int = DEFAULT_FOLD_BYTES) -> None:
        self.pipeline = pipeline
        self.transformer: nn.Module = pipeline.transformer
        # What one request running alone may fold its adapters into (0: it never folds).
        self.fold_bytes = fold_bytes
        self._adapters: dict[str, Adapter] = {}
        self._hooks: dict[str, _Hook] = {}
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
            active = _Applied(
                tuple((self._adapters[name], weight) for name, weight in chosen), self.fold_bytes
            )
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
                    for hook in self._hooks.values():
                        hook.remove()
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
                self._hooks[path] = _Hook(path, self.transformer.get_submodule(path))

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


class _Hook:
    """The forward of the module at ``path`` while requests with adapters run: the request's adapters on
    its output (folded into its weight where the request folds them); inside a forward merged from
    several requests' (``--max-batch``), each request's updates on its own rows.

    It takes the place of the module's forward (an instance attribute over the class's), rather than
    being a forward hook, so that a folded module runs one product instead of the shared one and a
    correction."""

    def __init__(self, path: str, module: nn.Module) -> None:
        assert isinstance(module, nn.Linear)
        self._module = module
        # A forward set on the instance already (an offloading hook's) runs under this one, and comes back.
        self._own = module.__dict__.get("forward")
        base = module.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            calls = merged_calls()
            if calls is not None:
                output = base(x)
                updated = _added_per_request(path, calls, x, output)
                return output if updated is None else updated
            applied = _ACTIVE.get()
            if applied is None:
                return base(x)
            folded = applied.folded(path, module)
            if folded is not None:
                return functional.linear(x, folded, module.bias)
            return _added(path, applied.adapters, x, base(x))

        # Set on the instance: a plain attribute, which nn.Module's __call__ finds before the class's.
        setattr(module, "forward", forward)  # noqa: B010

    def remove(self) -> None:
        if self._own is None:
            del self._module.forward
        else:
            setattr(self._module, "forward", self._own)  # noqa: B010


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
        active = call.context.get(_ACTIVE)
        if active is None:
            continue
        if updated is None:
            updated = output.clone()
        updated[rows] = _added(path, active.adapters, x[rows], output[rows])
    return updated
