"""The steps chat and completions share, from a validated body to a started Generation."""
from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import Request

from wattserve.engine.request import InvalidRequestError, SamplingParams
from wattserve.server.generation import Generation
from wattserve.server.protocol import SLOSpec
from wattserve.server.state import ServerState


async def start(request: Request, state: ServerState, model: str | None, id_prefix: str,
                params: SamplingParams, prompt_ids: Callable[..., list[int]], *prompt_args,
                param_names: dict[str, str], slo: SLOSpec | None, part: int | None = None
                ) -> tuple[Generation, dict]:
    """Returns the generation and the fields every response and chunk of it carries.
    `prompt_ids(tokenizer, *prompt_args)` runs on the tokenizer thread; `param_names` gives
    the API's name for an engine parameter where the two differ; `slo` is the body's;
    `part` numbers the engine requests of one API request that has several (prompts)."""
    engine = state.ready_engine()
    model = state.model_name(model)
    request_id = f"{id_prefix}-{request.state.request_id}"
    engine_id = request_id if part is None else f"{request_id}-{part}"
    try:
        ids = await state.tokenize(prompt_ids, engine.tokenizer, *prompt_args)
        gen = await Generation.start(engine, request, engine_id, ids, params,
                                     timeout=state.config.request_timeout,
                                     slo=state.slo if slo is None else slo.over(state.slo))
    except InvalidRequestError as exc:
        exc.param = param_names.get(exc.param, exc.param)
        raise
    header = {"id": request_id, "created": int(time.time()), "model": model,
              "system_fingerprint": state.fingerprint}
    return gen, header
