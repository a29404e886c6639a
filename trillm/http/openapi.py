"""OpenAPI document: every route with its request and response schemas, generated from `http/schemas.py`.

Schemas come from `msgspec.json.schema_components` over the attrs classes (JSON Schema 2020-12, hence OpenAPI
3.1); nothing here restates a field. The route table below only says which class goes in and out of each path.

Swagger UI is served at `/` from local files: the page and its start script from `http/static/`, the
swagger-ui-dist 5.x bundle from the directory the `flask-swagger-ui` package ships it in (found without importing
that package, which would import Flask). `--disable-docs` registers none of these routes, nor /openapi.json.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import attrs
import msgspec
from quart import Response, send_from_directory
from quart_trio import QuartTrio
from werkzeug.exceptions import NotFound

from trillm.http import schemas
from trillm.http.limits import RequestLimits, published
from trillm.http.schemas import encode

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
_SWAGGER_ASSETS = frozenset({
    "swagger-ui.css", "index.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "favicon-32x32.png",
    "favicon-16x16.png",
})
_REF = "#/components/schemas/{name}"
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
_ERRORS = {
    "400": "Invalid request: malformed JSON, wrong types, values out of range, prompt too long",
    "401": "Missing or invalid API key",
    "404": "Unknown model; on /v1/chat/interactive with x-session-continue, a session this server does not hold",
    "409": "Session busy: a turn of this session is running",
    "413": "Request body too large",
    "429": "Too many interactive sessions (--max-sessions)",
    "503": "Server draining or engine failed",
}


@attrs.frozen(kw_only=True)
class _Route:
    path: str
    method: str
    operation_id: str
    summary: str
    request: type | None
    response: type | None  # None: not JSON (see `media`)
    media: dict[str, str] = attrs.field(factory=dict)  # extra media types of the 200 answer → description
    is_protected: bool = True
    errors: tuple[str, ...] = ("400", "401", "404", "413", "503")
    example: dict[str, Any] | None = None  # the request body Swagger UI's "Try it out" starts from
    path_parameters: tuple[tuple[str, str], ...] = ()  # (name, description) of each `{name}` in the path
    header_parameters: tuple[tuple[str, str], ...] = ()  # (name, description) of optional request headers


_ROUTES = (
    _Route(path="/v1/models", method="get", operation_id="list_models", summary="List the served model",
           request=None, response=schemas.ModelList, errors=("401",)),
    _Route(path="/v1/models/{model}", method="get", operation_id="retrieve_model",
           summary="The served model's card; 404 model_not_found for any other id", request=None,
           response=schemas.ModelCard, errors=("401", "404"), path_parameters=(("model", "the model id"),)),
    _Route(path="/v1/chat/completions", method="post", operation_id="create_chat_completion",
           summary="Chat completion (OpenAI); with stream=true an SSE stream of ChatCompletionChunk events",
           request=schemas.ChatCompletionRequest, response=schemas.ChatCompletionResponse,
           media={"text/event-stream": "`data: <ChatCompletionChunk>` events, then `data: [DONE]`"},
           example={"messages": [{"role": "user", "content": "Say hello in three words."}], "max_tokens": 32}),
    _Route(path="/v1/completions", method="post", operation_id="create_completion",
           summary="Text completion (OpenAI); with stream=true an SSE stream of CompletionResponse events",
           request=schemas.CompletionRequest, response=schemas.CompletionResponse,
           media={"text/event-stream": "`data: <CompletionResponse>` events, then `data: [DONE]`"},
           example={"prompt": "The capital of France is", "max_tokens": 16}),
    _Route(path="/v1/chat/interactive", method="post", operation_id="chat_interactive",
           summary="One turn of an LMDeploy interactive session; with stream=true newline-delimited JSON",
           request=schemas.InteractiveRequest, response=schemas.InteractiveResponse,
           media={"application/x-ndjson": "one InteractiveResponse per line; `text` is the delta"},
           errors=("400", "401", "404", "409", "413", "429", "503"),
           example={"prompt": "Hello!", "session_id": -1, "interactive_mode": True, "request_output_len": 32},
           header_parameters=(
               ("x-session-continue", "`true`: this turn continues a session the server must already hold; an "
                                      "unknown session_id is a 404 session_not_found instead of a new session"),
               ("x-session-id", "the session_id again, for load balancers that route sessions by header"),
           )),
    _Route(path="/v1/encode", method="post", operation_id="encode", summary="Tokenize text",
           request=schemas.EncodeRequest, response=schemas.EncodeResponse, errors=("400", "401", "413", "503"),
           example={"input": "Hello, world!"}),
    _Route(path="/health", method="get", operation_id="health", summary="200 while the engine is alive",
           request=None, response=schemas.HealthResponse, is_protected=False, errors=("503",)),
    _Route(path="/metrics", method="get", operation_id="metrics", summary="Prometheus metrics (text format)",
           request=None, response=None, media={"text/plain": "Prometheus exposition format"}, is_protected=False,
           errors=()),
)

# Classes that appear only inside streams, documented so that clients can generate models for them.
_STREAM_CLASSES = (schemas.ChatCompletionChunk, schemas.ToolCallsDelta, schemas.ErrorResponse)


def _operation(route: _Route, refs: dict[type, dict[str, Any]], is_auth_required: bool) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if route.response is not None:
        content["application/json"] = {"schema": refs[route.response]}
    for media, description in route.media.items():
        content[media] = {"schema": {"type": "string", "description": description}}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    for status in route.errors:
        responses[status] = {
            "description": _ERRORS[status],
            "content": {"application/json": {"schema": refs[schemas.ErrorResponse]}},
        }
    operation: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary, "responses": responses}
    parameters = [{"name": name, "in": "path", "required": True, "description": description,
                   "schema": {"type": "string"}} for name, description in route.path_parameters]
    parameters += [{"name": name, "in": "header", "required": False, "description": description,
                    "schema": {"type": "string"}} for name, description in route.header_parameters]
    if parameters:
        operation["parameters"] = parameters
    if route.request is not None:
        body: dict[str, Any] = {"schema": refs[route.request]}
        if route.example is not None:
            body["example"] = route.example
        operation["requestBody"] = {"required": True, "content": {"application/json": body}}
    if route.is_protected:
        operation["security"] = [{"bearerAuth": []}] if is_auth_required else [{"bearerAuth": []}, {}]
    return operation


def _apply_exact_forms(classes: list[type], components: dict[str, Any]) -> None:
    """Replace each property whose attrs field lists EXACT_FORMS by the anyOf of those forms' schemas."""
    for cls in classes:
        for field in attrs.fields(cls):
            forms = field.metadata.get(schemas.EXACT_FORMS)
            if forms and cls.__name__ in components:
                properties = components[cls.__name__]["properties"]
                kept = {k: v for k, v in properties[field.name].items() if k in ("title", "description", "default")}
                properties[field.name] = {**kept, "anyOf": [msgspec.json.schema(form) for form in forms]}


