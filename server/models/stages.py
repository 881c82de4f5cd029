"""Stage timings for any pipeline, from its own components, without re-implementing its call.

A :class:`StageProbe` is installed once on a resident pipeline: a wrapper around its ``encode_prompt``
(tokenization and templates included; forward hooks on its text encoders where it has none), a
pre-forward hook on each denoiser (Wan 2.2 has two), and a wrapper around its VAE's ``decode``. What
else the pipeline's run takes (its preparation and post-processing) is its overhead (``OVERHEAD``). They do
nothing unless a generation is being measured (a ``ContextVar``, as the cache engine binds its
sessions), so the pipeline's output is untouched.

Denoising steps are observed by the step callback where the pipeline has one, or else by the
denoiser's own calls: a call with a new timestep starts a step, which ends the previous one (and the
last step ends when decoding starts). Either way ``on_step_end(step_index)`` runs at each step's end,
and what it raises stops the pipeline: that is how cancel, deadlines and disconnects reach every family.

A stage the pipeline never entered (no text encoder was called, nothing was decoded) is absent from
the result, not 0.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from server.models.call_specs import StepObserver

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["OVERHEAD", "STAGES", "StageClock", "StageProbe", "StageTimings"]

STAGES: tuple[str, ...] = ("text_encoding", "denoising", "decoding")
# The rest of a pipeline run, in none of STAGES: the pipeline's own preparation and post-processing.
OVERHEAD = "pipeline_overhead"

# The clock of the generation being measured and the probe measuring it: a pipeline carries one probe,
# but a probe's hooks must never feed another probe's clock.
_ACTIVE: ContextVar[tuple[StageProbe, StageClock] | None] = ContextVar("ditcache_stage_clock", default=None)


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds per stage of one request, from its receipt to the encoded media; they add up to
    ``total``."""

    queue_wait: float
    # The pipeline's own stages (STAGES) that it went through, and the rest of its run (OVERHEAD).
    pipeline: Mapping[str, float]
    denoising_steps: list[float]
    encoding: float
    total: float

    @classmethod
    def of_run(
        cls,
        *,
        queue_wait: float,
        run: float,
        stages: Mapping[str, float],
        denoising_steps: list[float],
        encoding: float,
        total: float,
    ) -> StageTimings:
        """The timings of a request whose worker ran for ``run`` ms, of which ``stages`` (keys of
        STAGES) were measured inside the pipeline: the rest of the run is its overhead."""
        measured = {stage: stages[stage] for stage in STAGES if stage in stages}
        pipeline = {**measured, OVERHEAD: max(0.0, run - sum(measured.values()))}
        return cls(queue_wait, pipeline, denoising_steps, encoding, total)

    def stages(self) -> dict[str, float]:
        """Every stage present, in the order of a request, ``total`` last."""
        return {
            "queue_wait": self.queue_wait,
            **self.pipeline,
            "encoding": self.encoding,
            "total": self.total,
        }


@dataclass
class StageClock:
    """The timings of one generation; on a GPU it waits for queued work so that each time is the stage's."""

    device: torch.device
    observer: StepObserver
    on_step_end: Callable[[int], None] | None
    # Milliseconds per stage entered, keys from STAGES.
    stage_ms: dict[str, float] = field(default_factory=dict)
    step_times_ms: list[float] = field(default_factory=list)
    _step_started: float | None = None
    _timestep: float | None = None
    _encoding_started: float | None = None

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def add(self, stage: str, started: float) -> None:
        self.stage_ms[stage] = self.stage_ms.get(stage, 0.0) + (self.now() - started) * 1000.0

    # -- steps --------------------------------------------------------------------------------------

    def step_callback(
        self, pipeline: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        """``callback_on_step_end``; returns no tensors to replace."""
        self._end_step()
        return {}

    def denoiser_called(self, timestep: Any) -> None:
        if self._step_started is None and self.observer == "callback":
            # The first call opens step 0; the callback opens every later one.
            self._step_started = self.now()
            return
        if self.observer != "denoiser":
            return
        value = _scalar(timestep)
        if self._step_started is not None and value == self._timestep:
            return  # another pass (the other CFG branch) of the same step
        if self._step_started is not None:
            self._end_step()
        self._step_started = self.now()
        self._timestep = value

    def decoding_started(self) -> None:
        if self.observer == "denoiser" and self._step_started is not None:
            self._end_step()

    def _end_step(self) -> None:
        now = self.now()
        started = self._step_started if self._step_started is not None else now
        self.step_times_ms.append((now - started) * 1000.0)
        self._step_started = now if self.observer == "callback" else None
        self.stage_ms["denoising"] = sum(self.step_times_ms)
        if self.on_step_end is not None:
            self.on_step_end(len(self.step_times_ms) - 1)

    def finish(self) -> None:
        """The last step of a pipeline that never decoded; its work is done, so nothing may stop it."""
        if self.observer == "denoiser" and self._step_started is not None:
            self.step_times_ms.append((self.now() - self._step_started) * 1000.0)
            self._step_started = None
            self.stage_ms["denoising"] = sum(self.step_times_ms)


def _scalar(timestep: Any) -> float | None:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.flatten()[0]) if timestep.numel() else None
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return None


