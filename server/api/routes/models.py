"""`/v1/models`: the base model and every delta, each delta with `parent` = the base's id."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from server.api.deps import InferenceAuth, RuntimeDep
from server.api.schemas import ModelCard, ModelList
from server.runtime import Runtime

router = APIRouter(tags=["models"], dependencies=[InferenceAuth])


def _cards(runtime: Runtime) -> list[ModelCard]:
    base = runtime.base_id
    cards = [ModelCard(id=base, created=runtime.started, root=base)]
    cards += [
        ModelCard(id=d.name, created=int(d.created), parent=base, root=base)
        for d in runtime.registry.deltas()
    ]
    return cards


@router.get("/v1/models")
async def list_models(runtime: RuntimeDep) -> ModelList:
    return ModelList(data=await asyncio.to_thread(_cards, runtime))


@router.get("/v1/models/{model:path}")
async def get_model(model: str, runtime: RuntimeDep) -> ModelCard:
    ref = runtime.registry.resolve(model)
    if ref.stored is None:
        return ModelCard(id=ref.name, created=runtime.started, root=ref.name)
    base = runtime.base_id
    return ModelCard(id=ref.name, created=int(ref.stored.created), parent=base, root=base)
