"""Model retrieval (GET /v1/models/{id}) and the 404 of routes the server does not offer, over a FakeEngine."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from http_live import LiveServer


@pytest.fixture(scope="module")
def http(fake_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_server.url, timeout=30) as raw:
        yield raw


def test_sdk_models_retrieve_returns_the_served_card(fake_server: LiveServer) -> None:
    with openai.OpenAI(api_key="x", base_url=f"{fake_server.url}/v1", max_retries=0) as sdk:
        card = sdk.models.retrieve("fake-model")
        assert card.id == "fake-model" and card.object == "model" and card.owned_by == "trillm"
        with pytest.raises(openai.NotFoundError) as caught:
            sdk.models.retrieve("gpt-17")
    assert caught.value.code == "model_not_found"


def test_model_id_with_a_slash_is_matched_whole(http: httpx.Client) -> None:
    answer = http.get("/v1/models/org/fake-model")
    assert answer.status_code == 404
    assert answer.json()["error"] == {"message": "The model `org/fake-model` does not exist.",
                                      "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


def test_unknown_v1_route_says_the_server_does_not_offer_it(http: httpx.Client) -> None:
    answer = http.post("/v1/embeddings", json={"input": "x"})
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "not_found"
    assert error["message"].startswith("This server does not offer /v1/embeddings")


def test_unknown_route_outside_v1_keeps_the_generic_message(http: httpx.Client) -> None:
    answer = http.get("/nowhere")
    assert answer.status_code == 404 and "does not offer" not in answer.json()["error"]["message"]
