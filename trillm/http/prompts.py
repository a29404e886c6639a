"""Request translation: validated HTTP request objects → the Engine's prompt token ids and SamplingParams.

Checks that need the vocabulary live here (token ids below its size); whether a prompt fits the window is the
Engine's admission check (`Engine._admit`), the one place that rule lives.
Unset sampling values come from the model's generation_config.json (`Tokenizer.generation_defaults`), else from
OpenAI's defaults (temperature 1, top_p 1, top_k off, min_p off, repetition_penalty 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import trio

from trillm.protocol.api import GenerateRequest, SamplingParams, TextCodec
from trillm.errors import InvalidRequestError
from trillm.http.tools import history_tool_calls, tool_dicts
from trillm.http.limits import texts_of
from trillm.http.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, InteractiveRequest, SamplingFields

log = logging.getLogger(__name__)

OPENAI_DEFAULTS: Mapping[str, float | int] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
}
TOKEN_ID_OUT_OF_VOCAB = "token_id_out_of_vocab"  # the error code of a token id past the model's vocabulary
OFF_LOOP_CHARS = 16 << 10  # prompts longer than this are rendered and tokenized in a worker thread
T = TypeVar("T")


def prompt_size(value: Any) -> int:
    """Characters of text in a prompt, messages or input field (strings at any depth)."""
    return sum(len(text) for text in texts_of(value))


async def off_loop(function: Callable[..., T], *args: Any, size: int) -> T:
    """`function(*args)`, in a worker thread when `size` (characters of text) is large.

    Tokenizing a long prompt takes about a second per megabyte; `Tokenizer.encode` releases the GIL for long texts,
    so the event loop keeps serving other requests meanwhile. Short prompts stay on the loop (a thread hop costs more
    than they do).
    """
    if size <= OFF_LOOP_CHARS:
        return function(*args)
    return await trio.to_thread.run_sync(partial(function, *args))


def message_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the plain dicts a chat template expects; text parts are joined with newlines."""
    result = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls:  # the arguments as objects, as chat templates expect them
            entry["tool_calls"] = history_tool_calls(message.tool_calls)
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    return result


def chat_prompt_ids(tokenizer: TextCodec, request: ChatCompletionRequest) -> tuple[int, ...]:
    """The prompt of a chat request: the chat template over the messages, or their bare text (do_preprocess false).

    Raises:
        InvalidRequestError: the chat template rejects the messages (e.g. roles out of order).
    """
    messages = request.messages
    if not request.do_preprocess:
        text = messages if isinstance(messages, str) else "".join(m["content"] for m in message_dicts(messages))
        return tuple(tokenizer.encode(text, add_bos=True))
    if isinstance(messages, str):
        return tuple(tokenizer.encode_chat([{"role": "user", "content": messages}]))
    return tuple(tokenizer.encode_chat(message_dicts(messages), tools=tool_dicts(request.tools)))


def completion_prompts(tokenizer: TextCodec, request: CompletionRequest) -> list[tuple[int, ...]]:
    """The prompts of a text completion request as token ids, one entry per prompt.

    Raises:
        InvalidRequestError: a token id is outside the vocabulary.
    """
    prompt = request.prompt
    if isinstance(prompt, str):
        return [tuple(tokenizer.encode(prompt, add_bos=True))]
    if all(isinstance(item, int) for item in prompt):
        ids = tuple(item for item in prompt if isinstance(item, int))
        check_token_ids(ids, tokenizer.vocab_size, "prompt")
        return [ids]
    prompts: list[tuple[int, ...]] = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            prompts.append(tuple(tokenizer.encode(item, add_bos=True)))
        elif isinstance(item, list):
            check_token_ids(item, tokenizer.vocab_size, f"prompt[{i}]")
            prompts.append(tuple(item))
    return prompts


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """Raises InvalidRequestError naming `param` when an id is not in [0, vocab_size)."""
    for i, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"{param}[{i}]: token id {token_id} is outside the vocabulary [0, {vocab_size})", param=param,
                code=TOKEN_ID_OUT_OF_VOCAB)


def _pick(value: float | int | None, name: str, defaults: Mapping[str, float | int]) -> Any:
    if value is not None:
        return value
    return defaults.get(name, OPENAI_DEFAULTS[name])


def sampling_params(request: SamplingFields, defaults: Mapping[str, float | int], vocab_size: int, *,
                    max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The SamplingParams of a chat or completion request.

    Raises:
        InvalidRequestError: stop_token_ids or logit_bias name a token outside the vocabulary.
    """
    top_k = _pick(request.top_k, "top_k", defaults)
    stop_token_ids = tuple(request.stop_token_ids or ())
    check_token_ids(stop_token_ids, vocab_size, "stop_token_ids")
    logit_bias = tuple((int(key), float(bias)) for key, bias in (request.logit_bias or {}).items())
    check_token_ids([token_id for token_id, _ in logit_bias], vocab_size, "logit_bias")
    return _build(
        temperature=float(_pick(request.temperature, "temperature", defaults)),
        top_p=float(_pick(request.top_p, "top_p", defaults)),
        top_k=max(int(top_k), 0),  # -1 (vLLM's "off") and 0 both mean off
        min_p=float(_pick(request.min_p, "min_p", defaults)),
        repetition_penalty=float(_pick(request.repetition_penalty, "repetition_penalty", defaults)),
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=logit_bias,
        seed=request.seed,
        max_tokens=max_tokens,
        min_tokens=request.min_new_tokens if request.min_new_tokens is not None else request.min_tokens,
        stop_token_ids=stop_token_ids,
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
    )


def interactive_sampling(request: InteractiveRequest, max_tokens: int | None) -> SamplingParams:
    """The SamplingParams of an interactive turn (its defaults are LMDeploy's: 0.8 / 0.8 / 40); `max_tokens` is
    request_output_len with the server's cap applied."""
    return _build(
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=max(request.top_k, 0),
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
        seed=request.seed,
        max_tokens=max_tokens,
        min_tokens=request.min_new_tokens or 0,
        ignore_eos=request.ignore_eos,
    )


def _build(**fields: Any) -> SamplingParams:
    try:
        return SamplingParams(**fields)
    except ValueError as exc:  # bounds the schema did not catch, e.g. a bad generation_config default
        raise InvalidRequestError(str(exc)) from None


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def generate_request(request: SamplingFields, *, request_id: str, prompt_ids: tuple[int, ...],
                     sampling: SamplingParams, prompt_field: str = "prompt", share_key: str = "") -> GenerateRequest:
    """The GenerateRequest of one prompt of a chat or completion request."""
    session_id = request.session_id if request.session_id not in (None, -1) else None
    return GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        sampling=sampling,
        n=request.n,
        stop=stop_strings(request.stop),
        skip_special_tokens=request.skip_special_tokens,
        spaces_between_special_tokens=request.spaces_between_special_tokens,
        session_id=session_id,
        prompt_field=prompt_field,
        share_key=share_key,
    )
