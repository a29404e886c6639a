"""SessionActor: one interactive session — its turns, one at a time, and its message and token history.

A session (API.md, /v1/chat/interactive) keeps the tokens of every earlier turn — prompt and answer — and the
Batcher keeps their KV parked under the session id between turns (`keep_kv`), so a turn prefills only its new text.
The chat template's system prompt and BOS come only with the first turn (`Tokenizer.encode_chat`); later turns
append `Tokenizer.render_session_turn`, which bridges from the previous answer's last token to the new generation
prompt.

A turn runs in the task of the request that asked for it (its lifetime is that client's), so the session needs no
task of its own: it serializes turns with a busy flag (a second concurrent turn is a SessionBusyError, 409) and
everything else — cancel, end — acts on the running turn's stream. All of this happens on the one Trio thread, so
the state below is only ever touched between awaits; the comments at each await say what may change across it.

History rules (API.md semantics 4-6):
- `history_tokens` of a turn is the token count held before it; after an interactive turn the history grows by the
  turn's new prompt tokens plus every answer token the turn delivered — also when it was cancelled or its client
  left (partial output stays in the history; KV computed for tokens that never reached the history is simply not
  reused, see Scheduler).
- A turn whose prompt does not fit in the window leaves no room to answer: ContextLengthExceededError telling the
  client to end the session. A turn that fits but runs out of room ends with `length`.
- `interactive_mode=False` answers the turn and then ends the session.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import trio

from trillm.protocol.api import CompletionOutput, GenerateRequest, InteractiveTurn
from trillm.actors.messages import ReleaseSession
from trillm.errors import EngineDeadError, SessionBusyError
from trillm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FULL_SESSION_HINT = (
    "The session's history fills the context window: end this session (send its session_id with prompt \"\", "
    "request_output_len 0 and interactive_mode false), or start a new one with session_id -1."
)
LONG_FIRST_TURN_HINT = "The prompt alone is longer than the window allows: shorten it (no session was created)."
OFF_LOOP_CHARS = 16 << 10  # turns with more text than this are tokenized in a worker thread
RELEASE_TIMEOUT_S = 5.0  # bound on the shielded send of ReleaseSession when a turn ends


class TurnStream(Protocol):
    """What a turn reads: the Engine's per-request output stream, which can abort its sequences."""

    def __aiter__(self) -> AsyncIterator[CompletionOutput]: ...

    async def __anext__(self) -> CompletionOutput: ...

    async def abort(self) -> None: ...


OpenRequest = Callable[..., AbstractAsyncContextManager[TurnStream]]  # (request, *, num_history_tokens, hint)
SendControl = Callable[[ReleaseSession], Awaitable[None]]


class _RecordingStream:
    """Passes a turn's outputs through while recording its answer tokens and text for the history."""

    def __init__(self, stream: TurnStream) -> None:
        self._stream = stream
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.is_finished = False  # the answer ended (finish_reason seen); False: cancelled, or its client left

    def __aiter__(self) -> _RecordingStream:
        return self

    async def __anext__(self) -> CompletionOutput:
        output = await self._stream.__anext__()
        self.token_ids += output.token_ids
        self.text.append(output.text)
        self.is_finished = self.is_finished or output.finish_reason is not None
        return output