def _apply_limits(components: dict[str, Any], limits: RequestLimits) -> None:
    """State the server's per-request limits (http/limits.py) on the properties they bound."""
    applies_to = {"maxItems": ("array",), "maximum": ("integer", "number")}
    for schema, name, keywords, item_types in published(limits):
        prop = components[schema]["properties"][name]
        for member in prop.get("anyOf", [prop]):  # in a union, each keyword bounds the members of its kind
            if item_types is not None and member.get("items", {}).get("type") not in item_types:
                continue
            member.update({k: v for k, v in keywords.items() if member.get("type") in applies_to[k]})


# Shape rules the validator enforces (validation._cross_checks) that the attrs classes cannot state: stated here so that
# a request the document allows is one the server accepts. (schema, property, keywords for its array members)
_SHAPE_RULES = (
    ("ChatCompletionRequest", "messages", {"minItems": 1}),
    ("CompletionRequest", "prompt", {"minItems": 1}),
    ("InteractiveRequest", "prompt", {"minItems": 1}),
)


def _apply_shape_rules(components: dict[str, Any]) -> None:
    for schema, name, keywords in _SHAPE_RULES:
        prop = components[schema]["properties"][name]
        for member in prop.get("anyOf", [prop]):
            if member.get("type") == "array":
                member.update(keywords)
                if member.get("items", {}).get("type") == "array":  # a list of token-id lists: none empty
                    member["items"].update(keywords)
    for schema in ("ChatCompletionRequest", "CompletionRequest", "InteractiveRequest"):
        for member in components[schema]["properties"]["stop"].get("anyOf", []):  # stop strings are not empty
            target = member.get("items", member) if member.get("type") == "array" else member
            if target.get("type") == "string":
                target["minLength"] = 1
    for schema in ("ChatCompletionRequest", "CompletionRequest"):  # logit_bias keys are token ids
        for member in components[schema]["properties"]["logit_bias"].get("anyOf", []):
            if member.get("type") == "object":
                member["propertyNames"] = {"pattern": "^[0-9]{1,10}$"}  # validation._TOKEN_ID_KEY


