"""Grammars: what a request constrains its output to (JSON schema, JSON object, regex, choice, Lark), as llguidance text.

Pure functions over llguidance's grammar compilers, no torch: the HTTP layer builds a request's grammar here and
checks it (an invalid schema or regex is a 400 naming the problem, before the request reaches the engine); the
string travels in `SamplingParams.grammar` to the rank processes, which compile it once per distinct text against
the model's tokenizer (`structured/matchers.py`).

Why llguidance (docs/structured.md has the measurement): it installs as one 3 MB wheel with no dependencies (xgrammar
pulls transformers, triton and a torch requirement; outlines-core compiles a regex index per schema), compiles a
nested schema in about 1 ms against SmolLM2's 49k vocabulary (xgrammar 32 ms, outlines-core 730 ms), and computes
a mask in about 40 us per step on our CPU machine, far below a step's time.

Tool calls (`tool_call_grammar`) use llguidance's Lark dialect, whose `%json {...}` embeds a JSON schema: the model
must write the template's tool-call syntax around arguments that validate against the function's parameters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance

log = logging.getLogger(__name__)

# Compact JSON: the model may not pad with whitespace (a sampled run of spaces or newlines would never end).
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A response format, schema, regex or tool list that cannot be compiled; the message names the problem."""


def _checked(grammar: str, what: str) -> str:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"invalid {what}: {messages[0] if messages else 'rejected by the grammar compiler'}")
    return grammar


def json_schema_grammar(schema: Mapping[str, Any], *, strict: bool = False) -> str:
    """A grammar for JSON values that validate against `schema`.

    With `strict` a keyword the compiler does not support is an error; without it such keywords are ignored
    (the output still has the schema's shape as far as it is understood).

    Raises:
        GrammarError: the schema is not a JSON object or uses what cannot be compiled.
    """
    if not isinstance(schema, Mapping):
        raise GrammarError("invalid JSON schema: it must be a JSON object")
    options = dict(_JSON_OPTIONS, lenient=not strict)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), overrides=options)  # type: ignore[arg-type]
    except ValueError as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from None
    return _checked(grammar, "JSON schema")


def json_object_grammar() -> str:
    """Any JSON object (`response_format: {"type": "json_object"}`)."""
    return json_schema_grammar({"type": "object"})


def regex_grammar(pattern: str) -> str:
    """Text matching the regular expression `pattern` (whole output).

    Raises:
        GrammarError: the regex does not compile.
    """
    return _checked(llguidance.LLMatcher.grammar_from_regex(pattern), "regex")


def choice_grammar(choices: Sequence[str]) -> str:
    """Exactly one of `choices`.

    Raises:
        GrammarError: no choices.
    """
    if not choices:
        raise GrammarError("invalid choice list: it must hold at least one string")
    return _checked(llguidance.LLMatcher.grammar_from_lark(
        "start: " + " | ".join(json.dumps(choice) for choice in choices)), "choice list")


def lark_grammar(text: str) -> str:
    """A grammar in llguidance's Lark dialect (a superset of Lark; vLLM's and LMDeploy's EBNF fit it mostly).

    Raises:
        GrammarError: the grammar does not compile.
    """
    return _checked(llguidance.LLMatcher.grammar_from_lark(text), "grammar")


def tool_call_grammar(functions: Sequence[tuple[str, Mapping[str, Any]]], *, call_format: str,
                      is_parallel: bool) -> str:
    """Tool calls only, in the template's syntax, each naming one of `functions` (name, parameters schema).

    `call_format` is `hermes` (`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, Hermes, Qwen) or
    `llama3_json` (`{"name": ..., "parameters": {...}}`, Llama 3.1+). One call, or one or more with `is_parallel`.

    Raises:
        GrammarError: no functions, an unknown format, or a parameters schema that cannot be compiled.
    """
    if not functions:
        raise GrammarError("invalid tools: no function to call")
    arguments_key = {"hermes": "arguments", "llama3_json": "parameters"}.get(call_format)
    if arguments_key is None:
        raise GrammarError(f"invalid tool call format {call_format!r}: expected hermes or llama3_json")
    variants = [
        {"type": "object", "properties": {"name": {"const": name}, arguments_key: dict(parameters or {"type": "object"})},
         "required": ["name", arguments_key], "additionalProperties": False}
        for name, parameters in functions
    ]
    schema = {"anyOf": variants} if len(variants) > 1 else variants[0]
    compact = dict(_JSON_OPTIONS, lenient=True)
    body = f"%json {json.dumps({**schema, 'x-guidance': compact})}"
    if call_format == "hermes":
        lines = ['call: "<tool_call>\\n" call_body "\\n</tool_call>"', f"call_body: {body}"]
        separator = '"\\n"'
    else:
        lines = [f"call: {body}"]
        separator = '"; "'
    lines.insert(0, f"start: call ({separator} call)*" if is_parallel else "start: call")
    return _checked(llguidance.LLMatcher.grammar_from_lark("\n".join(lines) + "\n"), "tools")
