"""Request validation: a strict cattrs converter that turns a JSON body into a schema object, or one OpenAI 400.

cattrs' default converter coerces silently ("5" → 5, "false" → True, 3.9 → 3) and iterates a string as a list.
This converter accepts each JSON value only as its own type: a string is never a number or a list, a bool is never
an int, an int is accepted where a float is expected (JSON has one number type). Bounds come from the `msgspec.Meta`
in each field's `Annotated` type, so the OpenAPI document and the checks cannot drift apart.

Every problem in a body is collected (cattrs' detailed validation + `transform_error`) and reported in one
`InvalidRequestError` whose `param` is the first bad field and whose message lists all of them. Unknown keys are
ignored: clients send fields we do not implement. Checks that involve several fields follow the structuring pass
(`_cross_checks`); checks that need the model (token ids below the vocabulary size) live in `http/prompts.py`.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union

import attrs
import cattrs
import msgspec
import trio
from cattrs.cols import is_mapping, is_sequence, list_structure_factory, mapping_structure_factory
from cattrs.errors import BaseValidationError
from cattrs.gen import make_dict_structure_fn

from trillm.errors import InvalidRequestError
from trillm.http.limits import RequestLimits, check_raw
from trillm.http.schemas import ChatCompletionRequest, CompletionRequest, EncodeRequest, InteractiveRequest

log = logging.getLogger(__name__)

T = TypeVar("T")
Hook = Callable[[Any, Any], Any]
INVALID_COMBINATION = "invalid_combination"  # the 400 code of a rule between fields (`_combination_checks`)
MAX_MESSAGE_ERRORS = 20  # a body with more bad fields lists the first ones and a count
LARGE_BODY_BYTES = 1 << 20  # bodies above this are checked for their number of strings before decoding
MAX_BODY_STRINGS = 1 << 17  # about 30 ms of decoding on the event loop
STRUCTURE_SAMPLE_BYTES = 4096  # a long stretch between quotes is string text if its start is not all structure
_JSON_STRUCTURE = b"0123456789.+-eE[]{},: \t\r\nnulltruefalse"  # what JSON holds outside its strings
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a UTF-16 surrogate escape: checked after decoding
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() accepts "²", which int() refuses
_TEXT_FIELDS: dict[type, str] = {  # the field whose text the byte limit counts, per request class
    ChatCompletionRequest: "messages", CompletionRequest: "prompt", InteractiveRequest: "prompt",
    EncodeRequest: "input",
}


class FieldError(ValueError):
    """A value of the wrong type or out of range; its text is shown to the client as is."""


def _describe(value: object) -> str:
    kind = _value_kind(value)
    if kind in ("object", "array"):
        return f"an {kind}" if kind == "object" else "an array"
    text = json.dumps(value)
    return f"{kind} {text[:40] + '...' if len(text) > 40 else text}"


def _value_kind(value: object) -> str:
    """The JSON kind of a decoded value (bool before int: `True` is an int in Python)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_kinds(tp: Any) -> set[str]:
    """The JSON kinds a declared type accepts (an integer is also a valid number)."""
    if _origin(tp) is typing.Annotated:
        return _type_kinds(typing.get_args(tp)[0])
    if _is_union(tp):
        return set().union(*(_type_kinds(arg) for arg in typing.get_args(tp)))
    if _origin(tp) is Literal:
        return {_value_kind(value) for value in typing.get_args(tp)}
    simple = {type(None): {"null"}, bool: {"boolean"}, int: {"integer"}, float: {"number", "integer"},
              str: {"string"}}
    if tp in simple:
        return simple[tp]
    if is_sequence(tp):
        return {"array"}
    return {"object"}  # attrs classes and mappings


def _kind_name(tp: Any) -> str:
    names = {"null": "null", "boolean": "a boolean", "integer": "an integer", "number": "a number",
             "string": "a string", "array": "an array", "object": "an object"}
    members = typing.get_args(tp) if _is_union(tp) else (tp,)
    ordered: list[str] = []
    for member in members:  # declaration order, each kind once; a number also covers integers
        kinds = _type_kinds(member)
        for kind in ("number",) if "number" in kinds else sorted(kinds):
            if names[kind] not in ordered:
                ordered.append(names[kind])
    return ", ".join(ordered[:-1]) + (" or " if len(ordered) > 1 else "") + ordered[-1]


def _is_union(tp: Any) -> bool:
    return _origin(tp) in (Union, types.UnionType)


def _strict_scalar(tp: type) -> Hook:
    kinds = _type_kinds(tp)

    def hook(value: Any, _: Any) -> Any:
        kind = _value_kind(value)
        if kind not in kinds:
            if tp is int and kind == "number" and value.is_integer():
                return int(value)  # 5.0 is an integer in JSON Schema (and to OpenAI): the document allows it
            raise FieldError(f"expected {_kind_name(tp)}, got {_describe(value)}")
        return float(value) if tp is float else value

    return hook


