"""The OpenAPI document (valid, complete, generated from the schemas), offline Swagger UI, a generated client."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from http_live import API_KEY, LiveServer, server_config
from http_fakes import FakeEngine
from openapi_spec_validator import validate

from trillm.http import schemas
from trillm.http.app import create_app
from trillm.http.limits import RequestLimits
from trillm.http.openapi import build_document, swagger_dist_dir


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer(create_app(server_config(api_keys=(API_KEY,)), engine=FakeEngine())).start()
    yield live
    live.stop()


@pytest.mark.slow
@pytest.mark.parametrize("is_auth_required", [False, True])
def test_document_is_valid_openapi(is_auth_required: bool) -> None:
    document = build_document(is_auth_required=is_auth_required)
    validate(document)  # raises on any error, dangling $refs included
    assert document["openapi"].startswith("3.1")


@pytest.mark.slow
def test_every_api_route_is_documented_with_schemas(server: LiveServer) -> None:
    document = httpx.get(f"{server.url}/openapi.json").json()
    validate(document)
    rules = {(re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())  # Quart's <path:x> is {x}
             for rule in server.app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}}
    undocumented = {"/", "/openapi.json", "/docs/{filename}"}
    api_rules = {(path, method) for path, method in rules if path not in undocumented}
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert api_rules == documented
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation["operationId"] and "200" in operation["responses"]
            if method == "post":
                schema = operation["requestBody"]["content"]["application/json"]["schema"]
                assert schema["$ref"].startswith("#/components/schemas/")
            if path.startswith("/v1/"):
                assert operation["security"] == [{"bearerAuth": []}]
                assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"}


def test_schemas_come_from_the_attrs_classes() -> None:
    components = build_document(is_auth_required=False)["components"]["schemas"]
    chat = components["ChatCompletionRequest"]
    assert chat["required"] == ["messages"]
    temperature = chat["properties"]["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    assert chat["properties"]["n"]["maximum"] == RequestLimits().max_n
    prompt_forms = components["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert [form.get("items", {}).get("type", form["type"]) for form in prompt_forms] == [
        "string", "string", "integer", "array"]
    assert "ChatCompletionChunk" in components and "ErrorResponse" in components


@pytest.mark.slow
def test_swagger_ui_is_served_from_local_assets(server: LiveServer) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(asset.startswith("/docs/") for asset in assets), assets
    for asset in assets + ["/docs/swagger-init.js"]:
        assert httpx.get(f"{server.url}{asset}").status_code == 200, asset
    dist = swagger_dist_dir()
    assert dist is not None and (dist / "VERSION").read_text().startswith("v5.")
    bundle = httpx.get(f"{server.url}/docs/swagger-ui-bundle.js").content
    assert bundle == (dist / "swagger-ui-bundle.js").read_bytes()
    assert "/openapi.json" in httpx.get(f"{server.url}/docs/swagger-init.js").text
    assert httpx.get(f"{server.url}/docs/../app.py").status_code == 404


@pytest.mark.slow
def test_generated_python_client_completes_a_chat(server: LiveServer, tmp_path: Path) -> None:
    generator = shutil.which("openapi-generator-cli", path=str(Path(sys.executable).parent))
    if generator is None:
        pytest.skip("openapi-generator-cli is not installed")
    spec = tmp_path / "openapi.json"
    spec.write_bytes(httpx.get(f"{server.url}/openapi.json").content)
    subprocess.run([generator, "generate", "-i", str(spec), "-g", "python", "-o", str(tmp_path / "client"),
                    "--package-name", "trillm_generated"], check=True, capture_output=True, timeout=300)
    sys.path.insert(0, str(tmp_path / "client"))
    try:
        client = importlib.import_module("trillm_generated")
        models = importlib.import_module("trillm_generated.models")
        configuration = client.Configuration(host=server.url, access_token=API_KEY)
        with client.ApiClient(configuration) as api_client:
            api = client.DefaultApi(api_client)
            assert api.list_models().data[0].id == "fake-model"
            # Union-typed fields are wrapped in the generator's anyOf classes (its from_dict cannot nest them).
            message = models.ChatMessage(role="user", content=models.ChatMessageContent("hi"))
            request = models.ChatCompletionRequest(model="fake-model", max_tokens=5,
                                                   messages=models.ChatCompletionRequestMessages([message]))
            answer = api.create_chat_completion(request)
            assert answer.choices[0].message.content == "Hello" and answer.usage.completion_tokens == 5
            prompt = models.CompletionRequestPrompt([[70], [71]])
            completion = api.create_completion(models.CompletionRequest(prompt=prompt, max_tokens=1))
            assert [c.text for c in completion.choices] == ["H", "H"]
    finally:
        sys.path.remove(str(tmp_path / "client"))
        for name in [m for m in sys.modules if m.startswith("trillm_generated")]:
            del sys.modules[name]
