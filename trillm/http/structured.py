"""Structured outputs: a request's `response_format` (or vLLM's `guided_*` fields) turned into its grammar.

The grammar text goes into `SamplingParams.grammar`; the rank processes compile it once and mask every step of the
sequence with it (`trillm/structured/`). What cannot be compiled is a 400 naming the field and the problem, before
the request reaches the engine.

| request field                                              | output                                   |
| ---------------------------------------------------------- | ---------------------------------------- |
| `response_format: {"type": "json_object"}`                 | any JSON object                          |
| `response_format: {"type": "json_schema", "json_schema":   | JSON valid against the schema (`strict`: |
|   {"name": ..., "schema": {...}, "strict": true}}`         | unsupported keywords are a 400)          |
| `response_format: {"type": "regex_schema", "regex_schema"}` | text matching the regex (LMDeploy)      |
| `guided_json`, `guided_regex`, `guided_choice`,            | vLLM's spellings of the same; a grammar  |
|   `guided_grammar`                                          | in llguidance's Lark dialect             |

At most one of them may be given; `response_format: {"type": "text"}` is the same as none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from trillm.errors import InvalidRequestError
from trillm.http.validation import INVALID_COMBINATION
from trillm.http.schemas import SamplingFields
from trillm.structured.grammar import (
    GrammarError,
    choice_grammar,
    json_object_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
)

INVALID_GRAMMAR = "invalid_grammar"  # the 400 code of a constraint (regex, schema, grammar) that does not compile
log = logging.getLogger(__name__)


def request_grammar(body: SamplingFields) -> str | None:
    """The grammar that `body` constrains its output to, or None for free text.

    Raises:
        InvalidRequestError: several constraints at once, or one that does not compile (the message says why).
    """
    given = [name for name in ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
             if getattr(body, name) is not None]
    if body.response_format is not None and body.response_format.type == "text":
        given.remove("response_format")
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequestError(f"give at most one output constraint, got {', '.join(given)}", param=given[1],
                                  code=INVALID_COMBINATION)
    field = given[0]
    try:
        return _grammar(body, field)
    except GrammarError as exc:
        raise InvalidRequestError(str(exc), param=field, code=INVALID_GRAMMAR) from None


_GUIDED: dict[str, Callable[[Any], str]] = {  # vLLM's fields → the grammar of their value
    "guided_json": json_schema_grammar,
    "guided_regex": regex_grammar,
    "guided_choice": choice_grammar,
    "guided_grammar": lark_grammar,
}


def _grammar(body: SamplingFields, field: str) -> str:
    if field in _GUIDED:
        return _GUIDED[field](getattr(body, field))
    response_format = body.response_format
    assert response_format is not None
    if response_format.type == "json_object":
        return json_object_grammar()
    if response_format.type == "regex_schema":
        if response_format.regex_schema is None:
            raise GrammarError("response_format of type regex_schema needs regex_schema")
        return regex_grammar(response_format.regex_schema)
    spec = response_format.json_schema
    if spec is None:
        raise GrammarError("response_format of type json_schema needs json_schema")
    if spec.schema is None:
        return json_object_grammar()
    return json_schema_grammar(spec.schema, strict=bool(spec.strict))
