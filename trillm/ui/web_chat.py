"""The web chat: `trillm serve gradio URL`, a gradio page that chats with a running server.

Each browser tab holds a `TabChat` in a `gr.State`: its own interactive session on the server (a `ChatSession`, so
the server keeps the conversation and its KV cache between turns) and the messages shown. The page streams answers
as they are generated; Cancel sends `cancel: true` for the tab's session (the streaming answer then ends with
`abort` and stays in the history, as on the server); Reset ends the session and starts a new one; three sliders set
max new tokens, top_p and temperature per turn. Failures are shown in the status line under the chat, in a sentence
that says what to do.

Only `trillm serve gradio` imports this module: gradio stays out of the package root and of the server.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import gradio as gr

from trillm.client import APIClient, APIError
from trillm.ui.chat_session import MAX_NEW_TOKENS, ChatSession, explain

log = logging.getLogger(__name__)

NEW_SESSION_HINT = "press Reset"
MAX_NEW_TOKENS_LIMIT = 8192
TOP_P = 0.8
TEMPERATURE = 0.8  # the interactive endpoint's own defaults (API.md), as the terminal chat sends them
Update = tuple[Any, ...]


class TabChat:
    """One browser tab's chat: its session on the server, the messages shown and whether an answer is streaming."""

    def __init__(self, client: APIClient) -> None:
        self.session = ChatSession(client)
        self.messages: list[dict[str, str]] = []
        self.is_answering = False

    def status(self, note: str = "") -> str:
        return f"Session {self.session.session_id}. {note}".strip()


class WebChat:
    """The page's event handlers over one client; `build` lays the page out."""

    def __init__(self, client: APIClient, model_names: list[str]) -> None:
        self.client = client
        self.model_names = model_names

    def new_tab(self) -> TabChat:
        return TabChat(self.client)

    def open_tab(self) -> tuple[TabChat, str]:
        """Page load: the tab's chat and its status line."""
        tab = self.new_tab()
        return tab, tab.status()

    def respond(self, message: str, tab: TabChat | None, max_new_tokens: float, top_p: float,
                temperature: float) -> Iterator[Update]:
        """Send `message` and stream the answer: yields (textbox, chatbot, tab, status) updates."""
        tab = tab or self.new_tab()
        keep = gr.update()  # the message box as it is: the user may type the next message meanwhile
        if not message.strip():
            yield keep, tab.messages, tab, tab.status("Type a message first.")
            return
        if tab.is_answering:
            yield keep, tab.messages, tab, tab.status("An answer is still being written: wait, or press Cancel.")
            return
        session_id = tab.session.session_id
        messages = tab.messages
        messages.append({"role": "user", "content": message})
        messages.append({"role": "assistant", "content": ""})
        tab.is_answering = True
        yield "", messages, tab, tab.status("Answering...")
        note = ""
        try:
            # closing(): a tab that goes away mid-answer closes the stream (the server then cancels the turn)
            with closing(tab.session.turn(message, request_output_len=int(max_new_tokens), top_p=top_p,
                                          temperature=temperature)) as lines:
                for line in lines:
                    if tab.session.session_id != session_id:
                        return  # Reset: this answer belongs to the ended session
                    messages[-1]["content"] += line.get("text") or ""
                    note = _finish_note(line, int(max_new_tokens))
                    yield keep, messages, tab, tab.status("Answering...")
        except APIError as exc:
            if not messages[-1]["content"]:
                messages.pop()  # no answer: leave the question, drop the empty bubble
            note = explain(exc, new_session_hint=NEW_SESSION_HINT)
        finally:
            if tab.session.session_id == session_id:
                tab.is_answering = False
        yield keep, messages, tab, tab.status(note)

    def cancel(self, tab: TabChat | None) -> str:
        """Cancel: stop the tab's running answer on the server."""
        if tab is None or not tab.is_answering:
            return tab.status("Nothing to cancel.") if tab else ""
        try:
            tab.session.cancel()
        except APIError as exc:
            return tab.status(explain(exc, new_session_hint=NEW_SESSION_HINT))
        return tab.status("Cancelling...")

    def reset(self, tab: TabChat | None) -> Update:
        """Reset: end the tab's session (cancelling a running answer) and start a new one."""
        tab = tab or self.new_tab()
        old = tab.session.session_id
        try:
            tab.session.restart()
            note = f"Session {old} ended; new session started."
        except APIError as exc:
            note = explain(exc, new_session_hint=NEW_SESSION_HINT)
        tab.messages = []
        tab.is_answering = False
        return [], tab, tab.status(note)

    def build(self) -> gr.Blocks:
        """The page: chat, message box, Send/Cancel/Reset, sliders, status line."""
        with gr.Blocks(title="trillm chat", analytics_enabled=False) as page:
            gr.Markdown(f"## trillm chat\n{', '.join(self.model_names) or 'no model'} at "
                        f"`{self.client.api_server_url}`")
            tab = gr.State(None, delete_callback=_end_quietly)
            chatbot = gr.Chatbot(label="chat", elem_id="chat", height=480, buttons=["copy", "copy_all"])
            box = gr.Textbox(label="message", elem_id="message", lines=1, max_lines=8,
                             placeholder="Type a message and press Enter (Shift+Enter for a new line)")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="send")
                cancel = gr.Button("Cancel", elem_id="cancel")
                reset = gr.Button("Reset", elem_id="reset")
            with gr.Row():
                max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=MAX_NEW_TOKENS, step=1,
                                           label="max new tokens", elem_id="max-new-tokens")
                top_p = gr.Slider(0.01, 1.0, value=TOP_P, step=0.01, label="top_p", elem_id="top-p")
                temperature = gr.Slider(0.0, 2.0, value=TEMPERATURE, step=0.01, label="temperature",
                                        elem_id="temperature")
            status = gr.Markdown("", elem_id="status")
            page.load(self.open_tab, outputs=[tab, status])
            inputs = [box, tab, max_new_tokens, top_p, temperature]
            outputs = [box, chatbot, tab, status]
            # concurrency_limit=None: every tab may stream at once (gradio's default is one at a time)
            box.submit(self.respond, inputs, outputs, concurrency_limit=None)
            send.click(self.respond, inputs, outputs, concurrency_limit=None)
            cancel.click(self.cancel, [tab], [status], concurrency_limit=None)
            reset.click(self.reset, [tab], [chatbot, tab, status], concurrency_limit=None)
            chatbot.clear(self.reset, [tab], [chatbot, tab, status])  # the chat's own trash icon resets too
        blocks: gr.Blocks = page  # gradio types `with ... as` loosely
        return blocks