def _literal_hook(tp: Any, converter: cattrs.Converter) -> Hook:
    allowed = typing.get_args(tp)

    def hook(value: Any, _: Any) -> Any:
        # `1 == True` in Python: compare kinds too, so that a boolean never matches a number literal.
        if not any(value == a and _value_kind(value) == _value_kind(a) for a in allowed):
            raise FieldError(f"expected one of {', '.join(json.dumps(a) for a in allowed)}, got {_describe(value)}")
        return value

    return hook


def _union_hook(tp: Any, converter: cattrs.Converter) -> Hook:
    """Dispatch on the JSON kind of the value: the first member that accepts that kind structures it."""
    members = [(member, _type_kinds(member)) for member in typing.get_args(tp)]  # kinds computed once per type

    def hook(value: Any, _: Any) -> Any:
        kind = _value_kind(value)
        for candidate in (kind, "integer") if kind == "number" and value.is_integer() else (kind,):
            for member, kinds in members:  # 5.0 goes to a number member first, else to an integer one
                if candidate in kinds:
                    return converter.structure(value, member)
        raise FieldError(f"expected {_kind_name(tp)}, got {_describe(value)}")

    return hook


def _annotated_hook(tp: Any, converter: cattrs.Converter) -> Hook:
    base, *extras = typing.get_args(tp)
    meta = next((m for m in extras if isinstance(m, msgspec.Meta)), msgspec.Meta())

    def hook(value: Any, _: Any) -> Any:
        result = converter.structure(value, base)
        for bound, fails, word in ((meta.ge, operator.lt, ">="), (meta.gt, operator.le, ">"),
                                   (meta.le, operator.gt, "<="), (meta.lt, operator.ge, "<")):
            if bound is not None and fails(result, bound):
                raise FieldError(f"must be {word} {bound}, got {value}")
        return result

    return hook


def _typed_container(check: type, word: str, factory: Callable[[Any, cattrs.Converter], Hook]) -> Any:
    def make(tp: Any, converter: cattrs.Converter) -> Hook:
        inner = factory(tp, converter)

        def hook(value: Any, _: Any) -> Any:
            if not isinstance(value, check):
                raise FieldError(f"expected {word}, got {_describe(value)}")
            return inner(value, tp)

        return hook

    return make


def _list_factory(tp: Any, converter: cattrs.Converter) -> Hook:
    """Lists; a list of plain ints (a token-id prompt, thousands long) is checked in one pass, not per element."""
    general = list_structure_factory(tp, converter)
    (element,) = typing.get_args(tp) or (Any,)
    if element is not int and not (_is_union(element) and int in typing.get_args(element)):
        return general  # only lists that may hold plain ints (token ids) get the one-pass check

    def hook(value: Any, _: Any) -> Any:
        if all(type(item) is int for item in value):  # bool is a subclass of int: `type(...) is` keeps it out
            return list(value)
        return general(value, tp)  # the general path names the bad element

    return hook


def _attrs_factory(tp: Any, converter: cattrs.Converter) -> Hook:
    return make_dict_structure_fn(tp, converter, _cattrs_forbid_extra_keys=False)


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def _is_list(tp: Any) -> bool:
    return bool(is_sequence(tp)) and _origin(tp) is list


def _is_plain_mapping(tp: Any) -> bool:
    return bool(is_mapping(tp)) and not attrs.has(tp)


def make_converter() -> cattrs.Converter:
    """The strict converter: exact JSON kinds, bounds from `msgspec.Meta`, every error collected."""
    converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
    for tp in (str, int, float, bool, type(None)):
        converter.register_structure_hook(tp, _strict_scalar(tp))
    factories: list[tuple[Callable[[Any], bool], Any]] = [  # registered later = tried first: specific ones last
        (attrs.has, _typed_container(dict, "an object", _attrs_factory)),
        (_is_plain_mapping, _typed_container(dict, "an object", mapping_structure_factory)),
        (_is_list, _typed_container(list, "an array", _list_factory)),
        (lambda t: _origin(t) is Literal, _literal_hook),
        (_is_union, _union_hook),
        (lambda t: _origin(t) is typing.Annotated, _annotated_hook),
    ]
    for predicate, factory in factories:
        converter.register_structure_hook_factory(predicate, factory)
    return converter


converter = make_converter()


def _format(exc: BaseException, tp: Any) -> str:
    if isinstance(exc, FieldError):
        return str(exc)
    if isinstance(exc, KeyError):
        return "required field missing"
    return cattrs.v.format_exception(exc, tp)


