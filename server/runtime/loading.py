"""Start-up: every model of the settings loaded, each given a worker, behind one Generations."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from server.models.limits import ModelLimits
from server.ops.acceleration import Acceleration
from server.runtime.metrics import Metrics
from server.runtime.replicas import Replica
from server.runtime.results import ResultCache
from server.runtime.service import Generations
from server.settings import LimitOverrides, Settings

if TYPE_CHECKING:
    from server.models.registry import ResidentModel

logger = logging.getLogger(__name__)


def load_generations(settings: Settings, metrics: Metrics) -> Generations:
    """Load every model in ``settings``, ``replicas`` copies on each device, each copy with its worker
    (not started). Blocking."""
    import torch

    from server.models.registry import load_model
    from server.runtime.worker import Worker

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    accelerate = Acceleration(
        compile=settings.compile, quantize=settings.quantize, attention_backend=settings.attention_backend
    )
    replicas: dict[str, list[Replica]] = {}
    for spec in settings.models:
        copies: list[Replica] = []
        for device in settings.device:
            for _ in range(settings.replicas):
                logger.info("loading model %s on %s (%s)", spec, device, settings.dtype)
                model = load_model(
                    spec,
                    device=device,
                    dtype=settings.dtype,
                    cache_dir=settings.cache_dir,
                    cache_hooks=settings.install_cache_hooks,
                    accelerate=accelerate,
                    text_cache_bytes=int(settings.text_cache_mb * 2**20),
                    trajectory_cache_bytes=int(settings.trajectory_cache_mb * 2**20),
                    lora_fold_bytes=int(settings.lora_fold_mb * 2**20),
                )
                if accelerate.compile:
                    _warm_up(model, metrics)
                replica_id = str(len(copies))
                worker = Worker(
                    model,
                    max_queue=settings.queue_size,
                    retry_after_s=settings.retry_after_s,
                    replica=replica_id,
                    max_batch=settings.max_batch,
                    batch_wait_ms=settings.batch_wait_ms,
                    on_merged_run=metrics.merged_run(model.name),
                )
                copies.append(Replica(id=replica_id, device=device, model=model, worker=worker))
        name = copies[0].model.name
        if name in replicas:
            raise ValueError(f"two model specs resolve to the same name {name!r}")
        replicas[name] = copies
    unknown = sorted(set(settings.model_limits) - set(replicas))
    if unknown:
        raise ValueError(f"model_limits names models that are not served: {', '.join(unknown)}")
    for name, overrides in settings.model_limits.items():
        for replica in replicas[name]:
            replica.model.limits = _with_overrides(replica.model.limits, overrides)
    for name, copies in replicas.items():
        for replica in copies:
            metrics.watch_worker(name, replica.id, replica.worker)
            if replica.model.prompt_cache is not None:
                metrics.watch_prompt_cache(name, replica.id, replica.model.prompt_cache)
            if replica.model.trajectories is not None:
                metrics.watch_trajectories(name, replica.id, replica.model.trajectories)
    _load_adapters(settings, replicas)
    results = ResultCache(int(settings.result_cache_mb * 2**20)) if settings.result_cache_mb > 0 else None
    if results is not None:
        metrics.watch_result_cache(results)
    return Generations(
        replicas, metrics=metrics, results=results, max_loras_per_request=settings.max_loras_per_request
    )


def _load_adapters(settings: Settings, replicas: dict[str, list[Replica]]) -> None:
    """The adapters that ship beside an embedded model, then each ``--lora MODEL:NAME=SOURCE``, into
    every replica of its model; raises ValueError at start."""
    from server.models.adapters import AdapterError

    if settings.loras and settings.compile:
        # The adapters' hooks sit on linear modules inside the compiled blocks.
        raise ValueError("loras and compile do not go together yet: serve the adapters uncompiled")
    asked = []
    for spec in settings.loras:
        model_name, _, rest = spec.partition(":")
        name, _, source = rest.partition("=")
        if model_name not in replicas:
            raise ValueError(f"--lora {spec!r} names no served model; served: {', '.join(replicas)}")
        asked.append((model_name, name, source))
    sources = {name: copies[0].model.source for name, copies in replicas.items()}
    # An operator's own adapter of a shipped one's name takes its place.
    named = {(model_name, name) for model_name, name, _ in asked}
    shipped = [spec for spec in shipped_adapters(settings, sources) if spec[:2] not in named]
    for model_name, name, source in [*shipped, *asked]:
        for replica in replicas[model_name]:
            adapters = replica.model.adapters
            if adapters is None:
                raise ValueError(
                    f"{model_name} ({type(replica.model.pipeline).__name__}) takes no LoRA adapters"
                )
            try:
                adapters.load(name, source)
            except AdapterError as exc:
                raise ValueError(str(exc)) from exc


def shipped_adapters(settings: Settings, sources: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(model, name, source) of each adapter shipped beside a served embedded model (``sources``: each
    served model's source, as its card gives it), unless turned off or compiling, which serves none: an
    operator who did not ask for them is not refused."""
    from server.models.builtin import BUILTIN_MODELS

    if not settings.builtin_loras or settings.compile:
        return []
    return [
        (name, adapter, str(folder))
        for name, source in sources.items()
        if source == f"builtin:{name}"
        for adapter, folder in BUILTIN_MODELS[name].adapters.items()
    ]


def _warm_up(model: ResidentModel, metrics: Metrics) -> None:
    """Compile the model's blocks for the shapes requests will bring, before it is served."""
    from server.runtime.warm_up import warm_up

    clock = warm_up(model)
    logger.info(
        "compiled %s: %d graphs in %.1f s (warm-up at two sizes)", model.name, clock.frames, clock.seconds
    )
    metrics.model_compiled(model.name, clock.seconds)


def _with_overrides(limits: ModelLimits, overrides: LimitOverrides) -> ModelLimits:
    return dataclasses.replace(limits, **overrides.model_dump(exclude_none=True))
