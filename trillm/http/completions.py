"""Text completions: POST /v1/completions, as one JSON answer or an SSE stream.

A list of prompts gives one Engine request per prompt and `len(prompts) * n` choices (choice index = prompt index
* n + i), all admitted before the response starts. `echo` prepends the prompt text (decoded for token-id prompts).
`max_tokens: 0` answers at once with finish_reason `length` and no engine work, unless `echo` with `logprobs` asks
for the prompt's logprobs (`echo.py`: a prefill whose one sampled token is dropped).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
from quart import Blueprint, Response

from trillm.protocol.api import CompletionOutput, FinishReason, TokenLogprob
from trillm.http.choices import ChoiceTotals, collect_totals, completion_logprobs
from trillm.http.echo import joined, prompt_logprobs_layout, prompt_only
from trillm.http.errors import describe_exception
from trillm.http.framing import SSE_DONE, sse_error, sse_event, streaming_response
from trillm.http.metrics import RequestTrace
from trillm.http.limits import resolve_max_tokens
from trillm.http.prompts import (
    completion_prompts,
    generate_request,
    off_loop,
    prompt_size,
    sampling_params,
)
from trillm.http.schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    encode,
)
from trillm.http.state import current_state
from trillm.http.structured import request_grammar
from trillm.http.streams import ChoiceStream, OutputSource
from trillm.http.body import read_body
from trillm.http.validation import parse_request

log = logging.getLogger(__name__)

bp = Blueprint("completions", __name__)

@attrs.frozen(kw_only=True)
class _Reply:
    """What every chunk or answer of one completion request repeats."""

    id: str
    created: int
    model: str
    num_choices: int
    n: int  # choices per prompt
    num_prompt_tokens: int
    num_top_logprobs: int | None
    echo_texts: list[str]  # per choice: the text to prepend ("" without echo)
    prompt_ids: list[tuple[int, ...]]  # per prompt (choice // n)
    has_prompt_logprobs: bool  # echo with logprobs: the prompt's logprobs lead each choice's (echo.py)
    tokenizer: Any
    trace: RequestTrace


    def prompt_logprobs(self, index: int, entries: tuple[TokenLogprob, ...] | None) -> CompletionLogprobs | None:
        """Choice `index`'s prompt in the legacy logprobs layout (None unless echo with logprobs)."""
        if entries is None or self.num_top_logprobs is None:
            return None
        layout, _ = prompt_logprobs_layout(self.tokenizer, self.prompt_ids[index // self.n], entries,
                                           self.num_top_logprobs)
        return layout

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return sse_event(CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                            usage=usage))


@asynccontextmanager
async def _no_generation(n: int, num_prompt_tokens: int) -> AsyncIterator[AsyncIterator[CompletionOutput]]:
    """A source for `max_tokens: 0`: every choice ends at once with `length`."""

    async def outputs() -> AsyncIterator[CompletionOutput]:
        for i in range(n):
            yield CompletionOutput(index=i, text="", token_ids=(), finish_reason=FinishReason.LENGTH,
                                   num_prompt_tokens=num_prompt_tokens)

    yield outputs()


def _echo_texts(tokenizer: Any, body: CompletionRequest, prompts: list[tuple[int, ...]]) -> list[str]:
    if not body.echo:
        return [""] * (len(prompts) * body.n)
    if isinstance(body.prompt, str):
        texts = [body.prompt]
    elif len(prompts) == 1 and all(isinstance(item, int) for item in body.prompt):  # one token-id prompt
        texts = [tokenizer.decode(prompts[0], skip_special_tokens=False)]
    else:
        texts = [item if isinstance(item, str) else tokenizer.decode(ids, skip_special_tokens=False)
                 for item, ids in zip(body.prompt, prompts)]
    return [text for text in texts for _ in range(body.n)]


