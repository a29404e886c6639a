"""The HTTP app: trillm's QuartTrio application, `trillm.http.app:app`.

`create_app(config, engine=None)` builds an app; the module-level `app` is one configured from `TRILLM_*`
environment variables (built at import; a bad variable exits), for hypercorn's command line:

    hypercorn --worker-class trio trillm.http.app:app

(optionally with `--config python:trillm.http.hypercorn_config`, which binds from TRILLM_SERVER_NAME/PORT).
Without an injected engine the app opens `Engine.open(config.engine)` in its nursery before serving and closes it
after (`ServerState.run_engine`); `trillm serve api_server` instead opens the engine itself and injects it.

Cross-cutting rules applied to every request here: CORS (only when --allow-origins is set), API keys on `/v1/*`
(constant-time comparison, 401 `invalid_api_key`), the body size limit (413), metrics by route and status.
Route modules: `chat.py`, `completions.py`, `interactive.py`; docs: `openapi.py`; small routes below.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio

from trillm.config import ServerConfig, server_config_from_env
from trillm.errors import EngineDeadError, EngineDrainingError
from trillm.http import access_log, chat, completions, interactive
from trillm.http.errors import AUTHENTICATION, error_response, exception_response, register_error_handlers
from trillm.http.metrics import CONTENT_TYPE
from trillm.http.openapi import register_docs
from trillm.http.schemas import EncodeRequest, EncodeResponse, HealthResponse, ModelCard, ModelList, encode
from trillm.http.prompts import off_loop, prompt_size
from trillm.http.state import ServerState, current_state
from trillm.http.body import read_body
from trillm.http.validation import parse_request
from trillm.protocol.api import EngineClient

log = logging.getLogger(__name__)

CORS_MAX_AGE_S = 600
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def create_app(config: ServerConfig, engine: Any | None = None) -> QuartTrio:
    """Build the app for `config`; `engine` (an opened Engine or a fake with its API) skips opening one."""
    app = QuartTrio(__name__, static_folder=None)  # docs assets are served by openapi.py
    app.config["RESPONSE_TIMEOUT"] = None  # Quart's 60 s default silently truncates long streams
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = config.graceful_timeout_s  # the engine closes in there
    state = ServerState(config, engine)
    app.extensions["trillm"] = state
    register_error_handlers(app)
    if not config.disable_docs:
        register_docs(app, is_auth_required=bool(config.api_keys), limits=state.limits)
    for blueprint in (chat.bp, completions.bp, interactive.bp):
        app.register_blueprint(blueprint)
    app.add_url_rule("/v1/models", view_func=_models, methods=["GET"])
    app.add_url_rule("/v1/models/<path:model>", view_func=_model, methods=["GET"])
    app.add_url_rule("/v1/encode", view_func=_encode, methods=["POST"])
    app.add_url_rule("/health", view_func=_health, methods=["GET"])
    app.add_url_rule("/metrics", view_func=_metrics, methods=["GET"])
    if not config.disable_access_log:
        app.before_request(access_log.begin)
    app.before_request(_guard)
    app.after_request(_finish)

    @app.before_serving
    async def open_engine() -> None:
        await app.nursery.start(state.listen_watch.run)
        if state.is_engine_owned:
            await app.nursery.start(state.run_engine)

    @app.after_serving
    async def close_engine() -> None:
        state.listen_watch.stop()
        await state.close_engine()

    return app


# ------------------------------------------------------------------------------------------------- request hooks


def _is_key_valid(keys: tuple[str, ...], authorization: str) -> bool:
    """Bearer-token check that compares against every key in constant time (no early exit on a match)."""
    scheme, _, token = authorization.partition(" ")
    presented = token.strip().encode() if scheme.lower() == "bearer" else b""
    is_valid = False
    for key in keys:
        is_valid |= hmac.compare_digest(key.encode(), presented)
    return is_valid and bool(presented)


def _cors_origin(config: ServerConfig, origin: str | None) -> str | None:
    """The Access-Control-Allow-Origin value for `origin`, or None when CORS is off or the origin not allowed."""
    if not config.allow_origins or origin is None:
        return None
    if "*" in config.allow_origins:
        return origin if config.allow_credentials else "*"
    return origin if origin in config.allow_origins else None


async def _guard() -> Response | None:
    """Read the body, answer CORS preflights (no key needed), then check the API key on /v1/*.

    The body is read before any early answer (401, 404, 405): hypercorn stalls the next request on a keep-alive
    connection whose previous request body was left unread. Reading it also applies the size limit (413) first.
    """
    await read_body()
    config = current_state().config
    allowed_origin = _cors_origin(config, request.headers.get("Origin"))
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers and allowed_origin:
        requested_headers = request.headers.get("Access-Control-Request-Headers", "")
        headers = {
            "Access-Control-Allow-Origin": allowed_origin,
            "Access-Control-Allow-Methods": ", ".join(config.allow_methods).replace(
                "*", "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"),
            "Access-Control-Allow-Headers": requested_headers if "*" in config.allow_headers
            else ", ".join(config.allow_headers),
            "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
        }
        if config.allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return Response("", status=200, headers=headers)
    if config.api_keys and request.path.startswith("/v1/") and request.method != "OPTIONS":
        authorization = request.headers.get("Authorization", "")
        if not _is_key_valid(config.api_keys, authorization):
            message = ("Incorrect API key provided." if authorization else
                       "Missing API key: send 'Authorization: Bearer <key>'.")
            return error_response(401, message, type=AUTHENTICATION, code="invalid_api_key")
    return None


async def _finish(response: Response) -> Response:
    """CORS headers on every answer, and the request counted by route and status."""
    state = current_state()
    allowed_origin = _cors_origin(state.config, request.headers.get("Origin"))
    if allowed_origin:
        response.headers["Access-Control-Allow-Origin"] = allowed_origin
        response.headers.add("Vary", "Origin")
        if state.config.allow_credentials:
            response.headers["Access-Control-Allow-Credentials"] = "true"
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    state.metrics.count_request(rule, response.status_code)
    access_log.finish(response)
    return response


# ------------------------------------------------------------------------------------------------- small routes


def _model_card(engine: EngineClient) -> ModelCard:
    return ModelCard(id=engine.model_name, created=engine.created, root=engine.model_name,
                     max_model_len=engine.max_model_len)


async def _models() -> Response:
    """GET /v1/models: the one served model."""
    card = _model_card(current_state().engine_for_request())
    return Response(encode(ModelList(data=[card])), content_type="application/json")


async def _model(model: str) -> Response:
    """GET /v1/models/{id}: the served model's card (OpenAI's `models.retrieve`); 404 model_not_found otherwise."""
    card = _model_card(current_state().engine_for_request(model))
    return Response(encode(card), content_type="application/json")


async def _encode() -> Response:
    """POST /v1/encode: token ids of a string or a list of strings."""
    state = current_state()
    body = await parse_request(EncodeRequest, await read_body(), state.limits)
    tokenizer = state.engine_for_request().tokenizer

    def ids(text: str) -> list[int]:
        if body.do_preprocess:
            text = tokenizer.render_chat([{"role": "user", "content": text}])
        return list(tokenizer.encode(text, add_bos=body.add_bos))

    if isinstance(body.input, str):
        input_ids = await off_loop(ids, body.input, size=len(body.input))
        answer = EncodeResponse(input_ids=input_ids, length=len(input_ids))  # type: ignore[arg-type]
    else:
        all_ids = await off_loop(lambda: [ids(text) for text in body.input], size=prompt_size(body.input))
        answer = EncodeResponse(input_ids=all_ids, length=[len(x) for x in all_ids])  # type: ignore[arg-type]
    return Response(encode(answer), content_type="application/json")


async def _health() -> Response:
    """GET /health: 200 while the engine is alive; 503 once it failed, and while the server drains."""
    state = current_state()
    try:
        state.engine_for_request()
    except (EngineDeadError, EngineDrainingError) as exc:
        return exception_response(exc)
    return Response(encode(HealthResponse()), content_type="application/json")


async def _metrics() -> Response:
    """GET /metrics: Prometheus text format."""
    return Response(current_state().metrics.render(), content_type=CONTENT_TYPE)


def _app_from_env() -> QuartTrio:
    try:
        config = server_config_from_env()
    except ValueError as exc:
        raise SystemExit(f"trillm: bad TRILLM_* environment: {exc}") from None
    env_app = create_app(config)

    async def configure_logging() -> None:  # served by hypercorn's CLI: nobody else configured logging
        if not logging.getLogger().handlers:
            logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
        logging.getLogger("trillm").setLevel(config.log_level)

    env_app.before_serving_funcs.insert(0, configure_logging)  # before the engine loads, so its logs show
    return env_app


app = _app_from_env()
