"""Tests of the tokenizer, chat templates, incremental detokenizer and stop-string matcher (SmolLM2's tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trillm.errors import InvalidRequestError
from trillm.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder: str) -> Tokenizer:
    tokenizer = Tokenizer.from_folder(smollm2_folder)
    tokenizer.render_chat([{"role": "user", "content": "warm-up"}])  # imports the template renderer once, here
    return tokenizer


def copy_folder(source: str, target: Path, **json_overrides: dict[str, Any]) -> str:
    """A tokenizer-only folder next to the test: tokenizer.json linked, JSON configs updated by `json_overrides`."""
    (target / "tokenizer.json").symlink_to(Path(source) / "tokenizer.json")
    for name in ("tokenizer_config", "generation_config"):
        config = json.loads((Path(source) / f"{name}.json").read_text())
        config.update(json_overrides.get(name, {}))
        (target / f"{name}.json").write_text(json.dumps(config))
    return str(target)


def stream(detokenizer: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    pieces = [detokenizer.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*pieces, detokenizer.flush()]


# ---------------------------------------------------------------------------------------------------- ids and bytes


def test_special_ids_and_eos_include_im_end(tokenizer: Tokenizer) -> None:
    assert 2 in tokenizer.eos_token_ids
    assert tokenizer.bos_token_id == 1
    assert tokenizer.vocab_size == 49152
    assert {0, 1, 2} <= tokenizer.all_special_ids
    assert tokenizer.encode("Hello") == tokenizer.encode("Hello", add_bos=False)  # SmolLM2 adds no BOS
    assert tokenizer.decode(tokenizer.encode("Hello, world")) == "Hello, world"


def test_encode_adds_bos_once_when_the_model_asks(smollm2_folder: str, tmp_path: Path) -> None:
    folder = copy_folder(smollm2_folder, tmp_path, tokenizer_config={"add_bos_token": True})
    with_bos = Tokenizer.from_folder(folder)
    plain = with_bos.encode("Hi there", add_bos=False)
    assert with_bos.encode("Hi there") == [1, *plain]
    assert with_bos.encode("<|im_start|>Hi there") == [1, *plain]  # the text's own BOS is not doubled
    assert with_bos.encode("") == [1]


def test_generation_config_gives_eos_ids_and_sampling_defaults(smollm2_folder: str, tmp_path: Path) -> None:
    overrides = {"eos_token_id": [2, 0], "temperature": 0.6, "top_p": 0.9, "do_sample": True}
    tokenizer = Tokenizer.from_folder(copy_folder(smollm2_folder, tmp_path, generation_config=overrides))
    assert tokenizer.eos_token_ids == (2, 0)
    assert tokenizer.generation_defaults == {"temperature": 0.6, "top_p": 0.9}


def test_token_bytes_and_text_of_byte_level_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🦙 ok")
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == "🦙 ok".encode()
    assert len(ids) > 3  # the emoji's 4 bytes are split over several tokens
    assert tokenizer.token_text(ids[0]) == "\ufffd"  # part of a character
    assert tokenizer.token_bytes(ids[-1]) == b" ok" and tokenizer.token_text(ids[-1]) == " ok"
    assert tokenizer.token_text(2) == "<|im_end|>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.token_bytes(10**6)


# ------------------------------------------------------------------------------------------ incremental detokenizer


@pytest.mark.parametrize("text", ["🦙🚀", "你好，世界", "mixed 🦙 text, 你好 and 🚀!\n"])
def test_detokenizer_round_trips_split_characters(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    for chunk in (1, 2, 3):
        pieces = stream(IncrementalDetokenizer(tokenizer), ids, chunk)
        assert not any("\ufffd" in piece for piece in pieces)
        assert "".join(pieces) == tokenizer.decode(ids) == text
    prompt = tokenizer.encode("Say it:")
    pieces = stream(IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt), ids)
    assert "".join(pieces) == text  # the prompt is context only, never emitted


def test_detokenizer_holds_a_split_emoji_until_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a🦙")
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.push([i]) for i in ids] == ["a", "", "", "🦙"]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("spaces_between_special_tokens", [True, False])
def test_detokenizer_special_tokens_match_decode(
    tokenizer: Tokenizer, skip_special_tokens: bool, spaces_between_special_tokens: bool
) -> None:
    ids = tokenizer.encode("<|im_start|>user\nhi 🦙<|im_end|><|im_end|>\nok")
    flags = dict(skip_special_tokens=skip_special_tokens, spaces_between_special_tokens=spaces_between_special_tokens)
    text = "".join(stream(IncrementalDetokenizer(tokenizer, **flags), ids))
    assert text == tokenizer.decode(ids, **flags)
    expected = {
        (True, True): "user\nhi 🦙\nok",
        (True, False): "user\nhi 🦙\nok",
        (False, False): "<|im_start|>user\nhi 🦙<|im_end|><|im_end|>\nok",
        (False, True): "<|im_start|> user\nhi 🦙 <|im_end|> <|im_end|> \nok",  # Hugging Face slow-tokenizer rule
    }
    assert text == expected[skip_special_tokens, spaces_between_special_tokens]


def test_detokenizer_decodes_a_short_window(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "The quick brown fox 🦊 jumps over the lazy dog. 你好! " * 20
    ids = tokenizer.encode(text)
    window_sizes: list[int] = []
    decode = tokenizer.decode

    def recording_decode(token_ids: list[int], **flags: bool) -> str:
        window_sizes.append(len(token_ids))
        return decode(token_ids, **flags)

    monkeypatch.setattr(tokenizer, "decode", recording_decode)
    assert "".join(stream(IncrementalDetokenizer(tokenizer), ids)) == text
    assert len(ids) > 300 and max(window_sizes) <= 16


# -------------------------------------------------------------------------------------------------- stop strings


def test_stop_string_across_tokens_cuts_the_text(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("The answer is 42. END OF ANSWER and more")
    detokenizer, matcher = IncrementalDetokenizer(tokenizer), StopStringMatcher(["END OF ANSWER"])
    emitted, matched_at = "", None
    for index, token_id in enumerate(ids):
        text, matched = matcher.push(detokenizer.push([token_id]))
        emitted += text
        if matched:
            matched_at = index
            break
    assert emitted == "The answer is 42. "
    assert matched_at is not None and tokenizer.decode(ids[: matched_at + 1]).endswith("ANSWER")
    assert len(tokenizer.encode(" END OF ANSWER")) > 2


def test_partial_stop_is_held_then_released() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.push("abc E") == ("abc ", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("x E") == ("ENx ", False)
    assert matcher.flush() == "E"
    assert matcher.flush() == ""


def test_earliest_of_several_stops_wins() -> None:
    assert StopStringMatcher(["world", "lo w"]).push("hello world") == ("hel", True)
    overlapping = StopStringMatcher(["abcd", "bce"])
    assert overlapping.push("xabc") == ("x", False)  # "abc" could begin "abcd"
    assert overlapping.push("e tail") == ("a", True)
    assert overlapping.push("more") == ("", True) and overlapping.flush() == ""


def test_no_stops_pass_text_through() -> None:
    matcher = StopStringMatcher(["", ""])
    assert matcher.push("anything") == ("anything", False)
    assert matcher.flush() == ""


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(alphabet="abc ", max_size=30),
    stops=st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=6),
)
def test_stop_matcher_equals_cutting_the_whole_text(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    matcher, emitted, matched = StopStringMatcher(stops), "", False
    for start, end in zip(bounds, bounds[1:], strict=False):
        piece, matched = matcher.push(text[start:end])
        emitted += piece
        if matched:
            break
    if not matched:
        emitted += matcher.flush()
    starts = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert matched == bool(starts)
    assert emitted == (text[: min(starts)] if starts else text)


# ------------------------------------------------------------------------------------------------ chat templates

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.mark.slow  # loads transformers' AutoTokenizer as the oracle (seconds)
def test_render_chat_matches_transformers(tokenizer: Tokenizer, smollm2_folder: str) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2_folder)
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected
        assert tokenizer.encode_chat(messages) == reference.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )


def test_render_chat_smollm2_chatml(tokenizer: Tokenizer) -> None:
    user = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    assert (
        tokenizer.render_chat(user) == SYSTEM_PROMPT + "<|im_start|>user\nHi\nthere<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.encode_chat(user)[:2] == [1, 9690]  # <|im_start|> "system": BOS from the template only


def test_custom_template_file_overrides(smollm2_folder: str, tmp_path: Path) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    tokenizer = Tokenizer.from_folder(smollm2_folder, chat_template=str(template))
    assert tokenizer.render_chat(CONVERSATION[1:2]) == "USER: What is 2+2?\nASSISTANT:"
    with pytest.raises(ValueError, match="no such file"):
        Tokenizer.from_folder(smollm2_folder, chat_template=str(tmp_path / "missing.jinja"))


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", "messages must be a non-empty list of message objects"),
        ([], "messages must be a non-empty list of message objects"),
        (["hello"], "messages[0] must be an object with 'role' and 'content'"),
        ([{"content": "hi"}], "messages[0].role must be a non-empty string"),
        (
            [{"role": "user", "content": "a"}, {"role": 3, "content": "b"}],
            "messages[1].role must be a non-empty string",
        ),
        ([{"role": "user", "content": 5}], "messages[0].content must be a string or a list of content parts"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0] has type 'image_url'; this model accepts only 'text' parts",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "messages[0].content[0].text must be a string"),
    ],
)
def test_bad_messages_raise_invalid_request(tokenizer: Tokenizer, messages: Any, message: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        tokenizer.render_chat(messages)
    assert caught.value.param == "messages"
    assert caught.value.message == message


def test_template_exceptions_become_invalid_request(smollm2_folder: str, tmp_path: Path) -> None:
    template = tmp_path / "strict.jinja"
    template.write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    tokenizer = Tokenizer.from_folder(smollm2_folder, chat_template=str(template))
    with pytest.raises(InvalidRequestError, match="no tools") as caught:
        tokenizer.render_chat([{"role": "tool", "content": "x"}])
    assert caught.value.param == "messages"


# ---------------------------------------------------------------------------------------------- session turns

TURN_1 = [{"role": "user", "content": "What is 2+2?"}]
TURN_2 = [{"role": "user", "content": "And 3+3?"}]
NEXT_TURN = "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(("answer", "ends_with_eos"), [("2+2 equals 4.", True), ("2+2 equ", False)])
def test_session_turn_extends_the_history_token_for_token(
    tokenizer: Tokenizer, answer: str, ends_with_eos: bool
) -> None:
    """Asserted: encode_chat(turn 1) + the answer's ids (+ EOS) + encode(turn text, add_bos=False) is exactly
    encode_chat(turn 1 + answer + turn 2), where the answer's ids are its canonical encoding (a model may sample a
    different tokenization of the same text; the template's part of the history is identical either way)."""
    answer_ids = tokenizer.encode(answer, add_bos=False) + ([2] if ends_with_eos else [])
    history = [*TURN_1, {"role": "assistant", "content": answer}]
    turn_text = tokenizer.render_session_turn(history, TURN_2, last_output_ids=answer_ids)
    assert turn_text == ("\n" if ends_with_eos else "<|im_end|>\n") + NEXT_TURN  # no system prompt again
    session_ids = tokenizer.encode_chat(TURN_1) + answer_ids + tokenizer.encode(turn_text, add_bos=False)
    assert session_ids == tokenizer.encode_chat([*history, *TURN_2])


def test_session_turn_after_an_empty_answer_and_a_third_turn(tokenizer: Tokenizer) -> None:
    # the previous turn produced no tokens: the history ends with the generation prompt
    assert tokenizer.render_session_turn(TURN_1, TURN_2, last_output_ids=()) == "<|im_end|>\n" + NEXT_TURN
    history = [*TURN_1, {"role": "assistant", "content": "4"}, *TURN_2, {"role": "assistant", "content": "6"}]
    third = [{"role": "user", "content": "Thanks"}]
    text = tokenizer.render_session_turn(history, third, last_output_ids=[*tokenizer.encode("6"), 2])
    assert text == "\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.render_session_turn([], third, last_output_ids=()) == tokenizer.render_chat(third)
