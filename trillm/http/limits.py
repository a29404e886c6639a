"""RequestLimits: the per-request bounds a deployment sets (`--max-n`, `--max-prompts`, ...), checked before work.

A request over a limit gets a 400 whose message names the field, the limit and the flag that sets it (code
`limit_exceeded`). The checks run in two places, both before anything costly:

- `check_raw` on the decoded JSON, before the strict converter structures it: list lengths (prompts, stop strings,
  stop_token_ids, `n`) and the UTF-8 size of the prompt text, so that a body with a million stop strings or a 15 MB
  prompt is refused without walking it element by element or tokenizing it;
- `resolve_max_tokens` in each route, which applies `--max-new-tokens` (a cap, and the default where a request
  sets none).

The OpenAPI document states the same bounds (`published`), so a generated client knows them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import attrs

from trillm.config import ServerConfig
from trillm.errors import InvalidRequestError

log = logging.getLogger(__name__)

LIMIT_EXCEEDED = "limit_exceeded"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default, and LMDeploy's


@attrs.frozen(kw_only=True)
class RequestLimits:
    """The limits of one server (from ServerConfig); None: no limit."""

    max_new_tokens: int | None = None
    max_n: int = 128
    max_prompts: int = 256
    max_choices: int = 1024
    max_stop: int = 64
    max_stop_chars: int = 4096
    max_prompt_bytes: int = 1 << 20

    @classmethod
    def from_config(cls, config: ServerConfig) -> RequestLimits:
        return cls(**{field.name: getattr(config, field.name) for field in attrs.fields(cls)})


def limit_error(param: str, what: str, limit: int, flag: str) -> InvalidRequestError:
    """The 400 of a request over a limit: `<param>: <what>, over this server's limit of <limit> (--<flag>)`."""
    return InvalidRequestError(f"{param}: {what}, over this server's limit of {limit} (--{flag})", param=param,
                               code=LIMIT_EXCEEDED)


def texts_of(value: Any) -> Iterator[str]:
    """Every string inside a JSON value or schema object (the text a prompt or messages field carries)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from texts_of(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from texts_of(item)
    elif attrs.has(type(value)):  # a structured message
        for item in attrs.astuple(value, recurse=False):
            yield from texts_of(item)


def _utf8_size(texts: Iterator[str], limit: int) -> int:
    """The UTF-8 size of `texts`, counted only until it passes `limit` (a character is at least one byte)."""
    total = 0
    for text in texts:
        total += len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))
        if total > limit:
            break
    return total


def check_raw(data: dict[str, Any], limits: RequestLimits, prompt_field: str, *, has_prompt_list: bool) -> None:
    """The limits that need no structured body: list lengths and prompt size (`prompt_field` holds the text;
    `has_prompt_list`: it may be a list of prompts, /v1/completions).

    Raises:
        InvalidRequestError: (code limit_exceeded) the first limit the body passes.
    """
    n = data.get("n")
    n = n if type(n) in (int, float) else None  # a wrong type is the converter's to report
    if n is not None and n > limits.max_n:
        raise limit_error("n", f"n is {n:g}", limits.max_n, "max-n")
    prompt = data.get(prompt_field)
    if has_prompt_list and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) > limits.max_prompts:
            raise limit_error("prompt", f"{len(prompt)} prompts", limits.max_prompts, "max-prompts")
        if n is not None and len(prompt) * n > limits.max_choices:
            raise limit_error("n", f"{len(prompt)} prompts x n={n:g} = {len(prompt) * n:g} choices",
                              limits.max_choices, "max-choices")
    stop = data.get("stop")
    if isinstance(stop, list) and len(stop) > limits.max_stop:
        raise limit_error("stop", f"{len(stop)} stop strings", limits.max_stop, "max-stop")
    stop_ids = data.get("stop_token_ids")
    if isinstance(stop_ids, list) and len(stop_ids) > limits.max_stop:
        raise limit_error("stop_token_ids", f"{len(stop_ids)} stop token ids", limits.max_stop, "max-stop")
    stop_chars = sum(len(s) for s in ([stop] if isinstance(stop, str) else stop or []) if isinstance(s, str))
    if stop_chars > limits.max_stop_chars:
        raise limit_error("stop", f"the stop strings hold {stop_chars} characters", limits.max_stop_chars,
                          "max-stop-chars")
    size = _utf8_size(texts_of(prompt), limits.max_prompt_bytes)
    if size > limits.max_prompt_bytes:
        raise limit_error(prompt_field, f"more than {limits.max_prompt_bytes} bytes of text",
                          limits.max_prompt_bytes, "max-prompt-bytes")


def resolve_max_tokens(limits: RequestLimits, *fields: tuple[str, int | None]) -> int | None:
    """The token budget to ask for: the first field set among (name, value) `fields` (OpenAI's newer name first),
    else the server's cap (None: up to the window).

    Raises:
        InvalidRequestError: the request asks for more than --max-new-tokens.
    """
    param, requested = next(((name, value) for name, value in fields if value is not None), (fields[-1][0], None))
    cap = limits.max_new_tokens
    if cap is None:
        return requested
    if requested is None:
        return cap
    if requested > cap:
        raise limit_error(param, f"{param} is {requested}", cap, "max-new-tokens")
    return requested


Published = list[tuple[str, str, dict[str, int], frozenset[str] | None]]


def published(limits: RequestLimits) -> Published:
    """The limits as JSON Schema keywords: (schema, property, keywords, item types) for openapi.py to add.

    Keywords go on the property, or, where it is a union (`anyOf`), on its array members; `item types`, when set,
    restricts them to arrays of those item types (a list of prompts, not a token-id prompt).
    """
    result: Published = []
    for schema in ("ChatCompletionRequest", "CompletionRequest"):
        result += [(schema, "n", {"maximum": limits.max_n}, None),
                   (schema, "stop", {"maxItems": limits.max_stop}, None),
                   (schema, "stop_token_ids", {"maxItems": limits.max_stop}, None)]
        if limits.max_new_tokens is not None:
            result += [(schema, name, {"maximum": limits.max_new_tokens}, None)
                       for name in ("max_tokens", "max_completion_tokens")]
    result.append(("CompletionRequest", "prompt", {"maxItems": limits.max_prompts}, frozenset({"string", "array"})))
    result.append(("InteractiveRequest", "stop", {"maxItems": limits.max_stop}, None))
    if limits.max_new_tokens is not None:
        result.append(("InteractiveRequest", "request_output_len", {"maximum": limits.max_new_tokens}, None))
    return result
