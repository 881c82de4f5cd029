"""Probes: count, and when asked time, the real executions of a transformer's modules.

A probe wraps the instance ``forward`` of the denoiser, of each block and of each attention module.
Installed before any caching hook, it sits under whatever hook is installed later, so it sees only the
executions that really ran, whichever implementation decided to skip the others.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn

ProbeKind = Literal["denoiser", "block", "attention"]

# Block lists of the benchmarked transformers, found here by name rather than through the engine's
# model table, so the probe counts are independent of what the engine thinks a block is.
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


@dataclass(frozen=True)
class ProbeSite:
    name: str
    kind: ProbeKind
    parent: str | None  # the nearest probed ancestor, for exclusive times


@dataclass(frozen=True)
class Counts:
    """Executions of each probed module during one run, and the batch rows they processed."""

    calls: dict[str, int]
    rows: dict[str, int]


def _batch_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    hidden = kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        hidden = next((arg for arg in args if isinstance(arg, torch.Tensor)), None)
    return int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) and hidden.dim() else 1


class Probes:
    """Wraps the instance ``forward`` of the denoiser, its blocks and attention modules.

    Installed before any caching hook, so a hook that skips a module never reaches its probe: a probe
    counts real executions only, whoever decided to skip. Counting costs one Python call per module
    call and is installed on every pipeline of a comparison alike; timing (two CPU-clock reads more,
    so that time the process spends descheduled is not charged to a module) is switched on only for
    the profile runs.
    """

    def __init__(self, transformer: nn.Module) -> None:
        self.sites: dict[str, ProbeSite] = {}
        self.calls: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.timing = False
        self._wrap("", "denoiser", None, transformer)
        for list_name in _BLOCK_LISTS:
            container = getattr(transformer, list_name, None)
            if not isinstance(container, nn.ModuleList):
                continue
            for index, block in enumerate(container):
                block_name = f"{list_name}.{index}"
                self._wrap(block_name, "block", "", block)
                for name, module in block.named_modules():
                    if name and isinstance(module, (Attention, AttentionModuleMixin)):
                        attention = block.get_submodule(name)
                        self._wrap(f"{block_name}.{name}", "attention", block_name, attention)

    def names(self, kind: ProbeKind) -> list[str]:
        return [name for name, site in self.sites.items() if site.kind == kind]

    def reset(self) -> None:
        for name in self.sites:
            self.calls[name] = 0
            self.rows[name] = 0
            self.seconds[name] = 0.0

    def counts(self) -> Counts:
        return Counts(dict(self.calls), dict(self.rows))

    def _wrap(self, name: str, kind: ProbeKind, parent: str | None, module: nn.Module) -> None:
        self.sites[name] = ProbeSite(name, kind, parent)
        forward = module.forward
        calls, rows, seconds = self.calls, self.rows, self.seconds

        def probed(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            rows[name] += _batch_rows(args, kwargs)
            if not self.timing:
                return forward(*args, **kwargs)
            start = time.process_time()
            try:
                return forward(*args, **kwargs)
            finally:
                seconds[name] += time.process_time() - start

        # Keep the signature visible: pipelines and hooks inspect ``transformer.forward``.
        functools.update_wrapper(probed, forward)
        module.forward = probed
        self.calls[name] = 0
        self.rows[name] = 0
        self.seconds[name] = 0.0


@dataclass(frozen=True)
class Profile:
    """Where the uncached run spends its time: each probed module's exclusive share of the CPU time."""

    shares: dict[str, float]
    rest: float  # pipeline code outside the denoiser: scheduler, latents, guidance arithmetic
    block_share: float  # blocks inclusive of their attention
    attention_share: float

    def ideal_fraction(self, base: Counts, run: Counts) -> float:
        """The fraction of the uncached time a run needs if skipped work costs nothing at all.

        Work is counted in batch rows, so a call made on half the batch (FasterCache dropping the
        unconditional half) counts as half a call; time is assumed linear in the batch.

        It is the whole less the shares skipped, so that a run that skips nothing needs exactly all of it
        (the shares and the rest are medians over several runs, and need not add up to 1 to the last bit).
        """
        skipped = 0.0
        for name, share in self.shares.items():
            done = base.rows[name]
            if done:
                skipped += share * (1.0 - run.rows[name] / done)
        return 1.0 - skipped


def profile(probes: Probes, runs: Sequence[Callable[[], float]]) -> Profile:
    """Time the uncached run with the probes' clocks on; each of ``runs`` returns its CPU seconds.

    Shares are medians over the runs.
    """
    per_run: list[dict[str, float]] = []
    totals: list[float] = []
    probes.timing = True
    try:
        for run in runs:
            probes.reset()
            totals.append(run())
            per_run.append(dict(probes.seconds))
    finally:
        probes.timing = False
    sites = probes.sites
    exclusive: dict[str, list[float]] = {name: [] for name in sites}
    inclusive_blocks: list[float] = []
    inclusive_attention: list[float] = []
    rest: list[float] = []
    for seconds, total in zip(per_run, totals, strict=True):
        children: dict[str, float] = dict.fromkeys(sites, 0.0)
        for name, site in sites.items():
            if site.parent is not None:
                children[site.parent] += seconds[name]
        for name in sites:
            exclusive[name].append((seconds[name] - children[name]) / total)
        inclusive_blocks.append(sum(seconds[n] for n, s in sites.items() if s.kind == "block") / total)
        inclusive_attention.append(sum(seconds[n] for n, s in sites.items() if s.kind == "attention") / total)
        rest.append(1.0 - seconds[""] / total)
    return Profile(
        shares={name: statistics.median(values) for name, values in exclusive.items()},
        rest=statistics.median(rest),
        block_share=statistics.median(inclusive_blocks),
        attention_share=statistics.median(inclusive_attention),
    )
