"""Tool calling: the parsers and the streamed deltas (pure), then the real engine with a Hermes-style template.

SmolLM2's own template renders no tools, so the live tests start the server with `tests/http/hermes_tools.jinja`
(`--chat-template`); the template without tools is a 400 (test_http_structured.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest
from http_live import LiveServer, engine_server

from trillm.http.tools import HERMES, LLAMA3_JSON, ToolCallStream, parse_tool_calls

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_TEXT = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
               '\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')


def test_hermes_calls_are_parsed_with_the_text_before_them_as_content() -> None:
    content, calls = parse_tool_calls(HERMES_TEXT, HERMES)
    assert content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("add", {"a": 1, "b": 2})]
    assert parse_tool_calls("<tool_call>\n{not json}\n</tool_call>", HERMES) == (
        "<tool_call>\n{not json}\n</tool_call>", [])


def test_llama3_json_calls_are_parsed() -> None:
    content, calls = parse_tool_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", '
                                      '"parameters": {"a": 3, "b": 4}}', LLAMA3_JSON)
    assert content is None and [json.loads(c.function.arguments)["a"] for c in calls] == [1, 3]
    assert parse_tool_calls("The answer is 3.", LLAMA3_JSON) == ("The answer is 3.", [])


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_streamed_deltas_reassemble_into_the_parsed_calls(piece: int) -> None:
    stream = ToolCallStream(HERMES)
    content, calls, ids = "", {}, {}
    for start in range(0, len(HERMES_TEXT), piece):
        text, deltas = stream.push(HERMES_TEXT[start : start + piece])
        content += text
        for delta in deltas:
            if delta.id is not None:
                assert delta.index not in ids and delta.function.arguments == "" and delta.type == "function"
                ids[delta.index] = delta.id
                calls[delta.index] = [delta.function.name, ""]
            else:
                calls[delta.index][1] += delta.function.arguments or ""
    tail, more = stream.finish()
    assert tail == "" and more == [] and stream.num_calls == 2
    _, expected = parse_tool_calls(HERMES_TEXT, HERMES)
    assert content == "Let me check."
    assert [(name, json.loads(arguments)) for name, arguments in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in expected]


def test_text_without_calls_streams_as_content_including_a_held_back_tag_prefix() -> None:
    stream = ToolCallStream(HERMES)
    first, _ = stream.push("a < b and <tool_")
    tail, calls = stream.finish()
    assert first + tail == "a < b and <tool_" and calls == [] and stream.num_calls == 0


def test_a_call_the_incremental_reader_cannot_follow_is_sent_whole_at_the_end() -> None:
    stream = ToolCallStream(HERMES)
    text = 'Sure.<tool_call>\n{"arguments": {"a": 1, "b": 2}, "name": "add"}\n</tool_call>'
    content, deltas = stream.push(text)
    assert content == "Sure." and deltas == []
    tail, calls = stream.finish()
    assert tail == "" and [(c.index, c.function.name, json.loads(c.function.arguments or "")) for c in calls] == [
        (0, "add", {"a": 1, "b": 2})]
    broken = ToolCallStream(HERMES)
    content, _ = broken.push("x<tool_call>\n{oops")
    tail, calls = broken.finish()
    assert content + tail == "x<tool_call>\n{oops" and calls == []


# ----------------------------------------------------------------------------------------------------- live engine


@pytest.fixture(scope="module")
def server(smollm2_folder: str) -> Iterator[LiveServer]:
    template = str(Path(__file__).with_name("hermes_tools.jinja"))
    with engine_server(smollm2_folder, session_len=1024, max_batch_size=8, chat_template=template) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=600) as client:
        yield client


def assert_valid_calls(message: dict[str, object], names: set[str]) -> list[tuple[str, dict[str, object]]]:
    calls = message["tool_calls"]
    assert isinstance(calls, list) and calls
    result = []
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
        assert name in names
        jsonschema.validate(arguments, SCHEMAS[name])
        result.append((name, arguments))
    return result


@pytest.mark.slow
def test_required_and_named_choices_always_call_with_valid_arguments(http: httpx.Client) -> None:
    body = http.post("/v1/chat/completions", json={
        "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
        "n": 2, "temperature": 1.0, "seed": 5, "max_tokens": 60}).json()
    for choice in body["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        assert len(assert_valid_calls(choice["message"], {"get_weather", "add"})) == 1
    named = http.post("/v1/chat/completions", json={
        "messages": MESSAGES, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}},
        "parallel_tool_calls": False, "temperature": 1.0, "seed": 6, "max_tokens": 60}).json()
    assert named["choices"][0]["finish_reason"] == "tool_calls"
    assert {name for name, _ in assert_valid_calls(named["choices"][0]["message"], {"add"})} == {"add"}


@pytest.mark.slow
def test_a_streamed_call_reassembles_to_the_same_call_and_the_tool_result_turn_is_accepted(
        http: httpx.Client) -> None:
    request = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "temperature": 0, "max_tokens": 60,
               "parallel_tool_calls": False}
    whole = http.post("/v1/chat/completions", json=request).json()["choices"][0]
    ((name, arguments),) = assert_valid_calls(whole["message"], {"get_weather", "add"})
    response = http.post("/v1/chat/completions", json={**request, "stream": True})
    chunks = [json.loads(line.removeprefix("data: ")) for line in response.text.split("\n\n")
              if line.startswith("data: {")]
    streamed: dict[int, list[str]] = {}
    finish = None
    for chunk in chunks:
        (choice,) = chunk["choices"]
        finish = choice["finish_reason"] or finish
        for delta in choice["delta"].get("tool_calls") or []:
            if delta.get("id"):
                streamed[delta["index"]] = [delta["function"]["name"], delta["function"].get("arguments") or ""]
            else:
                streamed[delta["index"]][1] += delta["function"]["arguments"]
    assert finish == "tool_calls"
    assert [(n, json.loads(a)) for n, a in streamed.values()] == [(name, arguments)]
    follow_up = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": whole["message"]["tool_calls"]},
                 {"role": "tool", "tool_call_id": whole["message"]["tool_calls"][0]["id"],
                  "content": json.dumps({"temperature": 21})}]
    answer = http.post("/v1/chat/completions", json={"messages": follow_up, "tools": TOOLS, "max_tokens": 8,
                                                     "temperature": 0})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]


def test_a_named_function_that_is_not_in_tools_is_a_400(http: httpx.Client) -> None:
    answer = http.post("/v1/chat/completions", json={
        "messages": MESSAGES, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "tool_choice"
