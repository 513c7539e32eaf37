"""The engine core's loop, whichever client drives it: take the requests and aborts that
arrived (waiting for one only when idle), run a step, publish its outputs."""
from __future__ import annotations

from typing import Callable

from wattserve.engine.core import EngineCore
from wattserve.engine.request import InvalidRequestError, QueueFull, RequestOutput

# Messages, as tuples (cheap to pickle):
#   ("add", request_id, prompt_token_ids, params, arrival_time, slo)
#   ("abort", request_id)
#   ("stop", request_id, indices): the front end found stop strings (engine/output_processor.py)
#   ("shutdown",)
Message = tuple


def run_core_loop(core: EngineCore, next_message: Callable[[bool], Message | None],
                  publish: Callable[[list[RequestOutput], dict[str, Exception]], None]) -> None:
    """Returns after a shutdown message, with every request aborted. `next_message(block)`
    returns None when nothing came (a blocking wait may time out, so that an idle loop can
    publish state); `publish(outputs, errors)` runs after every pass, also an empty one;
    `errors` are requests refused at admission, by id."""
    while True:
        errors: dict[str, Exception] = {}
        block = not core.has_work()
        while (msg := next_message(block)) is not None:
            block = False
            if msg[0] == "shutdown":
                core.abort_all()
                return
            if msg[0] == "abort":
                core.abort(msg[1])
                continue
            if msg[0] == "stop":
                core.stop(*msg[1:])
                continue
            try:
                if core.num_queued() >= core.max_queue_len:
                    raise QueueFull(f"{core.max_queue_len} requests are already waiting")
                core.add_request(*msg[1:])
            except (InvalidRequestError, QueueFull) as exc:
                errors[msg[1]] = exc
        publish(core.step() if core.has_work() else [], errors)