@bp.post("/v1/completions")
async def completions() -> Response:
    """OpenAI text completion (JSON or SSE)."""
    state = current_state()
    body = await parse_request(CompletionRequest, await read_body(), state.limits)
    engine = state.engine_for_request(body.model)
    tokenizer = engine.tokenizer
    prompts = await off_loop(completion_prompts, tokenizer, body, size=prompt_size(body.prompt))
    max_tokens = resolve_max_tokens(state.limits, ("max_completion_tokens", body.max_completion_tokens),
                                    ("max_tokens", body.max_tokens))
    sampling = sampling_params(body, tokenizer.generation_defaults, tokenizer.vocab_size, max_tokens=max_tokens,
                               logprobs=body.logprobs)
    has_prompt_logprobs = body.echo and body.logprobs is not None
    sampling = attrs.evolve(sampling, grammar=request_grammar(body),
                            prompt_logprobs=body.logprobs if has_prompt_logprobs else None)
    request_id = f"cmpl-{secrets.token_hex(12)}"
    reply = _Reply(id=request_id, created=int(time.time()), model=engine.model_name,
                   num_choices=len(prompts) * body.n, n=body.n, num_prompt_tokens=sum(map(len, prompts)),
                   num_top_logprobs=body.logprobs, echo_texts=_echo_texts(tokenizer, body, prompts),
                   prompt_ids=prompts, has_prompt_logprobs=has_prompt_logprobs,
                   tokenizer=tokenizer, trace=state.metrics.trace("completions", request_id))
    log.info("%s completion: %d prompt(s), %d prompt tokens, n=%d, stream=%s, %s", reply.id, len(prompts),
             reply.num_prompt_tokens, body.n, body.stream, sampling)
    log.debug("%s prompt: %s", reply.id, state.truncate_for_log(body.prompt))
    reply.trace.num_prompt_tokens = reply.num_prompt_tokens  # for the access log
    sources: list[tuple[int, OutputSource]] = []
    for p, prompt_ids in enumerate(prompts):
        if max_tokens == 0 and not has_prompt_logprobs:
            sources.append((p * body.n, partial(_no_generation, body.n, len(prompt_ids))))
            continue
        generate = generate_request(body, request_id=f"{reply.id}-{p}", prompt_ids=prompt_ids, sampling=sampling,
                                    share_key=reply.id)  # one fair share for all of its prompts
        if max_tokens == 0:  # the prompt's logprobs still need its prefill
            sources.append((p * body.n, partial(prompt_only, engine.generate, generate)))
        else:
            sources.append((p * body.n, partial(engine.generate, generate)))
    stream = await state.open_stream(sources)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return await streaming_response(_events(stream, reply, include_usage), "text/event-stream")
    totals, elapsed_s = await collect_totals(stream, reply.num_choices, reply.trace)
    log.info("%s done in %.3f s: %d completion tokens", reply.id, elapsed_s, totals.completion_tokens)
    choices = []
    for i in range(reply.num_choices):
        logprobs = None
        if reply.num_top_logprobs is not None:
            logprobs, _ = completion_logprobs(tokenizer, totals.logprobs[i], reply.num_top_logprobs,
                                              len(reply.echo_texts[i]))
            prompt_layout = reply.prompt_logprobs(i, totals.prompt_logprobs[i])
            if prompt_layout is not None:
                logprobs = joined(prompt_layout, logprobs)
        choices.append(CompletionChoice(index=i, text=reply.echo_texts[i] + totals.text(i), logprobs=logprobs,
                                        finish_reason=totals.finish_reasons[i]))  # type: ignore[arg-type]
    answer = CompletionResponse(id=reply.id, created=reply.created, model=reply.model, choices=choices,
                                usage=totals.usage(reply.num_prompt_tokens, reply.n))
    return Response(encode(answer), content_type="application/json")


async def _events(stream: ChoiceStream, reply: _Reply, include_usage: bool) -> AsyncGenerator[bytes, None]:
    totals = ChoiceTotals(reply.num_choices)
    offsets = [len(text) for text in reply.echo_texts]  # logprobs text_offset per choice
    is_delivered = False  # False in `finally`: the client left mid-stream (the generator was cancelled)
    try:
        yield b""  # sentinel (framing.primed)
        for i, text in enumerate(reply.echo_texts):  # one choice per chunk
            if text and not reply.has_prompt_logprobs:  # else with its logprobs, which come with the first output
                yield reply.chunk([CompletionChoice(index=i, text=text)])
        async for index, output in stream:
            totals.add(index, output)
            reply.trace.on_tokens(len(output.token_ids))
            prompt_layout = reply.prompt_logprobs(index, output.prompt_logprobs)
            if prompt_layout is not None:
                yield reply.chunk([CompletionChoice(index=index, text=reply.echo_texts[index], logprobs=prompt_layout)])
            if not output.text and output.finish_reason is None and not output.logprobs:
                continue
            logprobs = None
            if reply.num_top_logprobs is not None:
                logprobs, offsets[index] = completion_logprobs(reply.tokenizer, output.logprobs,
                                                               reply.num_top_logprobs, offsets[index])
            finish = output.finish_reason.value if output.finish_reason is not None else None
            yield reply.chunk([CompletionChoice(index=index, text=output.text, logprobs=logprobs,
                                                finish_reason=finish)])  # type: ignore[arg-type]
        if include_usage:
            yield reply.chunk([], usage=totals.usage(reply.num_prompt_tokens, reply.n))
        yield SSE_DONE
        is_delivered = True
    except Exception as exc:  # the engine failed, or the drain deadline: the status is sent already, report in-band
        _, detail = describe_exception(exc)
        for i in (i for i, reason in enumerate(totals.finish_reasons) if reason is None):
            yield reply.chunk([CompletionChoice(index=i, text="", finish_reason="abort")])
        yield sse_error(detail)
        yield SSE_DONE
        is_delivered = True
    finally:
        stream.close()
        elapsed_s = reply.trace.finish(is_disconnected=not is_delivered)
        log.info("%s stream ended after %.3f s: %d completion tokens", reply.id, elapsed_s, totals.completion_tokens)
