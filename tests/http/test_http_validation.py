"""The strict request converter (trillm/http/validation.py): exact JSON kinds, bounds, every error in one 400."""

from __future__ import annotations

import json

import pytest

from trillm.errors import InvalidRequestError
from trillm.http.schemas import ChatCompletionRequest, CompletionRequest, EncodeRequest, InteractiveRequest
from trillm.http import validation
from trillm.http.limits import RequestLimits
from trillm.http.validation import parse_body


def parse(cls: type, body: object) -> object:
    return parse_body(cls, json.dumps(body).encode())


def error_of(cls: type, body: object) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        parse(cls, body)
    return info.value


def test_chat_request_with_string_and_part_content_parses() -> None:
    request = parse(ChatCompletionRequest, {
        "model": "m", "messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "temperature": 0, "stop": "x", "prediction": {"type": "content"},  # an unknown field: ignored
    })
    assert isinstance(request, ChatCompletionRequest)
    assert request.temperature == 0.0 and isinstance(request.temperature, float)
    assert request.messages[1].content[0].text == "hi"  # type: ignore[union-attr,index]


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_accepts_the_four_forms(prompt: object) -> None:
    request = parse(CompletionRequest, {"prompt": prompt})
    assert isinstance(request, CompletionRequest) and request.prompt == prompt


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("max_tokens", "5", 'max_tokens: expected an integer or null, got string "5"'),
    ("stream", "false", 'stream: expected a boolean, got string "false"'),
    ("max_tokens", 3.9, "max_tokens: expected an integer or null, got number 3.9"),
    ("n", True, "n: expected an integer, got boolean true"),
    ("temperature", "0.5", 'temperature: expected a number or null, got string "0.5"'),
    ("stop", ["ok", 1], "stop[1]: expected a string, got integer 1"),
    ("temperature", 2.5, "temperature: must be <= 2, got 2.5"),
    ("top_p", -0.1, "top_p: must be >= 0, got -0.1"),
    ("n", 0, "n: must be >= 1, got 0"),
    ("presence_penalty", 3, "presence_penalty: must be <= 2, got 3"),
    ("top_logprobs", 21, "top_logprobs: must be <= 20, got 21"),
])
def test_wrong_type_or_range_names_the_field(field: str, value: object, expected: str) -> None:
    error = error_of(ChatCompletionRequest, {"messages": "hi", field: value, "logprobs": True})
    assert error.param is not None and error.param.startswith(field)
    assert error.message == f"1 invalid field: {expected}"


def test_every_bad_field_is_listed_and_param_is_the_first_sent() -> None:
    error = error_of(ChatCompletionRequest, {"messages": [{"role": "bot", "content": 5}], "top_p": 2, "n": "3"})
    assert error.param == "messages[0].role"
    assert error.message.startswith("4 invalid fields: messages[0].role: expected one of")
    for fragment in ("messages[0].content: expected a string, an array or null, got integer 5",
                     "top_p: must be <= 1, got 2", 'n: expected an integer, got string "3"'):
        assert fragment in error.message


def test_a_string_is_not_a_list_and_an_object_is_not_a_string() -> None:
    assert error_of(CompletionRequest, {"prompt": {"a": 1}}).message == (
        "1 invalid field: prompt: expected a string or an array, got an object")
    assert error_of(EncodeRequest, {"input": 5}).param == "input"
    assert error_of(ChatCompletionRequest, {"messages": "hi", "stop_token_ids": "12"}).message == (
        '1 invalid field: stop_token_ids: expected an array or null, got string "12"')


def test_body_must_be_a_json_object() -> None:
    for raw in (b"[]", b'"text"', b"3", b"null"):
        with pytest.raises(InvalidRequestError) as info:
            parse_body(ChatCompletionRequest, raw)
        assert info.value.param is None and info.value.message.startswith("The request body must be a JSON object")


@pytest.mark.parametrize("raw", [b"{", b'{"messages": NaN}', b'{"temperature": 1e999}', b"\xff\xfe{}",
                                 b"[" * 100_000 + b"]" * 100_000])
def test_malformed_json_is_rejected(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_body(ChatCompletionRequest, raw)
    assert info.value.code == "invalid_json"


def test_missing_required_field() -> None:
    error = error_of(ChatCompletionRequest, {"model": "m"})
    assert (error.param, error.message) == ("messages", "1 invalid field: messages: required field missing")


def test_cross_field_checks() -> None:
    assert error_of(ChatCompletionRequest, {"messages": "x", "top_logprobs": 2}).param == "top_logprobs"
    assert parse(ChatCompletionRequest, {"messages": "x", "top_logprobs": 0})  # harmless without logprobs
    assert error_of(ChatCompletionRequest, {"messages": []}).param == "messages"
    assert error_of(CompletionRequest, {"prompt": ["a", 1]}).param == "prompt"
    assert error_of(CompletionRequest, {"prompt": [[1], []]}).param == "prompt[1]"
    assert error_of(CompletionRequest, {"prompt": [-1]}).param == "prompt[0]"
    assert error_of(CompletionRequest, {"prompt": "x", "stop": [""]}).param == "stop"
    assert error_of(CompletionRequest, {"prompt": "x", "logit_bias": {"abc": 1}}).param == "logit_bias"
    assert error_of(InteractiveRequest, {"prompt": "x", "cancel": True}).param == "session_id"


def test_interactive_defaults_are_lmdeploys() -> None:
    request = parse(InteractiveRequest, {"prompt": "hi"})
    assert isinstance(request, InteractiveRequest)
    assert (request.session_id, request.top_p, request.top_k, request.temperature) == (-1, 0.8, 40, 0.8)
    assert request.interactive_mode is False and request.request_output_len is None


@pytest.mark.parametrize("bad", [True, 2.5])
def test_a_token_id_prompt_with_one_non_integer_names_it(bad: object) -> None:
    # Token-id lists are checked in one pass; anything but a plain int (bool included) takes the path that names it.
    error = error_of(CompletionRequest, {"prompt": [1, 2, bad, 4]})
    assert error.param == "prompt[2]"


# -- large bodies: refused from byte counts, before decoding (issue 13) ---------------------------------------------


def test_a_large_body_with_a_string_over_the_prompt_limit_is_refused_before_decoding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    limits = RequestLimits(max_prompt_bytes=1 << 20)
    monkeypatch.setattr(validation.json, "loads", None)  # decoding it would fail this test
    for text in ("word " * 400_000, "some words\\n" * 200_000):  # 2 MB; 2.4 MB with escapes: at least 1.4 MB
        raw = b'{"prompt": "' + text.encode() + b'"}'
        with pytest.raises(InvalidRequestError, match=r"more than 1048576 bytes of text.*--max-prompt-bytes"):
            parse_body(CompletionRequest, raw, limits)


def test_a_large_body_of_structure_or_short_strings_is_decoded() -> None:
    limits = RequestLimits(max_prompt_bytes=1 << 20)
    token_ids = json.dumps({"prompt": [list(range(1, 2000))] * 200}).encode()  # 2 MB of token ids, no strings
    escapes = json.dumps({"prompt": "\u00e9" * 300_000}).encode()  # 1.8 MB of \u00e9: 600 KB of UTF-8
    assert len(token_ids) > validation.LARGE_BODY_BYTES and len(escapes) > validation.LARGE_BODY_BYTES
    assert len(parse_body(CompletionRequest, token_ids, limits).prompt) == 200
    assert parse_body(CompletionRequest, escapes, limits).prompt == "\u00e9" * 300_000
