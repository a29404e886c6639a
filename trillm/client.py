"""APIClient: a synchronous Python client for a trillm (or LMDeploy) api_server.

The method names, parameters and defaults are those of LMDeploy's `APIClient` (v0.9), so scripts written for it run
against trillm with only the import changed. Differences, all on purpose:

- extra keyword arguments are sent as top-level JSON fields (LMDeploy nests them under `"kwargs"`, which no server
  reads), and parameters left at `None` are not sent at all, so the server's own defaults apply;
- every failure raises one exception type, `APIError`: an HTTP error status (carrying the server's OpenAI error
  object), an error event inside a stream, a body that is not JSON, or a server that cannot be reached;
- `chat` logs a warning instead of printing one when a session runs out of room.

Chat and text completions stream as SSE (`data: <json>` lines, `data: [DONE]` last); `/v1/chat/interactive` streams
newline-delimited JSON. Non-streaming calls yield their one response dict. This module imports neither torch nor
trio: `import trillm` must stay light for client-only users.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from collections.abc import Iterator
from typing import Any

import httpx

log = logging.getLogger(__name__)

# Generation can take minutes before the first byte of a non-streaming answer: only connecting is bounded.
TIMEOUT = httpx.Timeout(None, connect=30.0)
SSE_PREFIX = "data:"
SSE_DONE = "[DONE]"


class APIError(Exception):
    """A request to the server failed.

    Attributes:
        status_code: the HTTP status, or None when no HTTP answer came (server down, error inside a stream).
        error: the server's OpenAI error object (`{"message", "type", "param", "code"}`), or None.
    """

    def __init__(self, message: str, *, status_code: int | None = None,
                 error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error = error


class APIClient:
    """A client of one api_server, with LMDeploy's `APIClient` methods.

    Args:
        api_server_url: the server's address, e.g. `http://localhost:23333`.
        api_key: sent as `Authorization: Bearer <api_key>` when given.
    """

    def __init__(self, api_server_url: str, api_key: str | None = None, **kwargs: Any) -> None:
        self.api_server_url = api_server_url.rstrip("/")
        self.api_key = api_key
        self.headers = {"content-type": "application/json"}
        if api_key is not None:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._available_models: list[str] | None = None
        self._open_sessions: set[int] = set()  # sessions with a kept turn: their next turns send x-session-continue
        self._http = httpx.Client(base_url=self.api_server_url, headers=self.headers, timeout=TIMEOUT)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> APIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def available_models(self) -> list[str]:
        """The ids of the served models (`GET /v1/models`), fetched once and cached.

        Raises:
            APIError: the request failed.
        """
        if self._available_models is None:
            body = self._get_json("/v1/models")
            self._available_models = [card["id"] for card in body.get("data", [])]
        return self._available_models

    def encode(self, input: str | list[str], do_preprocess: bool = False,
               add_bos: bool = True) -> tuple[list[int] | list[list[int]], int | list[int]]:
        """Tokenize text on the server (`POST /v1/encode`).

        Args:
            input: a string or a list of strings.
            do_preprocess: apply the chat template first.
            add_bos: prepend the BOS token (True at the start of a conversation).

        Returns:
            `(input_ids, length)`, each a list per input when `input` is a list.

        Raises:
            APIError: the request failed.
        """
        body = self._post_json("/v1/encode", {"input": input, "do_preprocess": do_preprocess, "add_bos": add_bos})
        return body["input_ids"], body["length"]

    def chat_completions_v1(self, model: str, messages: str | list[dict[str, Any]], temperature: float | None = 0.7,
                            top_p: float | None = 1.0, logprobs: bool | None = False, top_logprobs: int | None = 0,
                            n: int | None = 1, max_completion_tokens: int | None = None,
                            max_tokens: int | None = None, stop: str | list[str] | None = None,
                            stream: bool | None = False, presence_penalty: float | None = 0.0,
                            frequency_penalty: float | None = 0.0, user: str | None = None,
                            repetition_penalty: float | None = 1.0, session_id: int | None = -1,
                            ignore_eos: bool | None = False, skip_special_tokens: bool | None = True,
                            spaces_between_special_tokens: bool | None = True, top_k: int | None = 40,
                            min_new_tokens: int | None = None, min_p: float | None = 0.0,
                            logit_bias: dict[str, float] | None = None, stream_options: dict[str, Any] | None = None,
                            **kwargs: Any) -> Iterator[dict[str, Any]]:
        """OpenAI chat completion (`POST /v1/chat/completions`).

        Args:
            model: a model id from `available_models`.
            messages: OpenAI messages (`[{"role": "user", "content": "hi"}]`); a string is one user turn.
            temperature: sampling temperature.
            top_p: nucleus sampling mass.
            logprobs: return the sampled tokens' log-probabilities.
            top_logprobs: how many alternatives to list per token with `logprobs`.
            n: number of choices.
            max_completion_tokens: output token limit (OpenAI's newer name).
            max_tokens: output token limit; None means up to the context window.
            stop: stop string(s); the text is cut before them.
            stream: yield SSE chunks as they come instead of one response.
            presence_penalty: OpenAI presence penalty.
            frequency_penalty: OpenAI frequency penalty.
            user: an end-user id.
            repetition_penalty: 1.0 means no penalty.
            session_id: -1 for none.
            ignore_eos: keep generating after EOS.
            skip_special_tokens: leave special tokens out of the text.
            spaces_between_special_tokens: put spaces around special tokens when decoding.
            top_k: top-k sampling.
            min_new_tokens: generate at least this many tokens.
            min_p: min-p sampling.
            logit_bias: token id → bias.
            stream_options: e.g. `{"include_usage": True}` with `stream`.
            **kwargs: more request fields, sent as top-level JSON fields (e.g. `seed`, `response_format`).

        Yields:
            The response dict, or each chunk dict when streaming.

        Raises:
            APIError: the request failed or the stream carried an error.
        """
        payload = _payload(locals(), kwargs)
        yield from self._post("/v1/chat/completions", payload, stream=bool(stream), sse=True)

    def completions_v1(self, model: str, prompt: str | list[Any], suffix: str | None = None,
                       temperature: float | None = 0.7, n: int | None = 1, max_completion_tokens: int | None = None,
                       max_tokens: int | None = 16, stream: bool | None = False, stop: str | list[str] | None = None,
                       top_p: float | None = 1.0, top_k: int | None = 40, user: str | None = None,
                       repetition_penalty: float | None = 1.0, session_id: int | None = -1,
                       ignore_eos: bool | None = False, skip_special_tokens: bool | None = True,
                       spaces_between_special_tokens: bool | None = True, stream_options: dict[str, Any] | None = None,
                       **kwargs: Any) -> Iterator[dict[str, Any]]:
        """OpenAI text completion (`POST /v1/completions`).

        Args:
            model: a model id from `available_models`.
            prompt: a string, a list of strings, a list of token ids or a list of such lists.
            suffix: text after the completion (not sent when None).
            temperature: sampling temperature.
            n: number of choices per prompt.
            max_completion_tokens: output token limit (not sent when None).
            max_tokens: output token limit.
            stream: yield SSE chunks as they come instead of one response.
            stop: stop string(s); the text is cut before them.
            top_p: nucleus sampling mass.
            top_k: top-k sampling.
            user: an end-user id.
            repetition_penalty: 1.0 means no penalty.
            session_id: -1 for none.
            ignore_eos: keep generating after EOS.
            skip_special_tokens: leave special tokens out of the text.
            spaces_between_special_tokens: put spaces around special tokens when decoding.
            stream_options: e.g. `{"include_usage": True}` with `stream`.
            **kwargs: more request fields, sent as top-level JSON fields (e.g. `echo`, `logprobs`, `seed`).

        Yields:
            The response dict, or each chunk dict when streaming.

        Raises:
            APIError: the request failed or the stream carried an error.
        """
        payload = _payload(locals(), kwargs)
        yield from self._post("/v1/completions", payload, stream=bool(stream), sse=True)

    def chat_interactive_v1(self, prompt: str | list[dict[str, Any]], image_url: str | list[str] | None = None,
                            session_id: int = -1, interactive_mode: bool = False, stream: bool = False,
                            stop: str | list[str] | None = None, request_output_len: int | None = None,
                            top_p: float = 0.8, top_k: int = 40, temperature: float = 0.8,
                            repetition_penalty: float = 1.0, ignore_eos: bool = False,
                            skip_special_tokens: bool | None = True, adapter_name: str | None = None,
                            **kwargs: Any) -> Iterator[dict[str, Any]]:
        """One turn of an LMDeploy interactive session (`POST /v1/chat/interactive`).

        With `interactive_mode=True` the server keeps the session's history (and its KV cache) for the next turn
        with the same `session_id`; with False it answers and ends the session.

        Args:
            prompt: one user turn, or a list of OpenAI messages.
            image_url: an image URL or a list of them (not sent when None; this server serves text models).
            session_id: the session; -1 lets the server assign one (returned as `session_id`).
            interactive_mode: keep the session after this turn.
            stream: yield one dict per NDJSON line as it comes (`text` is the delta).
            stop: stop string(s).
            request_output_len: output token limit; None means up to the window.
            top_p: nucleus sampling mass.
            top_k: top-k sampling.
            temperature: sampling temperature.
            repetition_penalty: 1.0 means no penalty.
            ignore_eos: keep generating after EOS.
            skip_special_tokens: leave special tokens out of the text.
            adapter_name: a LoRA adapter (not sent when None).
            **kwargs: more request fields, sent as top-level JSON fields (e.g. `seed`, `cancel`).

        Yields:
            Dicts with `text`, `tokens`, `input_tokens`, `history_tokens`, `finish_reason` and `session_id`.

        Raises:
            APIError: the request failed or the stream carried an error.
        """
        payload = _payload(locals(), kwargs)
        headers = {}
        if session_id != -1:
            headers["x-session-id"] = str(session_id)  # for load balancers that route sessions by header
            if session_id in self._open_sessions and not _ends_session(payload):
                headers["x-session-continue"] = "true"  # an unknown session is then a 404, never a silent new one
        for chunk in self._post("/v1/chat/interactive", payload, stream=stream, sse=False, headers=headers):
            if interactive_mode and isinstance(chunk.get("session_id"), int) and chunk["session_id"] != -1:
                self._open_sessions.add(chunk["session_id"])
            yield chunk
        if not interactive_mode and session_id != -1:
            self._open_sessions.discard(session_id)

    def chat(self, prompt: str, session_id: int, image_url: str | list[str] | None = None,
             request_output_len: int | None = None, stream: bool = False, top_p: float = 0.8, top_k: int = 40,
             temperature: float = 0.8, repetition_penalty: float = 1.0,
             ignore_eos: bool = False) -> Iterator[tuple[str, int, str | None]]:
        """One turn of an interactive session that the server keeps (LMDeploy's `chat`).

        Args:
            prompt: the user turn.
            session_id: the session; must not be -1.
            image_url: an image URL or a list of them.
            request_output_len: output token limit; None means up to the window.
            stream: yield each delta as it comes.
            top_p: nucleus sampling mass.
            top_k: top-k sampling.
            temperature: sampling temperature.
            repetition_penalty: 1.0 means no penalty.
            ignore_eos: keep generating after EOS.

        Yields:
            `(text, tokens, finish_reason)` tuples, as LMDeploy's `chat` does.

        Raises:
            ValueError: session_id is -1.
            APIError: the request failed.
        """
        if session_id == -1:
            raise ValueError("session_id must not be -1: chat keeps a session, so it needs an id")
        for output in self.chat_interactive_v1(prompt, image_url=image_url, session_id=session_id,
                                               interactive_mode=True, stream=stream,
                                               request_output_len=request_output_len, top_p=top_p, top_k=top_k,
                                               temperature=temperature, repetition_penalty=repetition_penalty,
                                               ignore_eos=ignore_eos):
            if output["finish_reason"] == "length":
                log.warning("session %d ran out of room; end it with end_session", session_id)
            yield output["text"], output["tokens"], output["finish_reason"]

    def end_session(self, session_id: int) -> None:
        """End an interactive session on the server, cancelling its running turn if any.

        Args:
            session_id: the session to end.

        Raises:
            APIError: the request failed.
        """
        for _ in self.chat_interactive_v1(prompt="", session_id=session_id, request_output_len=0,
                                          interactive_mode=False):
            pass

    # -- transport --

    def _get_json(self, path: str) -> dict[str, Any]:
        try:
            response = self._http.get(path)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        _raise_for_status(response, response.content)
        return _json_object(response.text)

    def _post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return next(self._post(path, payload, stream=False, sse=False))

    def _post(self, path: str, payload: dict[str, Any], *, stream: bool, sse: bool,
              headers: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
        """POST `payload`; yield the one JSON body, or each SSE event / NDJSON line of a stream."""
        log.debug("POST %s%s stream=%s", self.api_server_url, path, stream)
        try:
            with self._http.stream("POST", path, json=payload, headers=headers) as response:
                if response.status_code >= 400:
                    _raise_for_status(response, response.read())
                if not stream:
                    yield _json_object(response.read().decode())
                    return
                for line in response.iter_lines():
                    chunk = _stream_line(line, sse=sse)
                    if chunk is not None:
                        yield chunk
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: httpx.TransportError) -> APIError:
        return APIError(f"cannot reach the server at {self.api_server_url}: {exc}")


def _ends_session(payload: dict[str, Any]) -> bool:
    """A cancel, or LMDeploy's end-of-session form (empty prompt, no tokens, not interactive): fine for any id."""
    return bool(payload.get("cancel")) or (payload.get("prompt") == "" and payload.get("request_output_len") == 0)


def _payload(arguments: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The request body: a method's arguments and extra keyword arguments, leaving out None (the server's default)."""
    fields = {k: v for k, v in arguments.items() if k not in ("self", "kwargs")}
    fields.update(extra)
    return {k: v for k, v in fields.items() if v is not None}


def _stream_line(line: str, *, sse: bool) -> dict[str, Any] | None:
    """One streamed line as a dict; None for blank lines, SSE comments and `[DONE]`."""
    line = line.strip()
    if sse:
        if not line.startswith(SSE_PREFIX):
            return None  # blank separator, comment or another SSE field
        line = line[len(SSE_PREFIX):].strip()
        if line == SSE_DONE:
            return None
    if not line:
        return None
    chunk = _json_object(line)
    if isinstance(chunk.get("error"), dict):
        error = chunk["error"]
        raise APIError(f"the server reported an error mid-stream: {error.get('message')}", error=error)
    return chunk


def _raise_for_status(response: httpx.Response, body: bytes) -> None:
    if response.status_code < 400:
        return
    error: dict[str, Any] | None = None
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error = parsed["error"]
    detail = error.get("message") if error is not None else body.decode(errors="replace")[:500]
    raise APIError(f"{response.status_code} {_phrase(response.status_code)} from {response.request.url}: {detail}",
                   status_code=response.status_code, error=error)


def _phrase(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "error"


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise APIError(f"the server sent a body that is not JSON: {text[:200]!r}") from exc
    if not isinstance(value, dict):
        raise APIError(f"the server sent JSON that is not an object: {text[:200]!r}")
    return value
