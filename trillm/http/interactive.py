"""Interactive sessions: POST /v1/chat/interactive, LMDeploy's stateful chat (API.md, semantics 1-9).

The session itself (token history, parked KV blocks, one turn at a time) lives in the Engine's SessionActor; this
module only maps the request onto `Engine.interactive`, `Engine.end_session` and `Engine.cancel_session`:

- `cancel: true`: stop the running turn (its output stays in the history); 400 with session_id -1.
- `prompt: ""`, `request_output_len: 0`, `interactive_mode: false`: end the session; zeros with `stop`.
- otherwise a turn; session_id -1 gets a new id, returned in `session_id`. With the request header
  `x-session-continue: true` the turn must continue a session this server holds: an unknown id is a 404
  `session_not_found` instead of a new, empty session (a client behind several replicas learns that its session's
  replica went away; `trillm.APIClient` sends it on every turn after a session's first).

The stream is newline-delimited JSON: `text` is the delta, `tokens` cumulative, `finish_reason` null until the last
line (LMDeploy's APIClient reads exactly this).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncGenerator
from functools import partial

from quart import Blueprint, Response, request

from trillm.protocol.api import CompletionOutput, InteractiveTurn
from trillm.http.choices import ChoiceTotals
from trillm.http.errors import describe_exception
from trillm.http.framing import ndjson_line, streaming_response
from trillm.http.metrics import RequestTrace
from trillm.http.limits import resolve_max_tokens
from trillm.http.prompts import interactive_sampling, message_dicts, stop_strings
from trillm.http.schemas import ErrorResponse, InteractiveRequest, InteractiveResponse, encode
from trillm.http.state import current_state
from trillm.http.streams import ChoiceStream
from trillm.http.body import read_body
from trillm.http.validation import parse_request

log = logging.getLogger(__name__)

bp = Blueprint("interactive", __name__)


def _answer(session_id: int, *, text: str = "", tokens: int = 0, input_tokens: int = 0, history_tokens: int = 0,
            finish_reason: str | None = "stop") -> InteractiveResponse:
    return InteractiveResponse(text=text, tokens=tokens, input_tokens=input_tokens, history_tokens=history_tokens,
                               finish_reason=finish_reason, session_id=session_id)  # type: ignore[arg-type]


def _input_tokens(output: CompletionOutput) -> int:
    """Tokens this turn added to the session before generating.

    `num_prompt_tokens` counts the turn's whole prompt (the session's history plus the new text), like a
    stateless request's prompt, so the turn's own share is the difference.
    """
    return max(output.num_prompt_tokens - output.num_history_tokens, 0)


@bp.post("/v1/chat/interactive")
async def chat_interactive() -> Response:
    """One turn, a cancel, or the end of an interactive session."""
    state = current_state()
    body = await parse_request(InteractiveRequest, await read_body(), state.limits)
    if body.cancel:  # cancel and end are accepted even while draining (API.md semantics 7)
        log.info("session %d: cancel", body.session_id)
        await state.engine_for_control().cancel_session(body.session_id)
        return Response(encode(_answer(body.session_id)), content_type="application/json")
    if body.prompt == "" and body.request_output_len == 0 and not body.interactive_mode:
        log.info("session %d: end", body.session_id)
        if body.session_id != -1:
            await state.engine_for_control().end_session(body.session_id)
        return Response(encode(_answer(body.session_id)), content_type="application/json")
    engine = state.engine_for_request()
    session_id = engine.new_session_id() if body.session_id == -1 else body.session_id
    request_id = f"session-{session_id}-{secrets.token_hex(6)}"
    turn = InteractiveTurn(
        request_id=request_id,
        session_id=session_id,
        prompt=body.prompt if isinstance(body.prompt, str) else tuple(message_dicts(body.prompt)),
        interactive_mode=body.interactive_mode,
        sampling=interactive_sampling(body, resolve_max_tokens(state.limits,
                                                               ("request_output_len", body.request_output_len))),
        stop=stop_strings(body.stop),
        skip_special_tokens=body.skip_special_tokens,
        spaces_between_special_tokens=body.spaces_between_special_tokens,
        continues=request.headers.get("x-session-continue", "").strip().lower() in ("1", "true", "yes"),
    )
    log.info("%s turn: interactive_mode=%s, stream=%s, %s", request_id, body.interactive_mode, body.stream,
             turn.sampling)
    log.debug("%s prompt: %s", request_id, state.truncate_for_log(turn.prompt))
    source = partial(engine.interactive, turn)
    stream = await state.open_stream([(0, source)])
    trace = state.metrics.trace("interactive", request_id)
    if body.stream:
        return await streaming_response(_lines(stream, session_id, trace), "application/x-ndjson")
    totals = ChoiceTotals(1)
    last: CompletionOutput | None = None
    is_delivered = False  # False in `finally` when the view was cancelled: the client left before the answer
    try:
        for _, output in await stream.collect():
            totals.add(0, output)
            trace.on_tokens(len(output.token_ids))
            last = output
        is_delivered = True
    except Exception:
        is_delivered = True  # answered with an error body
        raise
    finally:
        trace.finish(is_disconnected=not is_delivered)
    answer = _answer(session_id, text=totals.text(0), tokens=totals.num_output_tokens[0],
                     input_tokens=_input_tokens(last) if last else 0,
                     history_tokens=last.num_history_tokens if last else 0, finish_reason=totals.finish_reasons[0])
    log.info("%s done: %d tokens, finish %s", request_id, answer.tokens, answer.finish_reason)
    return Response(encode(answer), content_type="application/json")


async def _lines(stream: ChoiceStream, session_id: int, trace: RequestTrace) -> AsyncGenerator[bytes, None]:
    is_delivered = False  # False in `finally`: the client left mid-stream
    tokens = 0
    try:
        yield b""  # sentinel (framing.primed)
        async for _, output in stream:
            tokens = output.num_output_tokens
            trace.on_tokens(len(output.token_ids))
            finish = output.finish_reason.value if output.finish_reason is not None else None
            if not output.text and finish is None:
                continue
            yield ndjson_line(_answer(session_id, text=output.text, tokens=output.num_output_tokens,
                                      input_tokens=_input_tokens(output), history_tokens=output.num_history_tokens,
                                      finish_reason=finish))
        is_delivered = True
    except Exception as exc:  # the engine failed, or the drain deadline: the status is sent already, report in-band
        _, detail = describe_exception(exc)
        yield ndjson_line(_answer(session_id, tokens=tokens, finish_reason="abort"))
        yield ndjson_line(ErrorResponse(error=detail))
        is_delivered = True
    finally:
        stream.close()
        trace.finish(is_disconnected=not is_delivered)
