"""The command line: `trillm serve api_server [MODEL] [flags]` builds a ServerConfig and serves the HTTP app.

Flags carry LMDeploy's names (API.md, CLI); each is accepted with `-` or `_` between words (`--server-port` and
`--server_port`). The server runs under `hypercorn.trio.serve` in this process: SIGINT or SIGTERM starts a drain
(new requests get 503, requests in flight finish, for at most --graceful-timeout seconds; a second signal stops at
once), then hypercorn closes the listeners and the engine shuts down.

`trillm serve api_client URL` (a terminal chat) and `trillm serve gradio URL` (a web chat) talk to a running server;
their code lives in `trillm/ui/`, imported only when one of them runs, so serving never loads it (nor gradio).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import attrs

from trillm.config import DEFAULT_MODEL, EngineConfig, ServerConfig
from trillm.errors import EngineDeadError

log = logging.getLogger(__name__)

ENGINE_WATCH_S = 0.1  # how often the server looks whether its engine is still alive
ENGINE_FAILURE_GRACE_S = 2.0  # after the engine failed: time for in-flight requests' errors before the server stops

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_SERVER_URL = "http://localhost:23333"
GRADIO_PORT = 6006
UI_INSTALL = ".venv/bin/pip install -e '.[ui]'"  # `make ui` runs it


def _normalize(argv: Sequence[str]) -> list[str]:
    """`--server_port=1` → `--server-port=1`: option names accept `_` for `-` (values are left alone)."""
    normalized = []
    for arg in argv:
        if arg.startswith("--"):
            name, sep, value = arg.partition("=")
            arg = "--" + name[2:].replace("_", "-") + sep + value
        normalized.append(arg)
    return normalized


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group("model and engine")
    engine.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                        help="a hub repo id (org/name), a local Hugging Face folder, a .gguf file, or "
                             "random:<preset> (random weights of a benchmark shape: llama2-7b, llama3-8b, "
                             f"internlm2-7b, tiny) (default: {DEFAULT_MODEL!r}, the built-in SmolLM2-135M-Instruct)")
    engine.add_argument("--model-name", help="the model id served in /v1/models (default: derived from MODEL)")
    engine.add_argument("--tp", type=int, help="tensor parallelism: GPUs to split the model over (default 1)")
    engine.add_argument("--session-len", type=int,
                        help="context window in tokens (default: the model's max positions)")
    engine.add_argument("--cache-max-entry-count", type=float,
                        help="fraction of free GPU memory for the KV cache; on CPU a fraction of the CPU KV "
                             "budget (default 0.8)")
    engine.add_argument("--cache-block-seq-len", type=int, help="tokens per KV-cache block (default 64)")
    engine.add_argument("--max-batch-size", type=int,
                        help="most sequences in one batch (default 256 on CUDA, 48 on CPU)")
    engine.add_argument("--max-prefill-token-num", type=int,
                        help="most prompt tokens prefilled in one step (default 8192)")
    engine.add_argument("--enable-prefix-caching", action="store_true", default=None,
                        help="reuse the KV cache of shared prompt prefixes across requests (the default; accepted "
                             "for LMDeploy's command lines)")
    engine.add_argument("--disable-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                        help="compute every prompt in full, even where another request already computed its prefix")
    engine.add_argument("--chat-template",
                        help="a chat template that replaces the model's: a Jinja file (as in Hugging Face's "
                             "tokenizer_config.json), or an LMDeploy JSON file with model_name, system, "
                             "meta_instruction, eosys, user, eoh, assistant, eoa, separator, capability, stop_words")
    engine.add_argument("--disable-overlap", dest="enable_overlap", action="store_false", default=None,
                        help="plan each engine step only after the previous one returned (default: plan step N+1 "
                             "while the GPU runs step N)")
    engine.add_argument("--disable-cuda-graph", dest="enable_cuda_graph", action="store_false", default=None,
                        help="run decode steps eagerly instead of replaying captured CUDA graphs")
    engine.add_argument("--deterministic", action="store_true", default=None,
                        help="batch-invariant kernels: a request gives the same tokens and logprobs whatever else "
                             "the server runs (alone or batched, prefix cache hit or not, after a preemption); "
                             "costs some speed, see docs/deterministic.md; CUDA, bfloat16/float16 only "
                             "(default: off, or on when TRILLM_DETERMINISTIC=1)")
    engine.add_argument("--tokenizer", metavar="MODEL",
                        help="use this model's (or folder's) tokenizer instead of MODEL's (default: MODEL's own; "
                             "random:<preset> models use the default model's)")
    engine.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"),
                        help="weights and activations (default auto: bfloat16 on CUDA, float32 on CPU)")
    engine.add_argument("--device", choices=("auto", "cuda", "cpu"), help="default auto: CUDA when present")
    engine.add_argument("--cpu-threads", type=int,
                        help="torch threads of each CPU rank (default: the usable cores split between the ranks)")
    engine.add_argument("--cache-dir", help="where converted GGUF models are kept (default ~/.cache/trillm)")
    engine.add_argument("--step-timeout", type=float, dest="step_timeout_s",
                        help="seconds a rank may take to answer one engine step before it counts as hung: the "
                             "engine then fails, requests get 503 and the server exits 1 (default 300; 0: no "
                             "watchdog)")
    engine.add_argument("--max-sessions", type=int,
                        help="most interactive sessions held at once; a new one past it gets a 429 (default 4096)")
    engine.add_argument("--session-idle-timeout", type=float, dest="session_idle_timeout_s",
                        help="seconds after which an idle interactive session is ended and its KV freed (default "
                             "3600; 0: never)")


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("HTTP server")
    server.add_argument("--server-name", help="address to listen on (default 0.0.0.0)")
    server.add_argument("--server-port", type=int, help="port to listen on (default 23333)")
    server.add_argument("--api-keys", nargs="*", metavar="KEY",
                        help="accepted API keys; /v1/* then need 'Authorization: Bearer <key>' (default: none)")
    server.add_argument("--allow-origins", nargs="*", metavar="ORIGIN",
                        help="CORS: origins allowed to call the API from a browser, or '*' (default: CORS off)")
    server.add_argument("--allow-credentials", action="store_true", default=None,
                        help="CORS: allow cookies and authorization headers on cross-origin requests")
    server.add_argument("--allow-methods", nargs="*", metavar="METHOD", help="CORS: allowed methods (default '*')")
    server.add_argument("--allow-headers", nargs="*", metavar="HEADER", help="CORS: allowed headers (default '*')")
    server.add_argument("--log-level", type=str.upper, choices=("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"),
                        help="default INFO")
    server.add_argument("--max-log-len", type=int,
                        help="cut prompts logged at DEBUG to this many characters (default: no limit; prompts are "
                             "never logged at INFO)")
    server.add_argument("--disable-docs", action="store_true", default=None,
                        help="do not serve the Swagger UI (/) and the OpenAPI document (/openapi.json)")
    server.add_argument("--disable-access-log", action="store_true", default=None,
                        help="do not log a line per request (method, path, status, duration, request id, tokens)")
    server.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default 16 MiB)")
    server.add_argument("--graceful-timeout", type=float, dest="graceful_timeout_s",
                        help="seconds requests in flight may take to finish on shutdown (default 30)")
    limits = parser.add_argument_group("per-request limits (a request over one gets a 400 naming the flag)")
    limits.add_argument("--max-new-tokens", type=int,
                        help="most tokens one choice may generate; also the default where a request sets none "
                             "(default: the context window; /v1/completions defaults to 16 as OpenAI's does)")
    limits.add_argument("--max-n", type=int, help="most choices per prompt, `n` (default 128, OpenAI's cap)")
    limits.add_argument("--max-prompts", type=int, help="most prompts in one /v1/completions request (default 256)")
    limits.add_argument("--max-choices", type=int,
                        help="most sequences one request may start: prompts x n (default 1024)")
    limits.add_argument("--max-stop", type=int, help="most stop strings, and most stop_token_ids, per request "
                                                     "(default 64)")
    limits.add_argument("--max-stop-chars", type=int,
                        help="most characters in a request's stop strings together (default 4096)")
    limits.add_argument("--max-prompt-bytes", type=int,
                        help="most UTF-8 bytes of prompt text in one request, checked before tokenizing "
                             "(default 1 MiB)")
    server.add_argument("--backlog", type=int,
                        help="connections the kernel may queue before the server accepts them (default 4096, capped "
                             "by net.core.somaxconn); a full queue drops connections, which /metrics counts")
    server.add_argument("--keep-alive-timeout", type=float, dest="keep_alive_timeout_s",
                        help="seconds an idle keep-alive connection stays open (default 75: longer than clients' "
                             "own pools keep theirs, so a client never reuses a connection the server is closing)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trillm", description="trillm: an OpenAI-compatible LLM server.")
    parser.add_argument("--version", action="version", version=f"trillm {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve a model, or talk to a server")
    targets = serve.add_subparsers(dest="target", required=True, metavar="TARGET")
    api_server = targets.add_parser(
        "api_server", help="serve MODEL behind the OpenAI-compatible HTTP API",
        description="Serve MODEL behind an OpenAI-compatible HTTP API with LMDeploy interactive sessions. "
                    "Flags accept '-' or '_' between words.",
    )
    _add_engine_flags(api_server)
    _add_server_flags(api_server)
    _add_api_client(targets)
    _add_gradio(targets)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("trillm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("api_server_url", metavar="URL",
                        help=f"the address of a running `trillm serve api_server`, e.g. {DEFAULT_SERVER_URL}")
    parser.add_argument("--api-key", metavar="KEY",
                        help="sent as 'Authorization: Bearer KEY', for a server started with --api-keys")


def _add_api_client(targets: Any) -> None:
    parser = targets.add_parser(
        "api_client", help="chat with a running server in this terminal",
        description="Chat with a running server in this terminal, over /v1/chat/interactive (the server keeps the "
                    "conversation). End a message with an empty line. Type `end` to end the session and start a "
                    "new one, `exit` (or Ctrl-D) to end it and quit. Ctrl-C stops the answer being written and "
                    "keeps the session.",
        epilog=f"example: trillm serve api_client {DEFAULT_SERVER_URL}",
    )
    _add_url(parser)
    parser.add_argument("--session-id", type=int, metavar="N",
                        help="the interactive session to talk in, e.g. one an APIClient script started "
                             "(default: a new random id, printed at start)")


def _add_gradio(targets: Any) -> None:
    parser = targets.add_parser(
        "gradio", help="a web chat page for a running server",
        description="Serve a web chat page (gradio) for a running server: streamed answers, Cancel and Reset "
                    "buttons, sliders for max new tokens, top_p and temperature, one interactive session per "
                    f"browser tab. Needs the `ui` extra: {UI_INSTALL} (or `make ui`).",
        epilog=f"example: trillm serve gradio {DEFAULT_SERVER_URL} --server-name 127.0.0.1 --server-port "
               f"{GRADIO_PORT}",
    )
    _add_url(parser)
    parser.add_argument("--server-name", default="0.0.0.0",
                        help="address the page listens on (default 0.0.0.0: every interface; 127.0.0.1 keeps it "
                             "to this machine)")
    parser.add_argument("--server-port", type=int, default=GRADIO_PORT,
                        help=f"port the page listens on (default {GRADIO_PORT})")


def _fields(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The flags given for `cls`'s fields (unset flags keep the config's defaults)."""
    values = {}
    for field in attrs.fields(cls):
        value = getattr(args, field.name, None)
        if value is None or field.name == "engine":
            continue
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return values


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """A ServerConfig from parsed `serve api_server` flags.

    Raises:
        ValueError: a value fails the config's validation (the message names the flag).
    """
    engine_fields = _fields(EngineConfig, args)
    env_deterministic = os.environ.get("TRILLM_DETERMINISTIC", "").lower() in ("1", "true", "yes", "on")
    if "deterministic" not in engine_fields and env_deterministic:
        engine_fields["deterministic"] = True
    engine = EngineConfig(**engine_fields)
    return ServerConfig(engine=engine, **_fields(ServerConfig, args))


