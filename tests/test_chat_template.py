"""--chat-template: Jinja files and LMDeploy JSON files give the expected prompts; any other file fails at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from served import free_port
from trillm.chat_template import LMDeployTemplate, load_chat_template
from trillm.cli import main
from trillm.errors import InvalidRequestError
from trillm.tokenizer import Tokenizer

CHATML_LMDEPLOY = {  # LMDeploy's chat_template.md example, with SmolLM2's own system prompt
    "model_name": "smollm2-chatml",
    "system": "<|im_start|>system\n",
    "meta_instruction": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "eosys": "<|im_end|>\n",
    "user": "<|im_start|>user\n",
    "eoh": "<|im_end|>\n",
    "assistant": "<|im_start|>assistant\n",
    "eoa": "<|im_end|>",
    "separator": "\n",
    "capability": "chat",
    "stop_words": ["<|im_end|>", "<|endoftext|>"],
}
CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


def write(path: Path, content: object) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_lmdeploy_json_renders_as_the_models_own_chatml(smollm2_folder: str, tmp_path: Path) -> None:
    own = Tokenizer.from_folder(smollm2_folder)
    lmdeploy = Tokenizer.from_folder(smollm2_folder, chat_template=write(tmp_path / "t.json", CHATML_LMDEPLOY))
    assert isinstance(lmdeploy.chat_template, LMDeployTemplate)
    for messages in (CONVERSATION, CONVERSATION[:1], [{"role": "system", "content": "Be brief."}, *CONVERSATION]):
        assert lmdeploy.render_chat(messages) == own.render_chat(messages)
        assert lmdeploy.encode_chat(messages) == own.encode_chat(messages)  # the engine's prompt ids
    # A session's next turn bridges from the answer exactly as with the Jinja template.
    history = CONVERSATION[:2]
    answer_ids = own.encode("4.<|im_end|>", add_bos=False)
    assert (lmdeploy.render_session_turn(history, CONVERSATION[2:], last_output_ids=answer_ids)
            == own.render_session_turn(history, CONVERSATION[2:], last_output_ids=answer_ids))
    assert own.encode("<|im_end|>", add_bos=False)[0] in lmdeploy.eos_token_ids  # stop_words end generation


def test_lmdeploy_fields_render_in_lmdeploys_order() -> None:
    template = LMDeployTemplate(model_name="x", system="<s>", meta_instruction="M", eosys="</s>", user="U:",
                                eoh="|", assistant="A:", eoa="#", separator="\n", tool="T:", eotool="~")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "tool", "content": "42"}, {"role": "user", "content": "ok"}]
    assert template.render(messages) == "<s>M</s>U:hi|A:yo#\nT:42~U:ok|A:"
    assert template.render(messages[:2], add_generation_prompt=False) == "<s>M</s>U:hi|A:yo#\n"
    assert template.render([{"role": "system", "content": "S"}]) == "<s>S</s>A:"  # a system message replaces M
    completion = LMDeployTemplate(model_name="x", user="U:", capability="completion")
    assert completion.render(messages[:1]) == "hi"


def test_jinja_file_and_hugging_face_json_both_load(smollm2_folder: str, tmp_path: Path) -> None:
    jinja = "{% for m in messages %}{{ m['role'] }}={{ m['content'] }};{% endfor %}"
    assert load_chat_template(write(tmp_path / "t.jinja", jinja)) == jinja
    assert load_chat_template(write(tmp_path / "hf.json", {"chat_template": jinja})) == jinja
    tokenizer = Tokenizer.from_folder(smollm2_folder, chat_template=str(tmp_path / "t.jinja"))
    assert tokenizer.render_chat(CONVERSATION[:1]) == "user=What is 2+2?;"


def test_an_unknown_role_is_a_400_not_a_crash(smollm2_folder: str, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_folder(smollm2_folder, chat_template=write(tmp_path / "t.json", CHATML_LMDEPLOY))
    with pytest.raises(InvalidRequestError, match="no markers for role 'narrator'"):
        tokenizer.render_chat([{"role": "narrator", "content": "x"}])


@pytest.mark.parametrize(("content", "expected"), [
    ("just some words", "neither a Jinja chat template .* nor an LMDeploy JSON chat template"),
    ('{"model_name": "x", "user": 3}', "field user must be a string"),
    ('{"model_name": "x", "eou": "?"}', "unknown field.*eou.*expected model_name"),
    ('{"name": "x"}', "not a chat template: expected an LMDeploy chat template"),
    ('{"model_name": "x",', "invalid JSON"),
    ("{% for m in messages %}", "not a valid Jinja template"),
])
def test_a_file_of_neither_kind_is_refused(tmp_path: Path, content: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        load_chat_template(write(tmp_path / "bad", content))


def test_serve_refuses_a_bad_template_before_loading_anything(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path / "bad.txt", "Hello {name}")
    with pytest.raises(SystemExit) as info:  # the model does not exist either: the template is checked first
        main(["serve", "api_server", str(tmp_path / "no-such-model"), "--chat-template", bad,
              "--server-port", str(free_port())])
    assert info.value.code == 2
    assert "neither a Jinja chat template" in capsys.readouterr().err
