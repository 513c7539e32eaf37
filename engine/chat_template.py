"""Chat templates, rendered with jinja2 the way HF transformers renders them.

A prompt must render to the same text here as in transformers'
`tokenizer.apply_chat_template(..., tokenize=False)`, since the model was trained on that text.
So the environment mirrors transformers' `_compile_jinja_template`: trim_blocks and
lstrip_blocks, loopcontrols, a `tojson` that keeps non-ASCII and HTML characters,
`raise_exception` and `strftime_now`. Templates ship inside checkpoints and are untrusted
code, hence the immutable sandbox.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from wattserve.engine.request import InvalidRequestError


class _TemplateRaised(jinja2.TemplateError):
    """The template itself rejected the messages through `raise_exception`."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML, which would change tool schemas in prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    Training templates mark assistant turns with it (transformers uses it for loss masks);
    without the tag such templates would not even compile.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


class ChatTemplate:
    """One compiled chat template; compile once per model, render once per request."""

    def __init__(self, source: str):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self._template = env.from_string(source)  # TemplateSyntaxError for a broken template

    def __reduce__(self):
        # Compiled templates do not pickle: the engine process sends the source to the front end.
        return ChatTemplate, (self.source,)

    def render(self, messages: list[dict], *, tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **variables: Any) -> str:
        """Render the prompt text; `variables` are e.g. bos_token, eos_token, enable_thinking.

        Raises InvalidRequestError(param="messages") when the template rejects the messages.
        """
        try:
            return self._template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except _TemplateRaised as e:
            raise InvalidRequestError(str(e), param="messages") from e
        # A template that trips over the messages' shape (content None where it concatenates
        # strings, a missing key) is the request's fault as far as the client can tell.
        except (jinja2.TemplateError, TypeError) as e:
            raise InvalidRequestError(
                f"the chat template could not render these messages: {e}", param="messages"
            ) from e