async def _wait_for_shutdown(state: Any, grace_s: float) -> None:
    """Hypercorn's shutdown trigger: on SIGINT/SIGTERM drain, wait for in-flight requests, then return."""
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as first:  # a signal, or the engine failing (a rank died or hung)

            async def on_signal() -> None:
                async for signum in signals:
                    log.info("%s: draining (new requests get 503; up to %.0f s for those in flight)",
                             signal.Signals(signum).name, grace_s)
                    break
                first.cancel_scope.cancel()

            first.start_soon(on_signal)
            first.start_soon(_exit_on_engine_failure, state, first.cancel_scope)
        if not state.is_alive:
            return
        state.drain()
        with trio.move_on_after(grace_s) as waiting:
            async with trio.open_nursery() as nursery:

                async def stop_on_second_signal() -> None:
                    async for signum in signals:
                        log.warning("%s again: stopping now", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_second_signal)
                await state.wait_idle()
                nursery.cancel_scope.cancel()
        if waiting.cancelled_caught or state.num_in_flight:  # the deadline, or a second signal
            await state.end_in_flight(f"The server is shutting down: its drain deadline of {grace_s:g} s "
                                      "(--graceful-timeout) passed before this request finished")
    log.info("shutting down")


async def _exit_on_engine_failure(state: Any, scope: Any) -> None:
    """Once the engine has failed, give requests in flight ENGINE_FAILURE_GRACE_S to send their error (and load
    balancers a /health 503), then cancel `scope`: the server stops and the process exits with status 1."""
    import trio

    while state.is_alive:
        await trio.sleep(ENGINE_WATCH_S)
    log.error("the engine failed (%s): stopping the server", state.failure_reason())
    with trio.move_on_after(ENGINE_FAILURE_GRACE_S):
        await state.wait_idle()
    await trio.sleep(min(ENGINE_FAILURE_GRACE_S, 1.0))  # /health answers 503 meanwhile
    scope.cancel()