def _timestep_position(denoiser: nn.Module) -> int | None:
    parameters = list(inspect.signature(type(denoiser).forward).parameters)[1:]
    return parameters.index("timestep") if "timestep" in parameters else None


class StageProbe:
    """The hooks that time one resident pipeline's stages, for the generation being measured."""

    def __init__(
        self, pipeline: DiffusionPipeline, denoisers: Sequence[nn.Module], observer: StepObserver
    ) -> None:
        self.observer = observer
        self.device = pipeline.device
        self.text_encoders = tuple(
            module
            for name, module in pipeline.components.items()
            if name.startswith("text_encoder") and isinstance(module, nn.Module)
        )
        if callable(getattr(pipeline, "encode_prompt", None)):
            self.attach(pipeline)
        else:
            for encoder in self.text_encoders:
                encoder.register_forward_pre_hook(self._encoding_started)
                encoder.register_forward_hook(self._encoding_done)
        for denoiser in denoisers:
            denoiser.register_forward_pre_hook(self._denoiser_hook(denoiser), with_kwargs=True)
        vae = getattr(pipeline, "vae", None)
        if vae is not None and callable(getattr(vae, "decode", None)):
            vae.decode = self._timed_decode(vae.decode)

    def attach(self, pipeline: DiffusionPipeline) -> None:
        """Time ``pipeline``'s own prompt encoding, tokenization and templates included, as a whole: the
        model's pipeline, and each task's built from its components (which share its denoisers and VAE,
        already hooked)."""
        if callable(getattr(pipeline, "encode_prompt", None)):
            pipeline.encode_prompt = self._timed_encode_prompt(pipeline.encode_prompt)

    @contextmanager
    def measure(self, on_step_end: Callable[[int], None] | None = None) -> Iterator[StageClock]:
        clock = StageClock(self.device, self.observer, on_step_end)
        token = _ACTIVE.set((self, clock))
        try:
            yield clock
            clock.finish()
        finally:
            _ACTIVE.reset(token)

    def _clock(self) -> StageClock | None:
        active = _ACTIVE.get()
        return active[1] if active is not None and active[0] is self else None

    def _encoding_started(self, module: nn.Module, args: Any) -> None:
        clock = self._clock()
        if clock is not None:
            clock._encoding_started = clock.now()

    def _encoding_done(self, module: nn.Module, args: Any, output: Any) -> None:
        clock = self._clock()
        if clock is not None and clock._encoding_started is not None:
            clock.add("text_encoding", clock._encoding_started)
            clock._encoding_started = None

    def _denoiser_hook(
        self, denoiser: nn.Module
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        """A pre-forward hook that reports the call's timestep, given by keyword or by position."""
        position = _timestep_position(denoiser)

        def called(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            clock = self._clock()
            if clock is None:
                return
            timestep = kwargs.get("timestep")
            if timestep is None and position is not None and position < len(args):
                timestep = args[position]
            clock.denoiser_called(timestep)

        return called

    def _timed_encode_prompt(self, encode_prompt: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(encode_prompt)
        def timed(*args: Any, **kwargs: Any) -> Any:
            clock = self._clock()
            if clock is None or clock._encoding_started is not None:
                return encode_prompt(*args, **kwargs)  # not measured, or inside an outer call
            clock._encoding_started = started = clock.now()
            try:
                return encode_prompt(*args, **kwargs)
            finally:
                clock._encoding_started = None
                clock.add("text_encoding", started)

        return timed

    def _timed_decode(self, decode: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(decode)
        def timed(*args: Any, **kwargs: Any) -> Any:
            clock = self._clock()
            if clock is None:
                return decode(*args, **kwargs)
            clock.decoding_started()
            started = clock.now()
            try:
                return decode(*args, **kwargs)
            finally:
                clock.add("decoding", started)

        return timed
