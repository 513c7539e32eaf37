"""What a request constrains its output to: plain, picklable data, validated at both ends."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from wattserve.engine.request import InvalidRequestError

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[Kind, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")

# xgrammar prefixes its errors with a time and a C++ source location, which mean nothing to a client.
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


@dataclass(frozen=True)
class OutputConstraint:
    """`spec`: a JSON Schema's text (json_schema), a regex, a JSON list of strings (choice), an
    EBNF grammar in xgrammar's dialect (grammar), or "" (json_object: any JSON object).
    Frozen and hashable: compiled grammars are cached by it."""

    kind: Kind
    spec: str = ""

    def grammar(self):
        """The xgrammar Grammar; raises InvalidRequestError naming the problem."""
        import xgrammar as xgr  # a compiled extension: only requests that constrain load it

        if self.kind not in KINDS:
            raise InvalidRequestError(f"unknown output constraint {self.kind!r}", "structured_output")
        try:
            if self.kind == "json_schema":
                # Compact JSON: free whitespace lets a weak model pad its answer forever.
                return xgr.Grammar.from_json_schema(self.spec, any_whitespace=False)
            if self.kind == "json_object":
                return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
            if self.kind == "regex":
                return xgr.Grammar.from_regex(self.spec)
            if self.kind == "choice":
                return xgr.Grammar.from_ebnf(_choice_ebnf(self.spec))
            return xgr.Grammar.from_ebnf(self.spec)
        except RuntimeError as exc:
            message = _LOCATION.sub("", str(exc).strip()).strip()
            raise InvalidRequestError(f"invalid {self.kind}: {message}", "structured_output") from None


def _choice_ebnf(spec: str) -> str:
    choices = json.loads(spec)
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequestError("choice needs a list of non-empty strings", "structured_output")
    # JSON string literals are valid EBNF literals in xgrammar's dialect (same escapes).
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