def _field_errors(exc: BaseException) -> list[tuple[str | None, str]]:
    """(param, message) pairs from a cattrs validation error, in body order; param None for the body itself."""
    errors = []
    for line in cattrs.transform_error(exc, path="$", format_exception=_format):
        message, _, path = line.rpartition(" @ ")
        param = path.removeprefix("$").removeprefix(".") or None
        errors.append((param, message))
    return errors


def _in_body_order(errors: list[tuple[str | None, str]], keys: list[str]) -> list[tuple[str | None, str]]:
    """Sort errors by the position of their top-level field in the body, so `param` is the first bad one sent."""

    def position(error: tuple[str | None, str]) -> int:
        top = (error[0] or "").split(".")[0].split("[")[0]
        return keys.index(top) if top in keys else len(keys)  # missing required fields go last

    return sorted(errors, key=position)  # stable: errors within one field keep their order


def _fail(errors: list[tuple[str | None, str]], code: str = "invalid_value") -> InvalidRequestError:
    shown = [f"{param}: {message}" if param else message for param, message in errors[:MAX_MESSAGE_ERRORS]]
    more = f" (and {len(errors) - MAX_MESSAGE_ERRORS} more)" if len(errors) > MAX_MESSAGE_ERRORS else ""
    noun = "field" if len(errors) == 1 else "fields"
    message = f"{len(errors)} invalid {noun}: " + "; ".join(shown) + more
    return InvalidRequestError(message, param=errors[0][0], code=code)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _check_large_body(raw: bytes, max_string_bytes: int | None) -> None:
    """The limits of a large body that byte counts can check before it is decoded (see `decode_json`).

    Between two quotes lies either JSON structure or (part of) a string. A long stretch that is not structure is
    string text, and a string of n raw bytes with k backslashes decodes to at least n - 5k bytes of UTF-8 (an
    escape is 2 to 6 raw bytes for at least 1 decoded byte), so such a stretch proves the string too long. Only
    searches and counts run on the whole body (no copies of it), each a short C call; the loop over the quotes is
    Python, which lets other threads run between its iterations.
    """
    if raw.count(b'"') > 2 * MAX_BODY_STRINGS:
        raise InvalidRequestError(f"The request body holds more than {MAX_BODY_STRINGS} JSON strings; no "
                                  "request needs that many", code="limit_exceeded")
    if max_string_bytes is None:
        return
    start = 0
    while start < len(raw):
        end = raw.find(b'"', start)
        end = len(raw) if end == -1 else end
        if end - start > max_string_bytes and raw[start:start + STRUCTURE_SAMPLE_BYTES].translate(None, _JSON_STRUCTURE):
            if end - start - 5 * raw.count(b"\\", start, end) > max_string_bytes:
                raise InvalidRequestError(
                    f"The request body holds a string of more than {max_string_bytes} bytes of text, over this "
                    f"server's limit of {max_string_bytes} (--max-prompt-bytes)", code="limit_exceeded")
        start = end + 1


