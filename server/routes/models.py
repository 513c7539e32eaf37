"""GET /v1/models and /v1/models/{id}: the names this server answers to."""
from __future__ import annotations

from fastapi import APIRouter

from wattserve.server.errors import documented, model_not_found
from wattserve.server.protocol import ModelCard, ModelList
from wattserve.server.state import ServerState, State

router = APIRouter()


def _card(state: ServerState, name: str) -> ModelCard:
    return ModelCard(id=name, created=state.created, root=state.engine.info.model_name,
                     max_model_len=state.engine.info.max_model_len)


@router.get("/v1/models", response_model=ModelList, responses=documented(401))
async def list_models(state: State) -> ModelList:
    return ModelList(data=[_card(state, name) for name in state.model_names])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard,
            responses=documented(401, 404))
async def get_model(model_id: str, state: State) -> ModelCard:
    if model_id not in state.model_names:
        raise model_not_found(model_id)
    return _card(state, model_id)
