"""The Responses API's bounded store: least recently used goes first."""
from wattserve.server.response_store import ResponseStore, StoredResponse


def stored(name: str) -> StoredResponse:
    return StoredResponse({"id": name}, [])


def test_least_recently_used_is_dropped_first():
    store = ResponseStore(2)
    store.put("a", stored("a"))
    store.put("b", stored("b"))
    assert store.get("a").response == {"id": "a"}  # now b is the least recently used
    store.put("c", stored("c"))
    assert store.get("b") is None and store.get("a") and store.get("c")


def test_size_zero_keeps_nothing():
    store = ResponseStore(0)
    store.put("a", stored("a"))
    assert store.get("a") is None
