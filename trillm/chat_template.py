"""ChatTemplateOption: what `--chat-template` names — a Jinja template, or an LMDeploy JSON template — checked once.

Two kinds of file are accepted, as LMDeploy's and Hugging Face's users write them:

- a Jinja template (the text of a `chat_template` entry of tokenizer_config.json), or Hugging Face's
  `chat_template.json` (`{"chat_template": "..."}`); the option may also be the template text itself;
- an LMDeploy JSON template (LMDeploy's chat_template.md): an object with `model_name` and any of `system`,
  `meta_instruction`, `eosys`, `user`, `eoh`, `assistant`, `eoa`, `separator`, `tool`, `eotool` (strings),
  `capability` and `stop_words` (a list of strings). It renders as LMDeploy's BaseChatTemplate does:

      {system}{meta_instruction}{eosys}{user}{user_content}{eoh}{assistant}{assistant_content}{eoa}{separator}...

  The `{system}{meta_instruction}{eosys}` block comes first when `meta_instruction` is set and the conversation
  does not start with a system message (which is then written as `{system}{content}{eosys}`); a generation prompt
  is `{assistant}`. `developer` messages are written as system messages and `function` messages as tool messages.
  `model_name` is only a label here: trillm has no built-in LMDeploy templates to override. `stop_words` end
  generation like EOS (`Tokenizer`), where each is one token of the vocabulary. With `capability: "completion"`
  the messages' text is the prompt, undecorated.

Anything else is refused at start-up with a ValueError that says what was expected.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

log = logging.getLogger(__name__)

_STRING_FIELDS = ("system", "meta_instruction", "eosys", "user", "eoh", "assistant", "eoa", "separator", "tool",
                  "eotool")
LMDEPLOY_FIELDS = ("model_name", *_STRING_FIELDS, "capability", "stop_words")
CAPABILITIES = ("chat", "completion", "infilling", "python")
_ROLE_ALIASES = {"developer": "system", "function": "tool"}


class TemplateRenderError(ValueError):
    """A conversation the LMDeploy template cannot render (a role it has no markers for)."""


@attrs.frozen(kw_only=True)
class LMDeployTemplate:
    """An LMDeploy JSON chat template (LMDeploy's BaseChatTemplate fields)."""

    model_name: str
    system: str = ""
    meta_instruction: str | None = None
    eosys: str = ""
    user: str = ""
    eoh: str = ""
    assistant: str = ""
    eoa: str = ""
    separator: str = ""
    tool: str = ""
    eotool: str = ""
    capability: str = "chat"
    stop_words: tuple[str, ...] = ()

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` (contents already strings); the generation prompt last when asked.

        Raises:
            TemplateRenderError: a message's role is not system, developer, user, assistant, tool or function.
        """
        if self.capability == "completion":
            return "".join(str(message["content"]) for message in messages)
        markers = {"system": (self.system, self.eosys), "user": (self.user, self.eoh),
                   "assistant": (self.assistant, self.eoa + self.separator), "tool": (self.tool, self.eotool)}
        parts = []
        if self.meta_instruction and (not messages or messages[0]["role"] not in ("system", "developer")):
            parts.append(f"{self.system}{self.meta_instruction}{self.eosys}")
        for index, message in enumerate(messages):
            role = _ROLE_ALIASES.get(message["role"], message["role"])
            if role not in markers:
                raise TemplateRenderError(f"messages[{index}]: the chat template has no markers for role {role!r}")
            begin, end = markers[role]
            parts.append(f"{begin}{message['content']}{end}")
        if add_generation_prompt:
            parts.append(self.assistant)
        return "".join(parts)


def _lmdeploy_template(data: dict[str, Any], where: str) -> LMDeployTemplate:
    unknown = sorted(set(data) - set(LMDEPLOY_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} for an LMDeploy chat template; expected "
                         f"{', '.join(LMDEPLOY_FIELDS)}")
    values = {key: value for key, value in data.items() if value is not None}  # null: the default, as in LMDeploy
    for key in ("model_name", *_STRING_FIELDS, "capability"):
        if key in values and not isinstance(values[key], str):
            raise ValueError(f"{where}: field {key} must be a string, got {json.dumps(values[key])[:40]}")
    stop_words = values.get("stop_words", [])
    if not isinstance(stop_words, list) or not all(isinstance(word, str) and word for word in stop_words):
        raise ValueError(f"{where}: stop_words must be a list of non-empty strings")
    values["stop_words"] = tuple(stop_words)
    if values.get("capability", "chat") not in CAPABILITIES:
        raise ValueError(f"{where}: capability must be one of {', '.join(CAPABILITIES)}, got {values['capability']!r}")
    return LMDeployTemplate(**values)


def _checked_jinja(text: str, where: str) -> str:
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"{where}: not a valid Jinja template (line {exc.lineno}: {exc.message})") from None
    return text


def _from_json(data: Any, where: str) -> str | LMDeployTemplate:
    if isinstance(data, dict) and "model_name" in data:
        return _lmdeploy_template(data, where)
    if isinstance(data, dict) and isinstance(data.get("chat_template"), str):  # Hugging Face's chat_template.json
        return _checked_jinja(data["chat_template"], where)
    raise ValueError(f"{where}: this JSON is not a chat template: expected an LMDeploy chat template (an object with "
                     f"model_name and {', '.join(LMDEPLOY_FIELDS[1:])}) or Hugging Face's chat_template.json (an "
                     "object with a chat_template string)")


def load_chat_template(option: str) -> str | LMDeployTemplate:
    """The template `--chat-template` names: a Jinja template's text, or an LMDeployTemplate.

    Raises:
        ValueError: no such file and not a template, or a file of neither kind (the message says what was expected).
    """
    path = Path(option).expanduser()
    if path.is_file():
        where = f"--chat-template {option}"
        text = path.read_text(encoding="utf-8")
        is_jinja = "{{" in text or "{%" in text
        try:
            data = json.loads(text)
        except ValueError as exc:
            if is_jinja:
                return _checked_jinja(text, where)
            raise ValueError(f"{where}: neither a Jinja chat template (no {{{{ or {{% in it) nor an LMDeploy JSON "
                             f"chat template ({'invalid JSON: ' + str(exc) if text.lstrip().startswith('{') else 'not JSON'})"
                             ) from None
        return _from_json(data, where)
    if "{{" in option or "{%" in option:
        return _checked_jinja(option, "--chat-template")
    raise ValueError(f"--chat-template: no such file: {option}")
