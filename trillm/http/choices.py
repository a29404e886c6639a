"""Choices: per-choice totals of streamed CompletionOutputs, and token logprobs in OpenAI's two layouts.

Chat uses `{"content": [{token, logprob, bytes, top_logprobs}]}`; text completions use the legacy parallel lists
`{tokens, token_logprobs, top_logprobs: [{text: logprob}], text_offset}`. Token text comes from
`Tokenizer.token_text`, bytes from `Tokenizer.token_bytes`. A logprob of -inf (a masked token) is sent as -9999.0,
OpenAI's convention, because JSON has no infinity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from trillm.protocol.api import CompletionOutput, TextCodec, TokenLogprob
from trillm.http.schemas import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from trillm.http.metrics import RequestTrace
    from trillm.http.streams import ChoiceStream

MASKED_LOGPROB = -9999.0


class ChoiceTotals:
    """The text, token count, logprobs and finish reason of each choice of one response so far."""

    def __init__(self, num_choices: int) -> None:
        self.texts: list[list[str]] = [[] for _ in range(num_choices)]
        self.num_output_tokens = [0] * num_choices
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(num_choices)]
        self.finish_reasons: list[str | None] = [None] * num_choices
        self.num_prompt_tokens = [0] * num_choices
        self.num_cached_tokens = [0] * num_choices
        self.prompt_logprobs: list[tuple[TokenLogprob, ...] | None] = [None] * num_choices  # echo with logprobs

    def add(self, index: int, output: CompletionOutput) -> None:
        self.texts[index].append(output.text)
        self.num_output_tokens[index] = output.num_output_tokens  # cumulative in CompletionOutput
        self.num_prompt_tokens[index] = output.num_prompt_tokens
        self.num_cached_tokens[index] = output.num_cached_tokens
        self.logprobs[index].extend(output.logprobs)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs[index] = output.prompt_logprobs
        if output.finish_reason is not None:
            self.finish_reasons[index] = output.finish_reason.value

    def text(self, index: int) -> str:
        return "".join(self.texts[index])

    @property
    def completion_tokens(self) -> int:
        return sum(self.num_output_tokens)

    def usage(self, num_prompt_tokens: int, n: int) -> Usage:
        """The response's usage: the prompt once, completions summed, cached tokens of each prompt's first choice.

        Choices are laid out prompt by prompt, `n` each; a prompt's cached count is its first choice's (the other
        choices of the same prompt usually reuse the blocks that first one computed).
        """
        completion_tokens = self.completion_tokens
        return Usage(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=num_prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.num_cached_tokens[::n])),
        )


async def collect_totals(
    stream: ChoiceStream, num_choices: int, trace: RequestTrace
) -> tuple[ChoiceTotals, float]:
    """A non-streamed response read whole: every choice's totals, and the seconds the request took.

    Output tokens are counted on `trace` as they come, and the trace is finished even when reading fails.
    """
    totals = ChoiceTotals(num_choices)
    is_delivered = False  # False in `finally` when the view was cancelled: the client left before the answer
    try:
        for index, output in await stream.collect():
            totals.add(index, output)
            trace.on_tokens(len(output.token_ids))
        is_delivered = True
    except Exception:
        is_delivered = True  # a failure is answered (an error body), not a disconnect
        raise
    finally:
        elapsed_s = trace.finish(is_disconnected=not is_delivered)
    return totals, elapsed_s


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MASKED_LOGPROB


def chat_logprobs(tokenizer: TextCodec, logprobs: Sequence[TokenLogprob], num_top: int) -> ChatLogprobs:
    """Chat layout. `num_top` = the request's top_logprobs (0: no alternatives listed)."""
    content = []
    for entry in logprobs:
        top = [
            TopLogprob(token=tokenizer.token_text(token_id), logprob=_finite(value),
                       bytes=list(tokenizer.token_bytes(token_id)))
            for token_id, value in (entry.top if num_top > 0 else ())
        ]
        content.append(ChatTokenLogprob(
            token=tokenizer.token_text(entry.token_id), logprob=_finite(entry.logprob),
            bytes=list(tokenizer.token_bytes(entry.token_id)), top_logprobs=top,
        ))
    return ChatLogprobs(content=content)


def completion_logprobs(tokenizer: TextCodec, logprobs: Sequence[TokenLogprob], num_top: int,
                        text_offset: int) -> tuple[CompletionLogprobs, int]:
    """Legacy completion layout; offsets count characters from `text_offset`. Returns it and the next offset."""
    result = CompletionLogprobs()
    for entry in logprobs:
        token = tokenizer.token_text(entry.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(_finite(entry.logprob))
        alternatives = entry.top if num_top > 0 else ()
        result.top_logprobs.append({tokenizer.token_text(t): _finite(v) for t, v in alternatives})
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result, text_offset