class SessionActor:
    """The history and turn-taking of one interactive session."""

    def __init__(
        self,
        session_id: int,
        *,
        tokenizer: Tokenizer,
        open_request: OpenRequest,
        send_control: SendControl,
        on_end: Callable[[SessionActor], None],
    ) -> None:
        self.session_id = session_id
        self._tokenizer = tokenizer
        self._open_request = open_request
        self._send_control = send_control
        self._on_end = on_end
        self._messages: list[dict[str, Any]] = []
        self._token_ids: list[int] = []
        self._last_output_ids: tuple[int, ...] = ()
        self._stream: TurnStream | None = None
        self._is_busy = False
        self._is_ended = False
        self.last_active_s = trio.current_time()  # the start or end of its latest turn (Engine's idle expiry)

    @property
    def is_busy(self) -> bool:
        return self._is_busy

    @property
    def num_history_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def has_history(self) -> bool:
        return bool(self._token_ids)

    @asynccontextmanager
    async def turn(self, turn: InteractiveTurn) -> AsyncIterator[AsyncIterator[CompletionOutput]]:
        """Run one turn; yields its outputs (num_history_tokens set) and records the history when it ends.

        Raises:
            SessionBusyError: another turn of this session is running.
            ContextLengthExceededError: history + the new prompt leave no room in the window.
            InvalidRequestError: the messages or the chat template reject this turn.
        """
        assert turn.session_id == self.session_id
        if self._is_busy:
            raise SessionBusyError(self.session_id)
        prompt = turn.prompt
        new_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        interactive_mode = turn.interactive_mode
        self._is_busy = True  # from here until the finally below, a second turn is refused
        self.last_active_s = trio.current_time()
        recorder: _RecordingStream | None = None
        try:
            size = sum(len(str(message.get("content") or "")) for message in new_messages)
            if size > OFF_LOOP_CHARS:  # a long prompt is tokenized in a thread (Tokenizer.encode frees the GIL)
                new_ids = await trio.to_thread.run_sync(self._encode_turn, new_messages)  # `end` may run meanwhile
            else:
                new_ids = self._encode_turn(new_messages)
            prompt_ids = (*self._token_ids, *new_ids)
            request = GenerateRequest(
                request_id=turn.request_id,
                prompt_token_ids=prompt_ids,
                sampling=turn.sampling,
                stop=turn.stop,
                skip_special_tokens=turn.skip_special_tokens,
                spaces_between_special_tokens=turn.spaces_between_special_tokens,
                session_id=self.session_id,
                keep_kv=interactive_mode,
            )
            # The Engine's admission check refuses a turn that leaves no room, with a hint to end the session.
            hint = FULL_SESSION_HINT if self._token_ids else LONG_FIRST_TURN_HINT
            async with self._open_request(request, num_history_tokens=len(self._token_ids), hint=hint) as stream:
                # The Submit reached the Batcher during that await; `end` may have run meanwhile.
                self._stream = stream
                recorder = _RecordingStream(stream)
                if self._is_ended:
                    await stream.abort()
                yield recorder
        finally:
            self._stream = None
            self._is_busy = False
            self.last_active_s = trio.current_time()
            if recorder is None and not self._is_ended:
                pass  # refused at admission (e.g. too long): the session stays as it was
            elif self._is_ended or not interactive_mode:
                await self._release()
                self._forget()
            elif recorder is not None:
                self._record(new_messages, prompt_ids, recorder)

    async def cancel(self) -> None:
        """Stop the running turn, if any; what it generated so far stays in the history."""
        if self._stream is not None:
            await self._stream.abort()

    async def end(self) -> None:
        """Cancel the running turn, free the session's KV and forget it (a later turn starts a new session)."""
        self._is_ended = True
        if self._stream is not None:
            await self._stream.abort()  # the turn's own exit releases again, after its sequence has parked
        await self._release()
        self._forget()

    def _encode_turn(self, new_messages: list[dict[str, Any]]) -> list[int]:
        if not self._token_ids:
            return self._tokenizer.encode_chat(new_messages)
        text = self._tokenizer.render_session_turn(
            self._messages, new_messages, last_output_ids=self._last_output_ids
        )
        return self._tokenizer.encode(text, add_bos=False)

    def _record(
        self, new_messages: list[dict[str, Any]], prompt_ids: tuple[int, ...], recorder: _RecordingStream
    ) -> None:
        self._token_ids = [*prompt_ids, *recorder.token_ids]
        self._last_output_ids = tuple(recorder.token_ids)
        self._messages += [*new_messages, {"role": "assistant", "content": "".join(recorder.text)}]
        if not recorder.is_finished:  # API.md: a cancelled turn's output stays; so does one whose client left
            log.info("session %d: the turn stopped before its answer ended (cancelled, or its client left); the %d "
                     "tokens it produced stay in the session's history", self.session_id, len(recorder.token_ids))
        log.debug("session %d: %d history tokens", self.session_id, len(self._token_ids))

    async def _release(self) -> None:
        """Tell the Batcher to free the session's parked KV (shielded: it runs in `finally` of a cancelled turn)."""
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT_S):
            try:
                await self._send_control(ReleaseSession(session_id=self.session_id))
            except EngineDeadError:
                pass  # no Batcher, no KV to free

    def _forget(self) -> None:
        """Drop the history and tell the Engine (which forgets this object, not whatever now has its id)."""
        self._messages, self._token_ids, self._last_output_ids = [], [], ()
        self._on_end(self)