def _lone_surrogate_path(value: Any, path: str) -> str | None:
    """The path of the first string in `value` holding a lone UTF-16 surrogate (not a character), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _lone_surrogate_path(key, path) is not None:
            return path or "$"
        where = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
        found = _lone_surrogate_path(item, where.removeprefix("."))
        if found is not None:
            return found
    return None


def decode_json(raw: bytes | str, max_string_bytes: int | None = None) -> Any:
    """Decode a request body as strict JSON: no NaN/Infinity, no lone surrogates, bounded work for big bodies.

    A body over LARGE_BODY_BYTES may hold at most MAX_BODY_STRINGS strings, and (with `max_string_bytes`, the
    server's --max-prompt-bytes) no string longer than that: decoding costs about 6 ms per megabyte in one call that
    holds the GIL, so a body of a million tiny strings, or a 15 MB prompt, would stall every other request (in any
    thread) before a limit could look at it. Both are found with byte counts instead (`_check_large_body`).
    `"\\ud800"` is valid JSON but not text (a lone surrogate cannot be encoded, tokenized or logged): such a body is
    refused here, naming the field.

    Raises:
        InvalidRequestError: the body is not valid JSON, holds invalid Unicode, too many strings or too long a
            string (400).
    """
    if len(raw) > LARGE_BODY_BYTES:
        _check_large_body(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw, max_string_bytes)
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidRequestError(f"The request body is not valid JSON: {reason}", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")):
        path = _lone_surrogate_path(data, "")
        if path is not None:
            raise InvalidRequestError(
                f"{path or 'The request body'}: invalid Unicode: a lone surrogate escape (such as \\ud800) is not a "
                "character; send UTF-8 text, or a surrogate pair for characters beyond U+FFFF",
                param=path or None, code="invalid_unicode")
    return data


async def parse_request(cls: type[T], raw: bytes, limits: RequestLimits) -> T:
    """`parse_body`, in a worker thread for a body over LARGE_BODY_BYTES (its byte scans and decoding take
    milliseconds that the event loop then spends on other requests between them).

    Raises:
        InvalidRequestError: as `parse_body`.
    """
    if len(raw) <= LARGE_BODY_BYTES:
        return parse_body(cls, raw, limits)
    return await trio.to_thread.run_sync(parse_body, cls, raw, limits)


def parse_body(cls: type[T], raw: bytes | str, limits: RequestLimits | None = None) -> T:
    """Decode and validate a request body into `cls`; with `limits`, check them before structuring it.

    Raises:
        InvalidRequestError: malformed JSON, a body that is not an object, a limit passed, any field of the wrong type
            or out of range (all of them listed; `param` is the first).
    """
    data = decode_json(raw, limits.max_prompt_bytes if limits is not None else None)
    if not isinstance(data, dict):
        raise InvalidRequestError(f"The request body must be a JSON object, got {_describe(data)}", code="invalid_json")
    if limits is not None and cls in _TEXT_FIELDS:
        check_raw(data, limits, _TEXT_FIELDS[cls], has_prompt_list=cls is CompletionRequest)
    try:
        value = converter.structure(data, cls)
    except (BaseValidationError, FieldError) as exc:
        raise _fail(_in_body_order(_field_errors(exc), list(data))) from None
    errors = _cross_checks(value)
    if errors:
        raise _fail(errors)
    errors = _combination_checks(value)
    if errors:
        raise _fail(errors, code=INVALID_COMBINATION)
    return value


def _cross_checks(value: object) -> list[tuple[str | None, str]]:
    """Checks that involve several fields or the shape of a union beyond what the schema says."""
    errors: list[tuple[str | None, str]] = []
    stop = getattr(value, "stop", None)
    if isinstance(stop, str) and not stop or isinstance(stop, list) and any(not s for s in stop):
        errors.append(("stop", "stop strings must not be empty"))
    logit_bias = getattr(value, "logit_bias", None) or {}
    bad_keys = [key for key in logit_bias if not _TOKEN_ID_KEY.fullmatch(key)]
    if bad_keys:
        errors.append(("logit_bias", f"keys must be token ids (non-negative integers as strings), got {bad_keys[0]!r}"))
    if isinstance(value, ChatCompletionRequest):
        if isinstance(value.messages, list) and not value.messages:
            errors.append(("messages", "must contain at least one message"))
    elif isinstance(value, CompletionRequest):
        errors.extend(_prompt_shape_errors(value.prompt))
    elif isinstance(value, InteractiveRequest):
        if isinstance(value.prompt, list) and not value.prompt:
            errors.append(("prompt", "must contain at least one message"))
    return errors


def _combination_checks(value: object) -> list[tuple[str | None, str]]:
    """Rules between fields, which the OpenAPI document states in the fields' descriptions only (JSON Schema has
    no plain way to say them): their 400 carries code `invalid_combination`."""
    errors: list[tuple[str | None, str]] = []
    if getattr(value, "stream_options", None) is not None and not getattr(value, "stream", False):
        errors.append(("stream_options", "stream_options is only allowed when stream is true"))
    if isinstance(value, ChatCompletionRequest):
        if value.top_logprobs and not value.logprobs:  # 0 is harmless (LMDeploy's client sends it)
            errors.append(("top_logprobs", "top_logprobs requires logprobs to be true"))
    elif isinstance(value, InteractiveRequest):
        if value.cancel and value.session_id == -1:
            errors.append(("session_id", "cancel needs the session_id of an existing session, not -1"))
    return errors


def _prompt_shape_errors(prompt: str | list[Any]) -> list[tuple[str | None, str]]:
    """`prompt` must be a string, a list of strings, a list of token ids or a list of token-id lists."""
    if isinstance(prompt, str):
        return []
    shape = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
    if not prompt:
        return [("prompt", "must not be an empty list")]
    kinds = {_value_kind(item) for item in prompt}
    if len(kinds) > 1:
        return [("prompt", f"{shape}; got a list mixing {' and '.join(sorted(kinds))}")]
    errors: list[tuple[str | None, str]] = []
    for i, item in enumerate(prompt):
        if isinstance(item, int) and item < 0:
            errors.append((f"prompt[{i}]", f"token ids must be >= 0, got {item}"))
        elif isinstance(item, list):
            if not item:
                errors.append((f"prompt[{i}]", "must not be an empty list"))
            errors.extend((f"prompt[{i}][{j}]", f"token ids must be >= 0, got {t}") for j, t in enumerate(item) if t < 0)
    return errors
