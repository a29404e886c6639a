"""trillm: an OpenAI-compatible LLM serving engine."""

from .client import APIClient as APIClient
