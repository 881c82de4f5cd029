"""The resident models: kind, cache methods, defaults, limits, presets."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import GenerationsDep
from server.api.openapi import V1, errors
from server.protocol import ModelCard, ModelList
from server.runtime.views import model_card

router = APIRouter(tags=["models"])


@router.get("/v1/models", responses=errors(*V1))
async def list_models(generations: GenerationsDep) -> ModelList:
    return ModelList(
        data=[
            model_card(model, generations.supported_methods(model), generations.replicas[name])
            for name, model in generations.models.items()
        ]
    )


@router.get("/v1/models/{model_id:path}", responses=errors(*V1, 404))
async def get_model(model_id: str, generations: GenerationsDep) -> ModelCard:
    model = generations.resolve_model(model_id)
    return model_card(model, generations.supported_methods(model), generations.replicas[model.name])
