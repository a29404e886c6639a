"""trillm: an OpenAI-compatible LLM serving engine."""