def _mark_int64(schema: Any) -> None:
    """`format: int64` on every integer that may pass 2^31 - 1 (session ids, seeds, timestamps, counts).

    Without it, generators for typed languages pick a 32-bit integer: the ids the server assigns start at 2^31
    and overflowed a generated Rust client's i32.
    """
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            fits_int32 = schema.get("maximum", INT32_MAX + 1) <= INT32_MAX and schema.get("minimum", -1) >= INT32_MIN
            if not fits_int32:
                schema.setdefault("format", "int64")
        for value in schema.values():
            _mark_int64(value)
    elif isinstance(schema, list):
        for value in schema:
            _mark_int64(value)


def build_document(*, is_auth_required: bool, limits: RequestLimits | None = None, title: str = "trillm",
                   version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the server's API, stating the server's request `limits` (default ones if None)."""
    classes = [r.request for r in _ROUTES if r.request] + [r.response for r in _ROUTES if r.response]
    classes += list(_STREAM_CLASSES)
    classes = list(dict.fromkeys(classes))
    refs_list, components = msgspec.json.schema_components(classes, ref_template=_REF)
    refs = dict(zip(classes, refs_list))
    _apply_exact_forms(classes, components)
    _apply_limits(components, limits or RequestLimits())
    _apply_shape_rules(components)
    _mark_int64(components)
    paths: dict[str, Any] = {}
    for route in _ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route, refs, is_auth_required)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "OpenAI-compatible LLM serving with LMDeploy interactive sessions."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "one of the server's --api-keys"}},
        },
    }


def swagger_dist_dir() -> Path | None:
    """The swagger-ui-dist files shipped inside flask-swagger-ui, or None when that package is missing."""
    spec = importlib.util.find_spec("flask_swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    dist = Path(next(iter(spec.submodule_search_locations))) / "dist"
    return dist if (dist / "swagger-ui-bundle.js").is_file() else None


def register_docs(app: QuartTrio, *, is_auth_required: bool, limits: RequestLimits | None = None) -> None:
    """Add `/openapi.json`, Swagger UI at `/`, and its assets under `/docs/`."""
    document = encode(build_document(is_auth_required=is_auth_required, limits=limits))
    dist = swagger_dist_dir()
    if dist is None:
        log.warning("flask-swagger-ui is not installed: Swagger UI at / is unavailable (/openapi.json works)")

    @app.get("/openapi.json")
    async def openapi_json() -> Response:
        return Response(document, content_type="application/json")

    @app.get("/")
    async def swagger_ui() -> Response:
        if dist is None:
            raise NotFound("Swagger UI assets are not installed (pip install flask-swagger-ui); see /openapi.json")
        return await send_from_directory(STATIC_DIR, "swagger-ui.html")

    @app.get("/docs/<path:filename>")
    async def swagger_asset(filename: str) -> Response:
        if filename == "swagger-init.js":
            return await send_from_directory(STATIC_DIR, filename)
        if dist is None or filename not in _SWAGGER_ASSETS:
            raise NotFound()
        return await send_from_directory(dist, filename)
