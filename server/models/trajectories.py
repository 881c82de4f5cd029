"""Trajectories kept across requests: a request that allows it (``"reuse": {"similar": {...}}``) starts from the
intermediate latents of the most similar earlier prompt, and runs only the steps after them (NIRVANA,
NSDI'24).

A request that allows it and runs all its steps keeps its latents after a few steps (``KEPT_FRACTIONS`` of
them), with its prompt's text embedding (the first tensor ``encode_prompt`` returns, averaged over the
sequence). A later one of the same tenant, model and setting (size, frames, steps, guidance, negative
prompt, images per prompt, adapters) finds the same prompt, or else the kept prompt nearest to its own by
cosine similarity. The model's rule (``TrajectoryRule``, calibrated by ``ditcache calibrate
--trajectories``) turns that into the share of steps it may skip; below the rule's lowest similarity it
skips none. The same prompt is the same conditioning: from the same kept latents it makes what the kept
run made, at whatever step it resumes, so it skips the most.

How a step is skipped, without a pipeline of our own: for each of the first K steps the denoiser is not
run, and the pipeline is handed a zero velocity, which leaves a flow-matching Euler step's latents as they
were (``x + (sigma_next - sigma) * 0``, exactly); at the end of step K the step callback hands the pipeline
the kept latents. From there the pipeline runs as usual, its scheduler on the very sigmas of the kept
run. Only pipelines where that holds are served (``RESUMABLE_PIPELINES``, each tested to reproduce its
own run when resumed from it): an Euler flow-matching scheduler, a step callback that passes the latents,
and guidance that keeps a zero velocity zero (Qwen-Image's rescaled true CFG divides by its norm).

Kept on the CPU, bounded in bytes per model, least recently used first out; it empties with the process.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from server.models.bounded import BytesBoundedLRU

if TYPE_CHECKING:
    from collections.abc import Sequence

    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = [
    "DEFAULT_RULE",
    "KEPT_FRACTIONS",
    "RESUMABLE_PIPELINES",
    "ResumeLimits",
    "Resumed",
    "TrajectoryProbe",
    "TrajectoryRule",
    "TrajectoryRun",
    "TrajectoryStore",
    "kept_steps",
    "resumable",
]

# The text pipelines a request may resume on; each is tested to reproduce its own run from its own kept
# latents (tests/server/test_trajectories.py).
RESUMABLE_PIPELINES = frozenset(
    {"FluxPipeline", "StableDiffusion3Pipeline", "CogView4Pipeline", "LTXPipeline", "HunyuanVideoPipeline"}
)
# The schedulers whose step leaves latents as they are under a zero velocity.
_EULER_SCHEDULERS = frozenset({"FlowMatchEulerDiscreteScheduler"})
# Where in a run the latents are kept: K of N steps for these shares of N.
KEPT_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def resumable(pipeline: DiffusionPipeline, steps_observed_by: str) -> bool:
    """Whether a run of ``pipeline`` can start from kept latents: a step callback to hand them over
    (``steps_observed_by``, from its call spec), and steps that leave latents alone under a zero velocity."""
    scheduler = getattr(pipeline, "scheduler", None)
    return (
        steps_observed_by == "callback"
        and type(pipeline).__name__ in RESUMABLE_PIPELINES
        and type(scheduler).__name__ in _EULER_SCHEDULERS
        and not getattr(getattr(scheduler, "config", None), "stochastic_sampling", False)
    )


def kept_steps(steps: int) -> tuple[int, ...]:
    """The steps after which a run of ``steps`` keeps its latents: at least one step run, one left."""
    return tuple(sorted({round(share * steps) for share in KEPT_FRACTIONS} & set(range(1, steps))))


@dataclass(frozen=True)
class TrajectoryRule:
    """From a prompt's similarity to a kept one, the share of the steps it may skip: the share of the
    first point whose similarity it reaches (points from the most similar down), none under all; for the
    same prompt, ``same_prompt``."""

    points: tuple[tuple[float, float], ...]
    same_prompt: float = max(KEPT_FRACTIONS)
    # The PSNR against the prompt's own uncached output (from the same noise) the calibration kept, over
    # its pairs of prompts; None for the rule that skips only under identical conditioning.
    floor_psnr: float | None = None
    # How many pairs of prompts it was calibrated on.
    pairs: int = 0

    def __post_init__(self) -> None:
        similarities = [similarity for similarity, _ in self.points]
        if similarities != sorted(similarities, reverse=True):
            raise ValueError("a trajectory rule's points go from the most similar down")
        if any(not 0.0 <= share < 1.0 for _, share in (*self.points, (1.0, self.same_prompt))):
            raise ValueError("a trajectory rule's shares of steps are in [0, 1)")

    def share(self, similarity: float, *, same_prompt: bool = False) -> float:
        if same_prompt:
            return self.same_prompt
        return next((share for lowest, share in self.points if similarity >= lowest), 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "same_prompt": self.same_prompt,
            "points": [list(point) for point in self.points],
            "floor_psnr": self.floor_psnr,
            "pairs": self.pairs,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrajectoryRule:
        return cls(
            points=tuple((float(similarity), float(share)) for similarity, share in data["points"]),
            same_prompt=float(data.get("same_prompt", max(KEPT_FRACTIONS))),
            floor_psnr=None if data.get("floor_psnr") is None else float(data["floor_psnr"]),
            pairs=int(data.get("pairs", 0)),
        )


# Uncalibrated: only the same prompt resumes, at the latest kept step.
DEFAULT_RULE = TrajectoryRule(())


@dataclass(frozen=True)
class ResumeLimits:
    """What a request allows of a start along another's trajectory, on top of the model's rule."""

    # Start from noise under this similarity; None: wherever the rule allows.
    min_similarity: float | None = None
    # Skip at most this many steps; None: as many as the rule allows.
    max_skipped_steps: int | None = None


@dataclass(frozen=True)
class Kept:
    request_id: str
    setting: Hashable
    prompt: str
    # Unit length, on the CPU.
    embedding: torch.Tensor
    # Step K -> the latents after K steps, on the CPU.
    latents: Mapping[int, torch.Tensor]


@dataclass(frozen=True)
class Resumed:
    """What a request started from: the earlier request, how close their prompts are, the steps skipped."""

    request_id: str
    similarity: float
    steps_skipped: int
    same_prompt: bool = False


class TrajectoryStore:
    """One model's kept trajectories."""

    def __init__(self, max_bytes: int, rule: TrajectoryRule = DEFAULT_RULE) -> None:
        self.max_bytes = max_bytes
        self.rule = rule
        self._entries: BytesBoundedLRU[Kept] = BytesBoundedLRU(max_bytes)

    @property
    def bytes(self) -> int:
        return self._entries.bytes

    def put(self, kept: Kept) -> None:
        size = sum(latents.numel() * latents.element_size() for latents in kept.latents.values())
        self._entries.put(kept.request_id, kept, size + kept.embedding.numel() * 4)

    def kept(self) -> list[Kept]:
        """Every trajectory kept, least recently used first."""
        return self._entries.values()

    def nearest(self, setting: Hashable, prompt: str, embedding: torch.Tensor) -> tuple[Kept, float] | None:
        """The kept trajectory of this setting with the same prompt (the latest kept), or else the one
        whose prompt is most similar to ``embedding``, with its similarity."""
        best: tuple[Kept, float] | None = None
        for kept in self.kept():
            if kept.setting != setting or kept.embedding.shape != embedding.shape:
                continue
            same = kept.prompt == prompt
            similarity = 1.0 if same else min(float(torch.dot(kept.embedding, embedding)), 1.0)
            # The same prompt first, then the most similar; of equals, the latest kept.
            if best is None or (similarity, same) >= (best[1], best[0].prompt == prompt):
                best = (kept, similarity)
        if best is not None:
            self._entries.get(best[0].request_id)  # now the most recently used
        return best


