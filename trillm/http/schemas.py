"""Schemas: the request and response bodies of every HTTP endpoint, as frozen attrs classes.

These classes are the single source of truth for three things:
- validation (`http/validation.py` structures request bodies into them with a strict cattrs converter; the
  `msgspec.Meta` bounds in the `Annotated` field types are the range checks),
- the OpenAPI document (`http/openapi.py` derives every schema from them with `msgspec.json.schema_components`),
- the wire format of responses (`encode` below).

Field names and defaults follow OpenAI's API and LMDeploy's api_server (the contract is /shared/API.md). Fields a
client may send that we do not implement are not declared: unknown keys are ignored.
Union types are written so that msgspec can describe them (at most one array type per union). Where the real
union has several array forms, the field's `EXACT_FORMS` metadata lists them: the OpenAPI document publishes that
union (generated clients then accept every form) and the converter enforces it (`CompletionRequest.prompt`).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import attrs
import msgspec
from msgspec import Meta

log = logging.getLogger(__name__)

EXACT_FORMS = "trillm_exact_forms"  # attrs field metadata: the precise union msgspec cannot express (see openapi.py)
MAX_TOP_LOGPROBS = 20  # SamplingParams.logprobs accepts [0, 20]

# Constrained scalar types: the bounds are enforced by http/validation.py and published in the OpenAPI document.
Temperature = Annotated[float, Meta(ge=0, le=2, description="0 means greedy decoding")]
UnitFloat = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
RepetitionPenalty = Annotated[float, Meta(gt=0, le=10, description="1 means off; >1 discourages repetition")]
TopK = Annotated[int, Meta(ge=-1, description="0 or -1 means off")]
NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(ge=1)]
ChoiceCount = Annotated[int, Meta(ge=1)]  # the upper bound is the server's --max-n (http/limits.py)
TopLogprobs = Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)]
TokenId = Annotated[int, Meta(ge=0)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
LogitBiasValue = Annotated[float, Meta(ge=-100, le=100)]
SessionId = Annotated[int, Meta(ge=-1, le=2**63 - 1, description="-1 lets the server assign an id")]


# --------------------------------------------------------------------------------------------------------------------
# Requests


@attrs.frozen(kw_only=True)
class ContentPart:
    """One part of a chat message's content; only text parts are supported."""

    type: Literal["text"]
    text: str


@attrs.frozen(kw_only=True)
class ToolCallFunction:
    """The function a tool call names, with its arguments as a JSON text (OpenAI's layout)."""

    name: str
    arguments: str


@attrs.frozen(kw_only=True)
class ToolCall:
    """One tool call of an assistant message (in a request's history, or in an answer)."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


@attrs.frozen(kw_only=True)
class ChatMessage:
    """One OpenAI chat message. Content is a string, a list of text parts, or null (an assistant tool call)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool message: the call it answers


@attrs.frozen(kw_only=True)
class JsonSchemaFormat:
    """`response_format.json_schema`: the schema the answer must validate against (OpenAI structured outputs)."""

    name: str = "response"
    description: str | None = None
    schema: dict[str, Any] | None = None  # null: any JSON object
    strict: bool | None = None  # true: a keyword the grammar compiler does not support is a 400, not ignored


@attrs.frozen(kw_only=True)
class ResponseFormat:
    """The answer's format: free text, any JSON object, JSON of a schema, or (LMDeploy) text matching a regex."""

    type: Literal["text", "json_object", "json_schema", "regex_schema"]
    json_schema: JsonSchemaFormat | None = None
    regex_schema: str | None = None  # LMDeploy's `{"type": "regex_schema", "regex_schema": "..."}`


@attrs.frozen(kw_only=True)
class FunctionDefinition:
    """A function the model may call: its name, what it does, and a JSON schema of its arguments."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


@attrs.frozen(kw_only=True)
class ToolDefinition:
    """One entry of `tools` (only functions exist)."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


@attrs.frozen(kw_only=True)
class StreamOptions:
    """Options of a streamed response."""

    include_usage: bool = False


