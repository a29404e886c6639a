"""Tool calls: a chat request's `tools` / `tool_choice` → the template's tools and a grammar; output → `tool_calls`.

The chat template renders the tools (and the history's assistant `tool_calls` and `tool` results); a template that
never mentions `tools` cannot, so `tools` with it is a 400 (start the server with a `--chat-template` that does).
The call syntax follows the template: Hermes / Qwen (`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`)
when the template writes `<tool_call>`, else Llama 3's JSON (`{"name": ..., "parameters": {...}}`).

| tool_choice                 | decoding                                         | answer                                     |
| --------------------------- | ------------------------------------------------ | ------------------------------------------ |
| `none`                      | free                                             | content only                               |
| `auto` (default with tools) | free                                             | calls parsed out of the text, if any       |
| `required`                  | grammar: one call (several with                  | `tool_calls`, finish_reason `tool_calls`   |
|                             | `parallel_tool_calls`) of any of the functions   |                                            |
| `{"type": "function", ...}` | grammar: calls of that function                  | the same                                   |

The grammar embeds each function's parameters schema, so enforced arguments always validate. Streaming sends each
call as OpenAI does: a first delta with `index`, `id`, `type` and the name, then pieces of the arguments' JSON text
(`ToolCallStream`); text before the first call goes out as content.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Sequence
from typing import Any

import attrs

from trillm.errors import InvalidRequestError
from trillm.http.validation import INVALID_COMBINATION
from trillm.http.schemas import (
    ChatCompletionRequest,
    ChatResponseMessage,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    ToolCall,
    ToolCallFunction,
    ToolCallsDelta,
    ToolDefinition,
)
from trillm.protocol.api import TextCodec
from trillm.structured.grammar import GrammarError, tool_call_grammar

log = logging.getLogger(__name__)

HERMES = "hermes"
LLAMA3_JSON = "llama3_json"
_CALL_OPEN, _CALL_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@attrs.frozen(kw_only=True)
class ToolPlan:
    """How one chat request uses its tools: the template's tool list, the grammar (forced calls) and the parser."""

    tools: list[dict[str, Any]]  # OpenAI tool definitions, as the template receives them
    call_format: str  # HERMES or LLAMA3_JSON
    grammar: str | None  # set for `required` and a named function
    is_parsed: bool  # False with tool_choice "none": the answer is content only


def call_format_of(template: str) -> str:
    """The tool-call syntax a chat template teaches its model."""
    return HERMES if _CALL_OPEN in template else LLAMA3_JSON


def tool_plan(body: ChatCompletionRequest, tokenizer: TextCodec) -> ToolPlan | None:
    """The request's use of tools, or None without tools.

    Raises:
        InvalidRequestError: a template without tool support, a bad tool_choice, or an uncompilable parameters schema.
    """
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice", code=INVALID_COMBINATION)
        return None
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "tools" not in template:
        raise InvalidRequestError("the chat template does not support tools: start the server with a "
                                  "--chat-template that renders `tools` (e.g. a Hermes-style template)", param="tools")
    functions = [(tool.function.name, tool.function.parameters or {"type": "object"}) for tool in body.tools]
    call_format = call_format_of(template)
    tools = tool_dicts(body.tools) or []
    if choice in (None, "auto", "none"):
        return ToolPlan(tools=tools, call_format=call_format, grammar=None, is_parsed=choice != "none")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        chosen = [f for f in functions if f[0] == name]
        if not chosen:
            raise InvalidRequestError(f"tool_choice names no function of tools: {json.dumps(choice)}",
                                      param="tool_choice", code=INVALID_COMBINATION)
        functions = chosen
    elif choice != "required":
        raise InvalidRequestError(f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                                  param="tool_choice")
    try:
        grammar = tool_call_grammar(functions, call_format=call_format, is_parallel=body.parallel_tool_calls)
    except GrammarError as exc:
        raise InvalidRequestError(str(exc), param="tools") from None
    return ToolPlan(tools=tools, call_format=call_format, grammar=grammar, is_parsed=True)


def _call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=f"call_{secrets.token_hex(12)}", function=ToolCallFunction(name=name, arguments=text))


