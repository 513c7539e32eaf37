"""The HTTP side of wattserve: an OpenAI-compatible API over the engine (see app.py)."""
