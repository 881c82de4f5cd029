"""Start-up: every model of the settings loaded, each given a worker, behind one Generations."""

from __future__ import annotations

import dataclasses
import logging

from .metrics import Metrics
from .model_settings import ModelLimits
from .service import Generations
from .settings import LimitOverrides, Settings

logger = logging.getLogger(__name__)


def load_generations(settings: Settings, metrics: Metrics) -> Generations:
    """Load every model in ``settings`` and give each a worker (not started). Blocking."""
    import torch

    from .models import load_model
    from .worker import Worker

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    models = {}
    for spec in settings.models:
        logger.info("loading model %s on %s (%s)", spec, settings.device, settings.dtype)
        model = load_model(
            spec,
            device=settings.device,
            dtype=settings.dtype,
            cache_dir=settings.cache_dir,
            cache_hooks=settings.install_cache_hooks,
        )
        if model.name in models:
            raise ValueError(f"two model specs resolve to the same name {model.name!r}")
        models[model.name] = model
    unknown = sorted(set(settings.model_limits) - set(models))
    if unknown:
        raise ValueError(f"model_limits names models that are not served: {', '.join(unknown)}")
    for name, overrides in settings.model_limits.items():
        models[name].limits = _with_overrides(models[name].limits, overrides)
    workers = {
        name: Worker(model, max_queue=settings.queue_size, retry_after_s=settings.retry_after_s)
        for name, model in models.items()
    }
    for name, worker in workers.items():
        metrics.watch_worker(name, worker)
    return Generations(models, workers, metrics=metrics)


def _with_overrides(limits: ModelLimits, overrides: LimitOverrides) -> ModelLimits:
    return dataclasses.replace(limits, **overrides.model_dump(exclude_none=True))
