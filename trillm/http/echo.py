"""Echo with logprobs: a text completion's prompt tokens and their logprobs in OpenAI's legacy layout.

`/v1/completions` with `echo: true` and `logprobs: k` (how evaluation harnesses score multiple-choice answers by
log-likelihood) answers with the prompt's tokens ahead of the completion's in one `CompletionLogprobs`: the first
prompt token has `null` logprob and `null` top_logprobs (nothing predicts it), `text_offset` counts characters
from the start of the echoed prompt. The engine computes them in the prefill (`SamplingParams.prompt_logprobs`).

`max_tokens: 0` still needs that prefill: such a request runs as a one-token generation whose token is dropped
(`prompt_only`), so the answer holds the prompt alone with finish_reason `length` and 0 completion tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import attrs

from trillm.http.choices import completion_logprobs
from trillm.http.schemas import CompletionLogprobs
from trillm.protocol.api import CompletionOutput, FinishReason, GenerateRequest, TextCodec, TokenLogprob

Generate = Callable[[GenerateRequest], AbstractAsyncContextManager[AsyncIterator[CompletionOutput]]]


def prompt_logprobs_layout(tokenizer: TextCodec, prompt_ids: Sequence[int], entries: Sequence[TokenLogprob],
                           num_top: int) -> tuple[CompletionLogprobs, int]:
    """The prompt's legacy logprobs (`entries` score prompt tokens 1, 2, ...); returns it and the next text offset."""
    if not prompt_ids:
        return CompletionLogprobs(), 0
    first = tokenizer.token_text(prompt_ids[0])
    rest, offset = completion_logprobs(tokenizer, entries, num_top, len(first))
    layout = CompletionLogprobs(tokens=[first, *rest.tokens], token_logprobs=[None, *rest.token_logprobs],
                                top_logprobs=[None, *rest.top_logprobs], text_offset=[0, *rest.text_offset])
    return layout, offset


def joined(head: CompletionLogprobs, tail: CompletionLogprobs) -> CompletionLogprobs:
    """Two consecutive stretches of legacy logprobs as one (the prompt's, then the completion's)."""
    return CompletionLogprobs(tokens=head.tokens + tail.tokens,
                              token_logprobs=head.token_logprobs + tail.token_logprobs,
                              top_logprobs=head.top_logprobs + tail.top_logprobs,
                              text_offset=head.text_offset + tail.text_offset)


def prompt_only(generate: Generate, request: GenerateRequest) -> AbstractAsyncContextManager[
        AsyncIterator[CompletionOutput]]:
    """An output source for `max_tokens: 0` with prompt logprobs: one generated token per choice, dropped."""
    one_token = attrs.evolve(request, sampling=attrs.evolve(request.sampling, max_tokens=1))

    @asynccontextmanager
    async def source() -> AsyncIterator[AsyncIterator[CompletionOutput]]:
        async with generate(one_token) as outputs:

            async def stripped() -> AsyncIterator[CompletionOutput]:
                async for output in outputs:
                    finish = FinishReason.LENGTH if output.finish_reason is not None else None
                    yield attrs.evolve(output, text="", token_ids=(), logprobs=(), finish_reason=finish,
                                       num_output_tokens=0)

            yield stripped()

    return source()
