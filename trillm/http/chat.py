"""Chat completions: POST /v1/chat/completions, as one JSON answer or an SSE stream.

Streaming: each choice's first chunk carries `role` (sent at once, before the first token), content chunks follow
with each choice's own `index`, the chunk with a choice's last content carries its `finish_reason`, and with
`stream_options.include_usage` one last chunk has `choices: []` and the usage.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncGenerator
from functools import partial
from typing import Any

import attrs
from quart import Blueprint, Response

from trillm.http.choices import ChoiceTotals, chat_logprobs, collect_totals
from trillm.http.errors import describe_exception
from trillm.http.framing import SSE_DONE, sse_error, sse_event, streaming_response
from trillm.http.metrics import RequestTrace
from trillm.http.limits import resolve_max_tokens
from trillm.http.prompts import chat_prompt_ids, generate_request, off_loop, prompt_size, sampling_params
from trillm.http.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    Usage,
    encode,
)
from trillm.http.state import current_state
from trillm.http.structured import request_grammar
from trillm.http.tools import ToolCallStream, ToolPlan, stream_delta, tool_message, tool_plan
from trillm.http.streams import ChoiceStream
from trillm.http.body import read_body
from trillm.http.validation import parse_request

log = logging.getLogger(__name__)

bp = Blueprint("chat", __name__)


@attrs.frozen(kw_only=True)
class _Reply:
    """What every chunk or answer of one chat request repeats."""

    id: str
    created: int
    model: str
    n: int
    num_prompt_tokens: int
    num_top_logprobs: int | None  # None: no logprobs asked
    tokenizer: Any
    tools: ToolPlan | None  # tool calls parsed out of the answers (http/tools.py)
    trace: RequestTrace


    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        return sse_event(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                             usage=usage))


@bp.post("/v1/chat/completions")
async def chat_completions() -> Response:
    """OpenAI chat completion (JSON or SSE)."""
    state = current_state()
    body = await parse_request(ChatCompletionRequest, await read_body(), state.limits)
    engine = state.engine_for_request(body.model)
    tokenizer = engine.tokenizer
    prompt_ids = await off_loop(chat_prompt_ids, tokenizer, body, size=prompt_size(body.messages))
    max_tokens = resolve_max_tokens(state.limits, ("max_completion_tokens", body.max_completion_tokens),
                                    ("max_tokens", body.max_tokens))
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    sampling = sampling_params(body, tokenizer.generation_defaults, tokenizer.vocab_size, max_tokens=max_tokens,
                               logprobs=num_top)
    tools = tool_plan(body, tokenizer)
    grammar = tools.grammar if tools is not None and tools.grammar is not None else request_grammar(body)
    sampling = attrs.evolve(sampling, grammar=grammar)
    request_id = f"chatcmpl-{secrets.token_hex(12)}"
    reply = _Reply(id=request_id, created=int(time.time()), model=engine.model_name,
                   n=body.n, num_prompt_tokens=len(prompt_ids), num_top_logprobs=num_top, tokenizer=tokenizer,
                   tools=tools, trace=state.metrics.trace("chat", request_id))
    reply.trace.num_prompt_tokens = reply.num_prompt_tokens  # for the access log
    generate = generate_request(body, request_id=reply.id, prompt_ids=prompt_ids, sampling=sampling,
                                prompt_field="messages")
    log.info("%s chat: %d prompt tokens, n=%d, stream=%s, %s", reply.id, len(prompt_ids), body.n, body.stream,
             sampling)
    log.debug("%s messages: %s", reply.id, state.truncate_for_log(body.messages))
    stream = await state.open_stream([(0, partial(engine.generate, generate))])
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return await streaming_response(_events(stream, reply, include_usage), "text/event-stream")
    totals, elapsed_s = await collect_totals(stream, body.n, reply.trace)
    log.info("%s done in %.3f s: %d completion tokens, finish %s", reply.id, elapsed_s, totals.completion_tokens,
             totals.finish_reasons)
    answer = ChatCompletionResponse(
        id=reply.id, created=reply.created, model=reply.model, usage=totals.usage(reply.num_prompt_tokens, reply.n),
        choices=[
            ChatChoice(
                index=i,
                message=message,
                logprobs=None if num_top is None else chat_logprobs(tokenizer, totals.logprobs[i], num_top),
                finish_reason=finish_reason,  # type: ignore[arg-type]
            )
            for i in range(body.n)
            for message, finish_reason in [tool_message(tools, totals.text(i), totals.finish_reasons[i])]
        ],
    )
    return Response(encode(answer), content_type="application/json")


async def _events(stream: ChoiceStream, reply: _Reply, include_usage: bool) -> AsyncGenerator[bytes, None]:
    totals = ChoiceTotals(reply.n)
    calls = [ToolCallStream(reply.tools.call_format) for _ in range(reply.n)] if reply.tools else None
    is_delivered = False  # False in `finally`: the client left mid-stream (the generator was cancelled)
    try:
        yield b""  # sentinel (framing.primed)
        for i in range(reply.n):  # one choice per chunk, as OpenAI streams n > 1
            yield reply.chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        async for index, output in stream:
            totals.add(index, output)
            reply.trace.on_tokens(len(output.token_ids))
            if not output.text and output.finish_reason is None and not output.logprobs:
                continue  # nothing new to say (e.g. a token held back as a possible stop-string prefix)
            logprobs = None
            if reply.num_top_logprobs is not None:
                logprobs = chat_logprobs(reply.tokenizer, output.logprobs, reply.num_top_logprobs)
            finish = output.finish_reason.value if output.finish_reason is not None else None
            delta = DeltaMessage(content=output.text)
            if calls is not None and reply.tools is not None and reply.tools.is_parsed:
                delta, finish = stream_delta(calls[index], output.text, finish)
            yield reply.chunk([ChatChunkChoice(index=index, delta=delta,
                                               logprobs=logprobs, finish_reason=finish)])  # type: ignore[arg-type]
        if include_usage:
            yield reply.chunk([], usage=totals.usage(reply.num_prompt_tokens, reply.n))
        yield SSE_DONE
        is_delivered = True
    except Exception as exc:  # the engine failed, or the drain deadline: the status is sent already, report in-band
        _, detail = describe_exception(exc)
        for i in (i for i, reason in enumerate(totals.finish_reasons) if reason is None):
            yield reply.chunk([ChatChunkChoice(index=i, delta=DeltaMessage(), finish_reason="abort")])
        yield sse_error(detail)
        yield SSE_DONE
        is_delivered = True
    finally:
        stream.close()
        elapsed_s = reply.trace.finish(is_disconnected=not is_delivered)
        log.info("%s stream ended after %.3f s: %d completion tokens, finish %s", reply.id, elapsed_s,
                 totals.completion_tokens, totals.finish_reasons)