def prompt_embedding(encoded: Any) -> torch.Tensor | None:
    """A prompt's embedding from what ``encode_prompt`` returned: its first tensor (the prompt's
    embeddings in every resumable pipeline), the first prompt's, averaged over the sequence, unit length."""
    first: torch.Tensor | None = None
    if isinstance(encoded, torch.Tensor):
        first = encoded
    elif isinstance(encoded, (tuple, list)):
        first = next((item for item in encoded if isinstance(item, torch.Tensor)), None)
    if first is None or first.ndim < 2:
        return None
    row = first[0].detach().float()
    vector = row.mean(dim=0) if row.ndim > 1 else row
    vector = vector.flatten().cpu()
    norm = float(vector.norm())
    return None if norm == 0.0 or not math.isfinite(norm) else vector / norm


@dataclass
class TrajectoryRun:
    """One request's part: it may resume from a kept trajectory, and it may keep its own."""

    store: TrajectoryStore
    setting: Hashable
    request_id: str
    prompt: str
    steps: int
    # Whether it may start from a kept trajectory, at least this similar (None: any the rule allows; a
    # cosine can be negative), skipping at most this many steps.
    resume: bool
    min_similarity: float | None = None
    max_skipped_steps: int | None = None
    # Whether it keeps its own (when it runs every step).
    keep: bool = True
    embedding: torch.Tensor | None = None
    resumed: Resumed | None = None
    _decided: bool = False
    _start: torch.Tensor | None = None
    _step: int = 0
    _kept: dict[int, torch.Tensor] = field(default_factory=dict)
    _keep_at: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self._keep_at = frozenset(kept_steps(self.steps)) if self.keep else frozenset()

    def encoded(self, output: Any) -> None:
        if self.embedding is None:
            self.embedding = prompt_embedding(output)

    def skips_this_call(self) -> bool:
        """Called at each denoiser call: whether it is one of the steps skipped."""
        if not self._decided:
            self._decided = True
            self._decide()
        return self.resumed is not None and self._step < self.resumed.steps_skipped

    def _decide(self) -> None:
        if not self.resume or self.embedding is None:
            return
        found = self.store.nearest(self.setting, self.prompt, self.embedding)
        if found is None:
            return
        kept, similarity = found
        same_prompt = kept.prompt == self.prompt
        if self.min_similarity is not None and similarity < self.min_similarity:
            return
        allowed = math.floor(self.store.rule.share(similarity, same_prompt=same_prompt) * self.steps)
        if self.max_skipped_steps is not None:
            allowed = min(allowed, self.max_skipped_steps)
        step = max((k for k in kept.latents if k <= allowed), default=0)
        if step > 0:
            self.resumed = Resumed(kept.request_id, round(similarity, 4), step, same_prompt)
            self._start = kept.latents[step]

    def step_end(self, step: int, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """The step callback's part: keep the latents, and hand the pipeline the kept ones at K."""
        self._step = step + 1
        latents = tensors.get("latents")
        if self.resumed is not None:
            if self._step == self.resumed.steps_skipped and self._start is not None and latents is not None:
                return {"latents": self._start.to(device=latents.device, dtype=latents.dtype)}
            return {}
        if self._step in self._keep_at and isinstance(latents, torch.Tensor):
            self._kept[self._step] = latents.detach().to("cpu", copy=True)
        return {}

    def finish(self) -> None:
        """After a run that completed: keep its trajectory, when it ran every step of its own."""
        if self.keep and self.resumed is None and self.embedding is not None and self._kept:
            self.store.put(Kept(self.request_id, self.setting, self.prompt, self.embedding, dict(self._kept)))


_ACTIVE: ContextVar[tuple[TrajectoryProbe, TrajectoryRun] | None] = ContextVar(
    "ditcache_trajectory_run", default=None
)


class TrajectoryProbe:
    """Installed once on a resident text pipeline: reads the prompt's embedding from ``encode_prompt`` and
    answers the skipped steps' denoiser calls, for the generation that runs with a ``TrajectoryRun``."""

    def __init__(self, pipeline: DiffusionPipeline, denoisers: Sequence[nn.Module]) -> None:
        encode = pipeline.encode_prompt

        @functools.wraps(encode)
        def encoded(*args: Any, **kwargs: Any) -> Any:
            output = encode(*args, **kwargs)
            run = self._run()
            if run is not None:
                run.encoded(output)
            return output

        pipeline.encode_prompt = encoded
        for denoiser in denoisers:
            self._answer_skipped_steps(denoiser)

    def _run(self) -> TrajectoryRun | None:
        active = _ACTIVE.get()
        return active[1] if active is not None and active[0] is self else None

    def _answer_skipped_steps(self, denoiser: nn.Module) -> None:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        forward: Callable[..., Any] = denoiser.forward

        @functools.wraps(forward)
        def answered(*args: Any, **kwargs: Any) -> Any:
            run = self._run()
            if run is None or not run.skips_this_call():
                return forward(*args, **kwargs)
            sample = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            velocity = torch.zeros_like(sample)
            return (
                Transformer2DModelOutput(sample=velocity) if kwargs.get("return_dict", True) else (velocity,)
            )

        denoiser.forward = answered

    @contextmanager
    def running(self, run: TrajectoryRun) -> Iterator[TrajectoryRun]:
        token = _ACTIVE.set((self, run))
        try:
            yield run
        finally:
            _ACTIVE.reset(token)
