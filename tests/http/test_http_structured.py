"""Structured outputs over HTTP on the real engine (SmolLM2 on CPU): response_format, vLLM's guided_* fields, errors.

The grammar masks every step of a constrained sequence on the rank (`trillm/structured/`), so the answers must parse
and validate whatever the model would rather say, at temperature 1 too. (Free rows beside constrained ones keep
their greedy tokens: tests/structured/test_matchers.py.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import pytest
from http_live import LiveServer, engine_server


pytestmark = pytest.mark.slow

SCHEMA = {  # a nested object, an enum and an array, bounded so that 20 answers fit the token budget
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                  "floor": {"type": "integer", "minimum": 0, "maximum": 9}},
                 "required": ["city", "floor"], "additionalProperties": False},
    },
    "required": ["name", "kind", "tags", "home"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]


@pytest.fixture(scope="module")
def server(smollm2_folder: str) -> Iterator[LiveServer]:
    with engine_server(smollm2_folder, session_len=512, max_batch_size=24) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=600) as client:
        yield client


def test_json_schema_answers_at_temperature_1_all_validate(http: httpx.Client) -> None:
    body = http.post("/v1/chat/completions", json={
        "messages": MESSAGES, "n": 20, "temperature": 1.0, "seed": 1, "max_tokens": 110,
        "response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}},
    }).json()
    assert len(body["choices"]) == 20
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    assert len({c["message"]["content"] for c in body["choices"]}) > 10  # sampled, not one forced answer


def test_json_object_always_parses_and_guided_choice_picks_one(http: httpx.Client) -> None:
    body = http.post("/v1/chat/completions", json={"messages": MESSAGES, "n": 2, "temperature": 1.0, "seed": 3,
                                                   "max_tokens": 40, "response_format": {"type": "json_object"},
                                                   "guided_json": None}).json()
    for choice in body["choices"]:
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:  # cut by max_tokens: what came out is still a prefix of a JSON object
            assert choice["message"]["content"].startswith("{")
    picked = http.post("/v1/completions", json={"prompt": "Is the sky blue? Answer:", "max_tokens": 5,
                                                "guided_choice": ["yes", "no"], "temperature": 1.0}).json()
    assert picked["choices"][0]["text"] in {"yes", "no"}
    regex = http.post("/v1/chat/completions", json={
        "messages": MESSAGES, "max_tokens": 12, "temperature": 0,
        "response_format": {"type": "regex_schema", "regex_schema": "[0-9]{3}-[0-9]{4}"}}).json()
    assert len(regex["choices"][0]["message"]["content"]) == 8 and regex["choices"][0]["message"]["content"][3] == "-"


@pytest.mark.parametrize(("extra", "param", "message"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "invalid JSON schema: Invalid type: foo"),
    ({"guided_regex": "(("}, "guided_regex", "invalid regex"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "give at most one output constraint"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
])
def test_invalid_constraints_are_a_400_naming_the_problem(http: httpx.Client, extra: dict[str, object], param: str,
                                                          message: str) -> None:
    answer = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **extra})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_tools_with_a_template_that_cannot_render_them_is_a_400(http: httpx.Client) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    answer = http.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": tools, "max_tokens": 4})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "tools" and error["message"].startswith("the chat template does not support tools")