async def serve(config: ServerConfig) -> None:
    """Open the engine, then serve the app for `config` until SIGINT/SIGTERM (runs inside `trio.run`).

    The engine opens before hypercorn binds, so a model that cannot load fails here, with nothing listening.

    Raises:
        ModelLoadError, EngineDeadError: the engine could not start.
    """
    import hypercorn.trio
    import trio

    from trillm.actors.engine import Engine
    from trillm.http.app import create_app
    from trillm.http.listening import bind_host, check_port_free, hypercorn_settings, raise_open_file_limit

    check_port_free(config.server_name, config.server_port)  # before the model loads, which takes a while
    host = bind_host(config.server_name)
    hypercorn_config = hypercorn_settings(config)
    hypercorn_config.graceful_timeout = 1.0  # the drain already waited for requests in flight
    raise_open_file_limit()
    async with Engine.open(config.engine) as engine:
        app = create_app(config, engine=engine)
        state = app.extensions["trillm"]
        trigger = partial(_wait_for_shutdown, state, config.graceful_timeout_s)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn.trio.serve, app, hypercorn_config,
                                                shutdown_trigger=trigger))
            url = binds[0] if binds else f"http://{host}:{config.server_port}"
            browser_url = url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")
            what = "API docs" if not config.disable_docs else "API"
            print(f"trillm: serving {engine.model_name} at {url} -- open {browser_url} in a browser for the "
                  f"{what}", flush=True)
    # the server stopped because the engine failed: exit non-zero, saying why (is_alive is False after any close)
    if engine.failure is not None or state.failure is not None:
        raise EngineDeadError(f"the engine failed while serving: {state.failure_reason()}")


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `trillm` command."""
    parser = build_parser()
    args = parser.parse_args(_normalize(sys.argv[1:] if argv is None else argv))
    if args.target == "api_client":
        return _run_api_client(args)
    if args.target == "gradio":
        return _run_gradio(parser, args)
    try:
        config = config_from_args(args)
        if config.engine.chat_template:  # a template of neither kind fails here, before anything loads
            from trillm.chat_template import load_chat_template

            load_chat_template(config.engine.chat_template)
    except ValueError as exc:
        parser.exit(2, f"trillm serve api_server: error: {exc}\n")
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    import trio

    try:
        trio.run(serve, config)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a failed start-up (model not found, rank failed): one line, not a traceback
        log.debug("start-up failed", exc_info=True)
        print(f"trillm: {_leaf(exc)}", file=sys.stderr)
        return 1
    return 0


def _run_api_client(args: argparse.Namespace) -> int:
    """`serve api_client`: the terminal chat."""
    from trillm.ui.terminal import chat_in_terminal

    try:
        return chat_in_terminal(args.api_server_url, api_key=args.api_key, session_id=args.session_id)
    except KeyboardInterrupt:  # a second Ctrl-C while the session was being ended
        return 130


def _run_gradio(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`serve gradio`: the web chat, once gradio is known to be installed."""
    if importlib.util.find_spec("gradio") is None:
        parser.exit(2, f"trillm serve gradio: gradio is not installed; install the `ui` extra: {UI_INSTALL} "
                       "(or `make ui`)\n")
    from trillm.ui.web_chat import serve_web_chat

    try:
        return serve_web_chat(args.api_server_url, api_key=args.api_key, server_name=args.server_name,
                              server_port=args.server_port)
    except KeyboardInterrupt:
        return 0
