"""The Responses API's memory: the last responses created with `store` (the default), for
GET /v1/responses/{id} and for `previous_response_id` to continue their conversation.

In memory and bounded: the least recently used goes first. A restart forgets them all, as a
client of a self-hosted server expects of a cache rather than a database.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class StoredResponse:
    response: dict  # the response object as it was returned
    messages: list[dict]  # the conversation so far as chat messages, its answer included


class ResponseStore:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored
