"""Tokenizer: text ⇄ token ids for one model, with its chat template, incremental detokenizer and stop-string matcher.

One module on purpose: `IncrementalDetokenizer` and `StopStringMatcher` are the two streaming halves of `Tokenizer`
that the Engine uses per choice, and the HTTP layer may import only this module for text work (layering rule).

Loading. A folder with `tokenizer.json` is loaded with `tokenizers` directly (0.2 s; transformers' `AutoTokenizer`
spends seconds importing and re-wrapping the same object). Special-token strings, `add_bos_token` and the chat
template come from `tokenizer_config.json` (or `chat_template.jinja` / `chat_template.json`), EOS ids and sampling
defaults from `generation_config.json`. A folder without `tokenizer.json` (a SentencePiece `tokenizer.model` only)
goes through `AutoTokenizer`, whose fast backend is then used the same way.

BOS. `encode(text, add_bos=True)` prepends BOS only when the model's tokenizer adds it (`add_bos_token`, else what the
`tokenizer.json` post-processor does), and never when the text already starts with it (a template that writes the
BOS string). Nothing else from the post-processor (e.g. an appended EOS) is applied: these ids are prompts.

Chat templates render with transformers' own Jinja renderer (`render_jinja_template`, the code behind
`apply_chat_template`), given the special-token strings as transformers does, so a template renders exactly as it
does there. Messages are validated first; OpenAI text content parts are joined with newlines.

Decoding is the `tokenizers` backend's (no `clean_up_tokenization_spaces`). `spaces_between_special_tokens` follows
Hugging Face's slow tokenizers: each added token (one not dropped by `skip_special_tokens`) is a separate piece and
the pieces are joined with single spaces. Fast tokenizers ignore the flag; it only matters when special tokens are
shown or the vocabulary has non-special added tokens.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trillm.chat_template import LMDeployTemplate, TemplateRenderError, load_chat_template
from trillm.errors import InvalidRequestError

log = logging.getLogger(__name__)

_SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_RELEASE_GIL_CHARS = 8192  # texts longer than this are encoded without holding the GIL
_ANSWER_SENTINEL = "TRILLMANSWERSENTINEL"  # stands in for a session's previous answer in render_session_turn


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte → printable-character table that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return {char: byte for byte, char in table.items()}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as file:
        value = json.load(file)
    return value if isinstance(value, dict) else {}


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _has_byte_level_decoder(decoder_state: Any) -> bool:
    if not isinstance(decoder_state, dict):
        return False
    if decoder_state.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level_decoder(d) for d in decoder_state.get("decoders") or [])


def _folder_chat_template(folder: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The model's own chat template: chat_template.jinja, chat_template.json, or tokenizer_config.json's entry."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template") or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _message_text(content: Any, index: int) -> str:
    """OpenAI message content (a string, None, or a list of text parts) as one string."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"messages[{index}].content must be a string or a list of content parts", param="messages"
        )
    texts = []
    for part_index, part in enumerate(content):
        where = f"messages[{index}].content[{part_index}]"
        if not isinstance(part, dict):
            raise InvalidRequestError(f"{where} must be an object with 'type' and 'text'", param="messages")
        if part.get("type") != "text":
            raise InvalidRequestError(
                f"{where} has type {part.get('type')!r}; this model accepts only 'text' parts", param="messages"
            )
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{where}.text must be a string", param="messages")
        texts.append(part["text"])
    return "\n".join(texts)


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validated copies of OpenAI chat messages with `content` as a string.

    Raises:
        InvalidRequestError: (param "messages") when messages is not a non-empty list of objects, each with a string
            `role` and a string / null / list-of-text-parts `content`.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of message objects", param="messages")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(
                f"messages[{index}] must be an object with 'role' and 'content'", param="messages"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{index}].role must be a non-empty string", param="messages")
        normalized.append({**message, "content": _message_text(message.get("content"), index)})
    return normalized


