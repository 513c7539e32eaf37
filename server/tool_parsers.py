"""Tool calls in a model's own output format, for `tool_choice: "auto"`.

Each parser finds where calls may begin in the text (so a stream can hold that part back) and
splits a finished output into content and calls. Special tokens are gone from the text by the
time it arrives here (`[TOOL_CALLS]`, `<|python_tag|>` are special in Mistral's and Llama's
vocabularies), so each parser also accepts its call syntax without its marker.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


class ToolParser:
    marker = ""

    def call_start(self, text: str) -> int | None:
        """Where tool calls may begin in `text`, or None if they cannot have begun yet."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls); content None when the model only called. Text that does not
        parse as calls stays content."""
        start = self.call_start(text)
        if start is None:
            return text, []
        calls = self._calls(text[start:])
        if not calls:
            return text, []
        return text[:start].strip() or None, calls

    def _calls(self, text: str) -> list[ParsedCall]:
        raise NotImplementedError


class HermesParser(ToolParser):
    """Hermes, Qwen2.5: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated."""

    marker = "<tool_call>"
    _call = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def call_start(self, text: str) -> int | None:
        index = text.find(self.marker)
        return None if index < 0 else index

    def _calls(self, text: str) -> list[ParsedCall]:
        return _objects([_loads(m) for m in self._call.findall(text)])


class Llama3JsonParser(ToolParser):
    """Llama 3.1/3.2: the whole answer is `{"name": ..., "parameters": {...}}` (several joined
    by `;`), after `<|python_tag|>` when the model emits it."""

    marker = "<|python_tag|>"

    def call_start(self, text: str) -> int | None:
        stripped = text.removeprefix(self.marker).lstrip()
        return 0 if stripped.startswith("{") or text.startswith(self.marker) else None

    def _calls(self, text: str) -> list[ParsedCall]:
        text = text.removeprefix(self.marker).strip()
        return _objects([_loads(p) for p in _rejoin(re.split(r"\}\s*;\s*\{", text))])


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`."""

    marker = "[TOOL_CALLS]"

    def call_start(self, text: str) -> int | None:
        index = text.find(self.marker)
        if index >= 0:
            return index
        return 0 if text.lstrip().startswith("[{") else None

    def _calls(self, text: str) -> list[ParsedCall]:
        calls = _loads(text.replace(self.marker, "", 1).strip())
        return _objects(calls) if isinstance(calls, list) else []


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser,
}


def parser_for(name: str | None, chat_template: str | None) -> ToolParser | None:
    """`name` (--tool-call-parser) if given, else the format the chat template teaches."""
    if name is not None:
        return PARSERS[name]()
    source = chat_template or ""
    if "<tool_call>" in source:
        return HermesParser()
    if "[TOOL_CALLS]" in source:
        return MistralParser()
    if "<|python_tag|>" in source or "ipython" in source:
        return Llama3JsonParser()
    return None


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _rejoin(parts: list[str]) -> list[str]:
    """Objects split at "};{" with their braces put back."""
    last = len(parts) - 1
    return [("" if i == 0 else "{") + p + ("" if i == last else "}") for i, p in enumerate(parts)]


def _objects(items: list) -> list[ParsedCall]:
    """Calls from decoded objects; [] when any is not a call (then the text is content)."""
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        arguments = item.get("arguments", item.get("parameters", {}))
        if not isinstance(arguments, str):  # some models send the arguments' JSON as a string
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(ParsedCall(item["name"], arguments))
    return calls