@attrs.frozen(kw_only=True)
class SamplingFields:
    """The sampling and streaming fields that chat and text completions share.

    Unset sampling values (null) come from the model's generation_config.json, else OpenAI's defaults.
    """

    model: str | None = None
    temperature: Temperature | None = None
    top_p: UnitFloat | None = None
    top_k: TopK | None = None
    min_p: UnitFloat | None = None
    n: ChoiceCount = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: dict[str, LogitBiasValue] | None = None
    ignore_eos: bool = False
    min_tokens: NonNegativeInt = 0
    min_new_tokens: NonNegativeInt | None = None  # LMDeploy's name for min_tokens; wins when both are set
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    session_id: SessionId | None = None
    # Constrained decoding (docs/structured.md): OpenAI's response_format, and vLLM's guided_* fields.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # llguidance's Lark dialect


@attrs.frozen(kw_only=True)
class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions: OpenAI chat. `messages` may also be one string (LMDeploy)."""

    messages: str | list[ChatMessage]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None  # OpenAI's newer name for max_tokens; wins when both are set
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    do_preprocess: bool = True  # false: the messages' text is the prompt, no chat template
    tools: list[ToolDefinition] | None = None
    # "none", "auto", "required", or {"type": "function", "function": {"name": ...}} (checked in http/tools.py)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True


@attrs.frozen(kw_only=True)
class CompletionRequest(SamplingFields):
    """POST /v1/completions: OpenAI text completion.

    `prompt` is a string, a list of strings, a list of token ids, or a list of token-id lists; a list gives one
    choice per prompt and per `n` (choice index = prompt index * n + i). `max_tokens` defaults to 16, as in
    OpenAI's legacy API and LMDeploy; null means up to the context window (or the server's --max-new-tokens).
    """

    prompt: str | list[str | int | list[int]] = attrs.field(
        metadata={EXACT_FORMS: (str, list[str], list[TokenId], list[list[TokenId]])}
    )
    max_tokens: NonNegativeInt | None = 16
    max_completion_tokens: NonNegativeInt | None = None
    logprobs: TopLogprobs | None = None
    echo: bool = False


@attrs.frozen(kw_only=True)
class InteractiveRequest:
    """POST /v1/chat/interactive: one turn of an LMDeploy interactive session (API.md, semantics 1-9)."""

    prompt: str | list[ChatMessage]
    session_id: SessionId = -1
    interactive_mode: bool = False
    stream: bool = False
    stop: str | list[str] | None = None
    request_output_len: NonNegativeInt | None = None
    top_p: UnitFloat = 0.8
    top_k: TopK = 40
    temperature: Temperature = 0.8
    repetition_penalty: RepetitionPenalty = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    seed: Seed | None = None
    min_new_tokens: NonNegativeInt | None = None
    min_p: UnitFloat = 0.0
    cancel: bool = False


@attrs.frozen(kw_only=True)
class EncodeRequest:
    """POST /v1/encode: tokenize text (optionally rendered as one user turn of the chat template)."""

    input: str | list[str]
    do_preprocess: bool = False
    add_bos: bool = True


# --------------------------------------------------------------------------------------------------------------------
# Responses


@attrs.frozen(kw_only=True)
class PromptTokensDetails:
    """Where a request's prompt tokens came from (OpenAI's `usage.prompt_tokens_details`)."""

    cached_tokens: int = 0  # prompt tokens whose KV was reused (prefix cache or a session's parked KV), not computed


@attrs.frozen(kw_only=True)
class Usage:
    """Token counts of one request: the prompt once, the completion summed over choices."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


@attrs.frozen(kw_only=True)
class TopLogprob:
    """One alternative token at a position of a chat completion."""

    token: str
    logprob: float
    bytes: list[int] | None = None


@attrs.frozen(kw_only=True)
class ChatTokenLogprob:
    """The sampled token at one position of a chat completion, with the most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = attrs.field(factory=list)


@attrs.frozen(kw_only=True)
class ChatLogprobs:
    """Log-probabilities of a chat choice's tokens."""

    content: list[ChatTokenLogprob] | None = None


