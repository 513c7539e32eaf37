"""Request fields this server does not know: accepted, as vLLM accepts them (clients send
fields a server may not implement), and logged once per field name so an operator can see
what clients expect without a log line per request."""
from __future__ import annotations

import logging

from pydantic import BaseModel

log = logging.getLogger("wattserve.server")


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the fields in `model` (and the models nested in it) that no request
    model declares; a list's items share their list's name ("messages.foo")."""
    names = [prefix + name for name in (model.model_extra or {})]
    for name in type(model).model_fields:
        names += _nested(getattr(model, name), f"{prefix}{name}.")
    return names


def _nested(value, prefix: str) -> list[str]:
    if isinstance(value, BaseModel):
        return unknown_fields(value, prefix)
    if isinstance(value, list):
        return [name for item in value for name in _nested(item, prefix)]
    return []


class UnknownFieldLog:
    def __init__(self):
        self._seen: set[tuple[str, str]] = set()  # (route path, field name)

    def note(self, path: str, body: BaseModel) -> None:
        for name in unknown_fields(body):
            if (path, name) not in self._seen:
                self._seen.add((path, name))
                log.warning("%s: ignoring unknown field '%s' (logged once)", path, name)
