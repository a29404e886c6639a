"""Schemathesis over /openapi.json against a FakeEngine server (issue 13.5): bounded, derandomized.

Checks: no 5xx for any generated request, schema-valid or not; responses conform to their documented status codes,
media types and schemas; an undeclared method gets a 405; a request that breaks the schema is refused; a request
the schema allows is accepted, or refused only with a documented business error (`positive_data_accepted`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from http_fakes import FakeEngine  # noqa: E402
from http_live import LiveServer, server_config  # noqa: E402
from schemathesis import checks  # noqa: E402

from trillm.http.app import create_app  # noqa: E402

# The documented 4xx a schema-valid request may still get: what depends on the server's state or model, which a
# schema cannot state (API.md's errors). Anything else refused is a rule the document does not state: a bug.
BUSINESS_STATUSES = {401, 404, 409, 429}  # key, model or session not found, session busy, too many sessions
BUSINESS_CODES_400 = {
    "context_length_exceeded",  # the prompt (after the chat template) does not fit this server's window
    "limit_exceeded",  # limits over several fields: prompts x n (--max-choices), text bytes, stop characters
    "token_id_out_of_vocab",  # a token id (prompt, stop_token_ids, logit_bias) past this model's vocabulary
    "invalid_combination",  # a rule between fields, stated in their descriptions (e.g. tool_choice needs tools)
    "empty_prompt",  # the text gave no token (with this model's tokenizer: one that adds a BOS token gives one)
    "invalid_grammar",  # a regex, JSON schema or grammar that does not compile (a string to the document)
}


def positive_data_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schema-valid request gets no 4xx but the business errors above (schemathesis' positive_data_acceptance,
    with the business 400s told apart by their error code)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or not 400 <= response.status_code < 500:
        return None
    if response.status_code in BUSINESS_STATUSES:
        return None
    code = (response.json().get("error") or {}).get("code") if response.status_code == 400 else None
    if code in BUSINESS_CODES_400:
        return None
    raise AssertionError(f"a schema-valid request was refused: {response.status_code} {response.text[:400]}\n"
                         f"body: {str(case.body)[:400]}")


CHECKS = (checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.negative_data_rejection, checks.unsupported_method,
          positive_data_accepted)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer(create_app(server_config(), engine=FakeEngine(max_model_len=256))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(live: LiveServer) -> Any:
    import httpx

    document = httpx.get(f"{live.url}/openapi.json", timeout=30).json()
    api = schemathesis.openapi.from_dict(document)
    api.config.update(base_url=live.url)
    return api


def _bounded(case: Any) -> None:
    if isinstance(case.body, dict):
        case.body.pop("stream", None)  # streamed answers are not JSON: their events are checked elsewhere
        for field in ("max_tokens", "max_completion_tokens", "request_output_len", "n"):
            if isinstance(case.body.get(field), int) and case.body[field] > 4:
                case.body[field] = 4  # bounded work per example


@pytest.mark.slow
def test_no_request_gets_a_5xx_and_answers_match_the_document(api_schema: Any) -> None:
    from hypothesis import given

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 7

    for operation in operations:

        @settings(max_examples=15, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            _bounded(case)
            response = case.call(timeout=30)
            case.validate_response(response, checks=CHECKS)

        check()