def _finish_note(line: dict[str, Any], max_new_tokens: int) -> str:
    match line.get("finish_reason"):
        case "abort":
            return "Answer cancelled; it stays in the session's history."
        case "length" if int(line.get("tokens") or 0) >= max_new_tokens:
            return f"The answer stopped at {max_new_tokens} tokens (the max new tokens slider)."
        case "length":
            return f"The session is full: {NEW_SESSION_HINT} to start a new one."
        case _:
            return ""


def _end_quietly(tab: TabChat | None) -> None:
    """gr.State's delete callback (the tab closed): end its session on the server, if the server is there."""
    if tab is None:
        return
    try:
        tab.session.end()
    except APIError as exc:
        log.info("could not end session %d of a closed tab: %s", tab.session.session_id, exc)


def build_web_chat(client: APIClient) -> gr.Blocks:
    """The chat page for the server behind `client`.

    Raises:
        APIError: the server cannot be reached (its model list is read once, for the page's title).
    """
    return WebChat(client, client.available_models).build()


def serve_web_chat(api_server_url: str, *, api_key: str | None, server_name: str, server_port: int) -> int:
    """`trillm serve gradio`: serve the page until Ctrl-C; the exit status (1 when the server cannot be reached)."""
    with APIClient(api_server_url, api_key=api_key) as client:
        try:
            page = build_web_chat(client)
        except APIError as exc:
            print(f"trillm serve gradio: {explain(exc, new_session_hint=NEW_SESSION_HINT)}", file=sys.stderr)
            return 1
        page.queue().launch(server_name=server_name, server_port=server_port, show_error=True, ssr_mode=False,
                            footer_links=[])
    return 0