def parse_tool_calls(text: str, call_format: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished answer; text that holds no well-formed call is all content."""
    if call_format == HERMES:
        calls = []
        for body in _HERMES_CALL.findall(text):
            try:
                parsed = json.loads(body)
                calls.append(_call(parsed["name"], parsed.get("arguments", {})))
            except (ValueError, KeyError, TypeError):
                log.debug("not a tool call: %r", body)
        if not calls:
            return text, []
        content = text[: text.index(_CALL_OPEN)].strip()
        return content or None, calls
    decoder = json.JSONDecoder()
    rest, calls = text.strip(), []
    while rest:
        try:
            parsed, end = decoder.raw_decode(rest)
            calls.append(_call(parsed["name"], parsed.get("parameters", parsed.get("arguments", {}))))
        except (ValueError, KeyError, TypeError):
            return text, []
        rest = rest[end:].lstrip().removeprefix(";").lstrip()
    return (None, calls) if calls else (text, [])


def _pending_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (it may still become one)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class ToolCallStream:
    """One streamed choice's text → content deltas and OpenAI tool-call deltas (Hermes syntax incrementally).

    Text before the first `<tool_call>` is content (a suffix that may start the tag is held back). Inside a call,
    once `{"name": "...", "arguments": ` has arrived the call's first delta goes out (index, id, type, name), then
    the arguments' text as it grows, holding back what may be the call's closing `}` and `</tool_call>`. Other
    formats are parsed when the choice finishes (`finish`).
    """

    def __init__(self, call_format: str) -> None:
        self._format = call_format
        self._text = ""
        self._sent = 0  # characters of `_text` already accounted for (content or a call's part)
        self._num_calls = 0
        self._args_sent = 0  # characters of the current call's arguments already sent
        self._in_call = False
        self._has_head = False
        self._head_len = 0  # characters of the current call's `{"name": ..., "arguments": ` head

    @property
    def num_calls(self) -> int:
        return self._num_calls

    def push(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        """New text of the choice → (content delta, tool-call deltas)."""
        self._text += text
        if self._format != HERMES:
            return "", []
        content = ""
        deltas: list[DeltaToolCall] = []
        while True:
            if not self._in_call:
                rest = self._text[self._sent :]
                start = rest.find(_CALL_OPEN)
                if start < 0:
                    keep = _pending_prefix(rest, _CALL_OPEN)
                    if self._num_calls == 0:
                        content += rest[: len(rest) - keep]
                    self._sent += len(rest) - keep
                    return content, deltas
                if self._num_calls == 0:
                    content += rest[:start]
                self._sent += start + len(_CALL_OPEN)
                self._in_call, self._has_head, self._args_sent = True, False, 0
            call_text = self._text[self._sent :]
            if not self._has_head:
                head = _HERMES_HEAD.match(call_text)
                if head is None:
                    return content, deltas
                self._has_head = True
                self._head_len = head.end()
                deltas.append(DeltaToolCall(index=self._num_calls, id=f"call_{secrets.token_hex(12)}",
                                            type="function", function=DeltaFunction(name=head.group(1), arguments="")))
            arguments = call_text[self._head_len :]
            close = arguments.find(_CALL_CLOSE)
            if close < 0:
                keep = _pending_prefix(arguments, "\n" + _CALL_CLOSE)
                body = arguments[: len(arguments) - keep].rstrip()
                ready = body[: max(self._args_sent, len(body) - 1)]  # the last `}` may close the call object
            else:
                ready = arguments[:close].rstrip()
                ready = ready[: ready.rfind("}")] if ready.endswith("}") else ready
            if len(ready) > self._args_sent:
                deltas.append(DeltaToolCall(index=self._num_calls,
                                            function=DeltaFunction(arguments=ready[self._args_sent :])))
                self._args_sent = len(ready)
            if close < 0:
                return content, deltas
            self._sent += self._head_len + close + len(_CALL_CLOSE)
            self._num_calls += 1
            self._in_call = False

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        """At the choice's end: what is left (held-back content; whole calls of the non-incremental formats)."""
        rest, self._sent = self._text[self._sent :], len(self._text)
        if self._format == HERMES:
            if not self._in_call:
                return (rest, []) if self._num_calls == 0 else ("", [])
            if self._has_head:
                return "", []  # cut inside a call (max_tokens): its arguments went out as far as they came
            # a call the incremental reader could not follow (e.g. "arguments" before "name"): parse it whole
            content, calls = parse_tool_calls(_CALL_OPEN + rest, HERMES)
            prefix = ""
        else:
            content, calls = parse_tool_calls(self._text, self._format)
            prefix = content or ""
        if not calls:  # no call after all: the text is content (for Hermes, what push held back from the tag on)
            if self._format == HERMES:
                return (_CALL_OPEN + rest if self._num_calls == 0 else ""), []
            return self._text, []
        first, self._num_calls = self._num_calls, self._num_calls + len(calls)
        return prefix, [DeltaToolCall(index=first + i, id=call.id, type="function",
                                      function=DeltaFunction(name=call.function.name,
                                                             arguments=call.function.arguments))
                        for i, call in enumerate(calls)]


def tool_dicts(tools: Sequence[ToolDefinition] | None) -> list[dict[str, Any]] | None:
    """OpenAI tool definitions as the plain dicts a chat template receives (None without tools)."""
    if not tools:
        return None
    return [attrs.asdict(tool, filter=lambda _, value: value is not None) for tool in tools]


def history_tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """An assistant message's tool calls as chat templates expect them: the arguments as an object when they parse."""
    converted = []
    for call in calls:
        try:
            arguments: Any = json.loads(call.function.arguments or "{}")
        except ValueError:
            arguments = call.function.arguments  # a template may still print the text
        converted.append({"id": call.id, "type": call.type,
                          "function": {"name": call.function.name, "arguments": arguments}})
    return converted


def tool_message(plan: ToolPlan | None, text: str, finish_reason: str | None) -> tuple[ChatResponseMessage, str | None]:
    """A finished choice's message and finish_reason: its calls parsed out when the request may call tools."""
    if plan is None or not plan.is_parsed:
        return ChatResponseMessage(content=text), finish_reason
    content, calls = parse_tool_calls(text, plan.call_format)
    if not calls:
        return ChatResponseMessage(content=text), finish_reason
    return ChatResponseMessage(content=content, tool_calls=calls), "tool_calls" if finish_reason == "stop" else \
        finish_reason


def stream_delta(stream: ToolCallStream, text: str, finish_reason: str | None) -> tuple[DeltaMessage, str | None]:
    """One streamed output of a tool-using choice → its delta and finish_reason (`tool_calls` once calls were made)."""
    content, calls = stream.push(text)
    if finish_reason is not None:
        tail, more = stream.finish()
        content, calls = content + tail, calls + more
        if stream.num_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
    if not calls:
        return DeltaMessage(content=content), finish_reason
    return ToolCallsDelta(content=content or None, tool_calls=calls), finish_reason
