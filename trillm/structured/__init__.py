"""Structured outputs: grammars built from requests (`grammar.py`, no torch: the HTTP layer uses it) and the rank's
per-sequence grammar matchers and token bitmasks (`matchers.py`, used by `gpu/runner.py`)."""
