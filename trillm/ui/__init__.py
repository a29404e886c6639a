"""User interfaces against a running server: the terminal chat (`serve api_client`) and the web chat (`serve gradio`).

`web_chat` is not re-exported: it imports gradio, which only `trillm serve gradio` needs.
"""

from .chat_session import ChatSession as ChatSession
from .terminal import TerminalChat as TerminalChat
