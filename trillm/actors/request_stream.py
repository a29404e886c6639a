"""RequestStream: one request's TokenEvents turned into detokenized CompletionOutputs, choices interleaved.

`Engine.generate` submits one sequence per choice, all sending to one channel, and hands the HTTP layer this
iterator. It runs in the request handler's task in the serving process: each choice has its own incremental
detokenizer and stop-string matcher, so detokenizing and stop matching cost the Batcher nothing. A stop string
found in a choice's text finishes that choice with `stop` (the text cut before the match) and aborts its sequence;
events that still arrive for it (the step in flight) are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attrs
import trio

from trillm.protocol.api import CompletionOutput, FinishReason
from trillm.protocol.step import TokenEvent
from trillm.actors.messages import Abort, AbortMany, BatcherInbox
from trillm.errors import EngineDeadError
from trillm.tokenizer import IncrementalDetokenizer, StopStringMatcher

log = logging.getLogger(__name__)


@attrs.define(kw_only=True)
class Choice:
    """One choice of a request: its position in the response and its text pipeline (mutable, owned by the stream)."""

    index: int
    detokenizer: IncrementalDetokenizer
    stop: StopStringMatcher
    num_output_tokens: int = 0
    is_finished: bool = False


class RequestStream:
    """Engine.generate's iterator: one request's TokenEvents → detokenized CompletionOutputs, choices interleaved.

    Each choice is one sequence. A stop string found in a choice's text finishes it with `stop` (text cut before the
    match) and aborts its sequence; events that still arrive for it are dropped.
    """

    def __init__(
        self,
        receive: trio.MemoryReceiveChannel[TokenEvent],
        choices: dict[int, Choice],
        *,
        num_history_tokens: int,
        send: Callable[[BatcherInbox], Any],
        send_nowait: Callable[[BatcherInbox], None],
        failure: Callable[[], str | None],
    ) -> None:
        self._receive = receive
        self._choices = choices  # seq id → choice
        self._num_history_tokens = num_history_tokens
        self._send = send
        self._send_nowait = send_nowait
        self._failure = failure
        self._held: TokenEvent | None = None  # taken from the channel while coalescing, for another sequence
        self._is_aborted = False  # abort_nowait ran: its Aborts are sent, a second call sends nothing

    @property
    def unfinished_seq_ids(self) -> list[int]:
        return [seq_id for seq_id, choice in self._choices.items() if not choice.is_finished]

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> CompletionOutput:
        while self.unfinished_seq_ids:
            if self._held is not None:
                event, self._held = self._held, None
            else:
                try:
                    event = await self._receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    raise EngineDeadError(self._failure() or "the engine stopped") from None
            event = self._coalesce(event)
            if event.error is not None:
                raise EngineDeadError(self._failure() or event.error)
            output = self._on_event(event)
            if output is None:
                continue
            if output.finish_reason is FinishReason.STOP and event.finish_reason is None:
                await self._send(Abort(seq_id=event.seq_id, reason=FinishReason.STOP))  # a stop string matched
            return output
        raise StopAsyncIteration

    async def abort(self) -> None:
        """Abort every unfinished sequence; their final events (finish_reason `abort`) still come through."""
        for seq_id in self.unfinished_seq_ids:
            try:
                await self._send(Abort(seq_id=seq_id))
            except EngineDeadError:
                return  # nothing runs any more: the stream itself reports the failure

    def abort_nowait(self, batch: list[int] | None = None) -> None:
        """Abort what is unfinished without waiting (once: a later call, e.g. on leaving the context, is a no-op).

        With `batch`, the seq ids are added to it instead, for `send_batch_nowait` (AbortableOutputs).
        """
        if self._is_aborted:
            return
        self._is_aborted = True
        seq_ids = self.unfinished_seq_ids
        if batch is not None:
            batch.extend(seq_ids)
        elif seq_ids:
            self.send_batch_nowait(seq_ids)

    def send_batch_nowait(self, batch: list[int]) -> None:
        """Abort these sequences (of any stream of this engine) with one message: they stop at the same step."""
        try:
            self._send_nowait(AbortMany(seq_ids=tuple(batch)))
        except EngineDeadError:
            pass  # nothing runs any more: the stream itself reports the failure

    def _coalesce(self, event: TokenEvent) -> TokenEvent:
        """`event` merged with the events of the same sequence already waiting behind it (never waits).

        When the consumer keeps up, each step's token is its own output. When it falls behind (a client, or the
        serving loop, slower than the engine), the tokens that piled up go out as one output — one SSE chunk and one
        socket write instead of one per token — so the per-token cost of the HTTP path shrinks exactly when it limits.
        """
        merged = [event]  # the usual case is one event: no lists are built unless a second one is waiting
        while merged[-1].finish_reason is None and merged[-1].error is None:
            try:
                following = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if following.seq_id != event.seq_id or following.error is not None:
                self._held = following
                break
            merged.append(following)
        if len(merged) == 1:
            return event
        token_ids = tuple(token_id for e in merged for token_id in e.token_ids)
        logprobs = tuple(entry for e in merged for entry in e.logprobs)
        return attrs.evolve(merged[-1], token_ids=token_ids, logprobs=logprobs,
                            prompt_logprobs=merged[0].prompt_logprobs)  # only a first event carries them

    def _on_event(self, event: TokenEvent) -> CompletionOutput | None:
        choice = self._choices.get(event.seq_id)
        if choice is None or choice.is_finished:
            return None
        choice.num_output_tokens += len(event.token_ids)
        text, is_matched = choice.stop.push(choice.detokenizer.push(event.token_ids))
        finish_reason = FinishReason.STOP if is_matched else event.finish_reason
        if finish_reason is not None and not is_matched:
            tail, is_matched = choice.stop.push(choice.detokenizer.flush())
            text += tail
            if is_matched:
                finish_reason = FinishReason.STOP
            else:
                text += choice.stop.flush()
        choice.is_finished = finish_reason is not None
        return CompletionOutput(
            index=choice.index,
            text=text,
            token_ids=event.token_ids,
            logprobs=event.logprobs,
            finish_reason=finish_reason,
            num_prompt_tokens=event.num_prompt_tokens,
            num_output_tokens=choice.num_output_tokens,
            num_cached_tokens=event.num_cached_tokens,
            num_history_tokens=self._num_history_tokens,
            prompt_logprobs=event.prompt_logprobs,
        )