class Tokenizer:
    """Text ⇄ token ids of one model, its chat template and generation defaults (serving process only)."""

    def __init__(
        self,
        backend: Any,  # tokenizers.Tokenizer
        *,
        special_tokens: Mapping[str, str],
        adds_bos: bool,
        eos_token_ids: Sequence[int],
        chat_template: str | LMDeployTemplate | None,
        generation_defaults: Mapping[str, float | int],
    ) -> None:
        self._backend = backend
        self._special_tokens = dict(special_tokens)  # bos_token, eos_token, ... → string, as templates see them
        bos = special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos is not None else None
        self._adds_bos = adds_bos and self.bos_token_id is not None
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._added: dict[int, tuple[str, bool]] = {
            token_id: (token.content, bool(token.special))
            for token_id, token in backend.get_added_tokens_decoder().items()
        }
        self.all_special_ids: frozenset[int] = frozenset(i for i, (_, special) in self._added.items() if special)
        self.chat_template = chat_template  # Jinja text, or an LMDeploy JSON template (chat_template.py)
        self.generation_defaults: dict[str, float | int] = dict(generation_defaults)
        if isinstance(chat_template, LMDeployTemplate):  # its stop words end generation like EOS
            self.eos_token_ids += self._stop_word_ids(chat_template.stop_words)
        decoder_state = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else None
        self._byte_decoder = _gpt2_byte_decoder() if _has_byte_level_decoder(decoder_state) else None

    def _stop_word_ids(self, stop_words: Sequence[str]) -> tuple[int, ...]:
        ids = []
        for word in stop_words:
            word_ids = self._backend.encode(word, add_special_tokens=False).ids
            if len(word_ids) == 1:
                ids.append(word_ids[0])
            else:
                log.warning("chat template stop word %r is %d tokens, not one: it does not end generation (send it "
                            "in `stop` instead)", word, len(word_ids))
        return tuple(i for i in ids if i not in self.eos_token_ids)

    @classmethod
    def from_folder(cls, path: str, *, chat_template: str | None = None) -> Tokenizer:
        """Load a Hugging Face model folder's tokenizer; `chat_template` (--chat-template) overrides the model's.

        Raises:
            ValueError: `chat_template` names no file, or a file that is neither a Jinja nor an LMDeploy template.
        """
        folder = Path(path)
        config = _read_json(folder / "tokenizer_config.json")
        template = load_chat_template(chat_template) if chat_template else _folder_chat_template(folder, config)
        special_tokens = {a: s for a in _SPECIAL_TOKEN_ATTRIBUTES if (s := _token_string(config.get(a))) is not None}
        backend: Any  # tokenizers.Tokenizer
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as Backend

            backend = Backend.from_file(str(folder / "tokenizer.json"))
        else:  # SentencePiece-only folders: let transformers convert them to a fast tokenizer
            from transformers import AutoTokenizer

            hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))
            backend = hf_tokenizer._tokenizer
            special_tokens = {**dict(hf_tokenizer.special_tokens_map), **special_tokens}
        adds_bos = config.get("add_bos_token")
        if not isinstance(adds_bos, bool):  # not stated: whatever the post-processor does
            with_specials = backend.encode("a", add_special_tokens=True).ids
            adds_bos = len(with_specials) > len(backend.encode("a", add_special_tokens=False).ids)
            adds_bos = adds_bos and backend.token_to_id(special_tokens.get("bos_token", "")) == with_specials[0]
        generation = _read_json(folder / "generation_config.json") or _read_json(folder / "config.json")
        eos_token = special_tokens.get("eos_token")
        eos_ids = _as_id_list(backend.token_to_id(eos_token) if eos_token is not None else None)
        eos_ids += _as_id_list(generation.get("eos_token_id"))
        defaults = {k: generation[k] for k in _GENERATION_DEFAULT_KEYS if isinstance(generation.get(k), (int, float))}
        return cls(
            backend,
            special_tokens=special_tokens,
            adds_bos=adds_bos,
            eos_token_ids=eos_ids,
            chat_template=template,
            generation_defaults=defaults,
        )

    # ------------------------------------------------------------------------------------------------ text ⇄ ids

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; with add_bos, BOS first if the model's tokenizer adds one (never twice).

        A long text goes through `encode_batch`, which releases the GIL while it works (`encode` holds it: about a
        second per megabyte), so that a caller in a worker thread leaves the event loop free.
        """
        if len(text) > _RELEASE_GIL_CHARS:
            ids: list[int] = self._backend.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos and self._adds_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]  # _adds_bos implies an id
        return ids

    def decode(
        self, ids: Sequence[int], *, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = False
    ) -> str:
        """Text of `ids`. With spaces_between_special_tokens, added tokens are space-separated pieces (HF slow rule)."""
        if not spaces_between_special_tokens:
            return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))
        pieces: list[str] = []
        run: list[int] = []
        for token_id in ids:
            added = self._added.get(token_id)
            if added is None:
                run.append(token_id)
            elif not (added[1] and skip_special_tokens):
                if run:
                    pieces.append(self._backend.decode(run, skip_special_tokens=skip_special_tokens))
                    run = []
                pieces.append(added[0])
        if run:
            pieces.append(self._backend.decode(run, skip_special_tokens=skip_special_tokens))
        return " ".join(pieces)

    def added_token(self, token_id: int) -> tuple[str, bool] | None:
        """(content, is_special) of an added token (control tokens such as `<|im_end|>`), else None."""
        return self._added.get(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level token may hold part of a UTF-8 character)."""
        added = self._added.get(token_id)
        if added is not None:
            return added[0].encode()
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary (size {self.vocab_size})")
        if self._byte_decoder is not None:
            decoder = self._byte_decoder
            if all(char in decoder for char in token):
                return bytes(decoder[char] for char in token)
            return str(token).encode()
        byte = _BYTE_FALLBACK_TOKEN.fullmatch(token)  # SentencePiece byte fallback: <0x0A>
        if byte is not None:
            return bytes([int(byte.group(1), 16)])
        return str(token).replace("\u2581", " ").encode()  # SentencePiece writes a leading space as ▁

    def token_text(self, token_id: int) -> str:
        """One token's text for logprobs; bytes that are not whole UTF-8 characters show as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    # ---------------------------------------------------------------------------------------------- chat template

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text of a conversation, rendered with the chat template (`tools`: OpenAI tool definitions).

        Raises:
            InvalidRequestError: (param "messages") bad messages, no chat template, or the template rejected them.
        """
        normalized = normalize_messages(messages)
        if isinstance(self.chat_template, LMDeployTemplate):
            try:
                return self.chat_template.render(normalized, add_generation_prompt=add_generation_prompt)
            except TemplateRenderError as error:
                raise InvalidRequestError(f"the chat template rejected the messages: {error}",
                                          param="messages") from error
        if self.chat_template is None:
            raise InvalidRequestError(
                "this model has no chat template: start the server with --chat-template or use /v1/completions",
                param="messages",
            )
        import jinja2
        from transformers.utils import chat_template_utils

        render: Any = chat_template_utils.render_jinja_template
        try:
            rendered = render(
                conversations=[normalized],
                tools=tools,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except (jinja2.TemplateError, TypeError, ValueError) as error:  # the template's own checks and failures
            raise InvalidRequestError(f"the chat template rejected the messages: {error}", param="messages") from error
        return str(rendered[0][0])  # ([one text per conversation], generation indices)

    def encode_chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the rendered conversation with the generation prompt; BOS only where the template writes it.

        Raises:
            InvalidRequestError: as render_chat.
        """
        return self.encode(self.render_chat(messages, add_generation_prompt=True, tools=tools), add_bos=False)

    def render_session_turn(
        self, history: list[dict[str, Any]], new_messages: list[dict[str, Any]], *, last_output_ids: Sequence[int]
    ) -> str:
        """Text to append to a session's token history for its next turn (no BOS, no system prompt).

        The session's tokens are `encode_chat(earlier turns)` + the last answer's ids, so they stop right after the
        answer: with its EOS when generation ended on one, without when it hit a length limit or was cancelled.
        The previous answer is replaced by a sentinel and the conversation rendered twice: as it stands, and with
        `new_messages` plus the generation prompt. The second rendering must extend the first; the text after the
        sentinel in the first (the template's end of an assistant turn, e.g. "<|im_end|>\\n") plus the extension
        is the answer. When the answer's last token was an EOS whose text starts that end-of-turn text, that part is
        already in the history and is left out. `history` is every message of the earlier turns; its final
        assistant message (appended when missing: an empty answer) supplies only the structure, never the text.
        Encode the result with `encode(text, add_bos=False)`. With no history this is `render_chat(new_messages)`.

        Raises:
            InvalidRequestError: (param "messages") bad messages, or a template that re-renders earlier turns
                differently once a turn is added.
        """
        if not history:
            return self.render_chat(new_messages, add_generation_prompt=True)
        earlier = normalize_messages(history)
        if earlier[-1]["role"] == "assistant":
            earlier = earlier[:-1]
        earlier.append({"role": "assistant", "content": _ANSWER_SENTINEL})
        before = self.render_chat(earlier, add_generation_prompt=False)
        after = self.render_chat(earlier + normalize_messages(new_messages), add_generation_prompt=True)
        if not after.startswith(before) or _ANSWER_SENTINEL not in before:
            raise InvalidRequestError(
                "this chat template renders earlier turns differently once a turn is added, so a session cannot be "
                "extended; end the session and send the whole conversation",
                param="messages",
            )
        end_of_answer = before[before.rindex(_ANSWER_SENTINEL) + len(_ANSWER_SENTINEL) :]
        if last_output_ids and last_output_ids[-1] in self.eos_token_ids:
            eos_text = self.token_text(last_output_ids[-1])
            end_of_answer = end_of_answer.removeprefix(eos_text)
        return end_of_answer + after[len(before) :]


class IncrementalDetokenizer:
    """Token ids → text, a few tokens at a time, for one choice (serving process only).

    Each push decodes only a short window of recent tokens: `_window[0]` onwards, of whose text the first
    `_num_emitted` characters were already emitted. New text is the decoded window past that point, less any
    trailing U+FFFD, which is what a UTF-8 character split across byte-level tokens decodes to until its last byte
    arrives. Once the window's text ends cleanly it is cut back to its last few tokens (kept as context: SentencePiece
    decoders drop the leading space of the first token). The concatenation of every push and the flush equals
    `tokenizer.decode(all ids, skip_special_tokens=..., spaces_between_special_tokens=...)`.
    `prompt_token_ids` (optional) seeds the window with the end of the prompt so the first output token is
    decoded in context (a SentencePiece "▁Hello" continues a prompt as " Hello").
    """

    _CONTEXT_TOKENS = 4  # tokens kept when the window is cut back
    _MAX_WINDOW_TOKENS = 12  # cut back once this long; also the most tokens a pending character may take
    _MAX_PENDING_TOKENS = 16  # past this, a trailing U+FFFD is invalid output, not a split character: emit it

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._spaces = spaces_between_special_tokens
        self._window: list[int] = []
        self._num_pending = 0  # tokens at the end of the window whose text is not emitted yet
        self._num_emitted = 0
        self._in_piece = False  # spaces mode: an ordinary-token piece is open
        self._has_piece = False  # spaces mode: some piece was emitted (the next one is preceded by a space)
        context = list(prompt_token_ids[-self._CONTEXT_TOKENS :])
        while any(tokenizer.added_token(t) is not None for t in context):  # context only after the last added token
            context = context[1:]
        if context:
            self._window = context
            self._num_emitted = len(self._decode(context))

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text that became stable (never a partial UTF-8 character)."""
        out: list[str] = []
        for token_id in token_ids:
            added = self._tokenizer.added_token(token_id)
            if added is not None and added[1] and self._skip_special_tokens:
                continue  # dropped, exactly as decode(skip_special_tokens=True) drops it
            if added is not None and self._spaces:
                out.append(self._emit(final=True))  # a piece ends at an added token
                out.append((" " if self._has_piece else "") + added[0])
                self._window, self._num_emitted, self._num_pending = [], 0, 0
                self._in_piece, self._has_piece = False, True
                continue
            if self._spaces and not self._in_piece:
                out.append(" " if self._has_piece else "")
                self._in_piece = self._has_piece = True
            self._window.append(token_id)
            self._num_pending += 1
        out.append(self._emit(final=False))
        return "".join(out)

    def flush(self) -> str:
        """Text still held back (a character whose last bytes never came shows as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if not self._num_pending:
            return ""
        text = self._decode(self._window)
        stable = len(text)
        if not final and self._num_pending <= self._MAX_PENDING_TOKENS:
            stable = len(text.rstrip("\ufffd"))
        new_text = text[self._num_emitted : stable]
        self._num_emitted = max(self._num_emitted, stable)
        if stable == len(text):
            self._num_pending = 0
            if len(self._window) >= self._MAX_WINDOW_TOKENS:
                self._window = self._window[-self._CONTEXT_TOKENS :]
                self._num_emitted = len(self._decode(self._window))
        return new_text


class StopStringMatcher:
    """Finds stop strings in streamed text, across pushes; holds back only what could still begin a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in dict.fromkeys(stops) if s)
        self._held = ""
        self._matched = False

    @property
    def matched(self) -> bool:
        return self._matched

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, matched). On a match: the text before the earliest stop string, and True."""
        if self._matched:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._held + text
        starts = [i for i in (buffer.find(stop) for stop in self._stops) if i >= 0]
        if starts:
            self._matched, self._held = True, ""
            return buffer[: min(starts)], True
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of the stream (empty after a match)."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_length(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        longest = min(len(buffer), max(len(s) for s in self._stops) - 1)
        for length in range(longest, 0, -1):
            suffix = buffer[len(buffer) - length :]
            if any(stop.startswith(suffix) for stop in self._stops):
                return length
        return 0