@attrs.frozen(kw_only=True)
class ChatResponseMessage:
    """The assistant message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


@attrs.frozen(kw_only=True)
class ChatChoice:
    """One choice of a chat completion."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None


@attrs.frozen(kw_only=True)
class ChatCompletionResponse:
    """The JSON answer of /v1/chat/completions."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


@attrs.frozen(kw_only=True)
class DeltaFunction:
    """A streamed tool call's function: the name in its first delta, then pieces of the arguments' JSON text."""

    name: str | None = None
    arguments: str | None = None


@attrs.frozen(kw_only=True)
class DeltaToolCall:
    """One tool call's delta in a streamed chunk: `id` and `type` in its first delta only (OpenAI's layout)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


@attrs.frozen(kw_only=True)
class DeltaMessage:
    """The new part of a streamed chat choice; the first chunk of each choice carries the role."""

    role: Literal["assistant"] | None = None
    content: str | None = None


@attrs.frozen(kw_only=True)
class ToolCallsDelta(DeltaMessage):
    """A streamed delta that carries tool calls (a DeltaMessage on the wire with `tool_calls`; plain deltas omit it)."""

    tool_calls: list[DeltaToolCall]


@attrs.frozen(kw_only=True)
class ChatChunkChoice:
    """One choice's delta in a streamed chat chunk; the last content chunk carries finish_reason."""

    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None


@attrs.frozen(kw_only=True)
class ChatCompletionChunk:
    """One SSE event of a streamed /v1/chat/completions; with include_usage a last chunk has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


@attrs.frozen(kw_only=True)
class CompletionLogprobs:
    """Log-probabilities of a text choice's tokens, OpenAI's legacy layout (parallel lists)."""

    tokens: list[str] = attrs.field(factory=list)
    token_logprobs: list[float | None] = attrs.field(factory=list)
    top_logprobs: list[dict[str, float] | None] = attrs.field(factory=list)
    text_offset: list[int] = attrs.field(factory=list)


@attrs.frozen(kw_only=True)
class CompletionChoice:
    """One choice of a text completion (or its delta, streamed)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


@attrs.frozen(kw_only=True)
class CompletionResponse:
    """The JSON answer of /v1/completions, and each SSE event of a streamed one (usage set on the last only)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


@attrs.frozen(kw_only=True)
class InteractiveResponse:
    """The answer of /v1/chat/interactive, or one NDJSON line of a streamed one (`text` is then the delta).

    `tokens` counts this turn's output tokens (cumulative), `input_tokens` the tokens this turn added to the session
    before generating, `history_tokens` the tokens the session held before this turn.
    """

    text: str
    tokens: int
    input_tokens: int
    history_tokens: int
    finish_reason: Literal["stop", "length", "abort"] | None = None
    session_id: int


@attrs.frozen(kw_only=True)
class EncodeResponse:
    """The answer of /v1/encode: ids and length for a string, lists of them for a list of strings."""

    input_ids: list[int | list[int]] = attrs.field(metadata={EXACT_FORMS: (list[int], list[list[int]])})
    length: int | list[int]


@attrs.frozen(kw_only=True)
class ModelCard:
    """One served model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "trillm"
    root: str
    parent: str | None = None
    max_model_len: int


@attrs.frozen(kw_only=True)
class ModelList:
    """The answer of /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


@attrs.frozen(kw_only=True)
class HealthResponse:
    """The answer of /health."""

    status: Literal["ok"] = "ok"


@attrs.frozen(kw_only=True)
class ErrorDetail:
    """OpenAI's error object: `param` names the (first) offending field, `code` a machine-readable reason."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


@attrs.frozen(kw_only=True)
class ErrorResponse:
    """Every 4xx/5xx body."""

    error: ErrorDetail


_encoder = msgspec.json.Encoder()


def encode(value: object) -> bytes:
    """Serialize a response object (an attrs instance of this module, or plain JSON data) to JSON bytes."""
    return _encoder.encode(value)
